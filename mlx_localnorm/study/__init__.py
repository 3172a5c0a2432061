"""The norm x placement x optimizer study: grids of runs, results, plots and diagnostics.

``mlx-localnorm study --grid FILE`` runs a grid (see :mod:`.grid`) with :class:`Study`;
``mlx-localnorm diagnose DIR`` measures a run's per-layer statistics (:mod:`.diagnose`).
"""

from .diagnose import diagnose_dir, diagnose_runs
from .grid import Family, Grid, parse_grid, read_grid
from .runner import Study, StudyInterrupted
from .vision import ConvClassifier, VisionConfig, train_vision

__all__ = ["ConvClassifier", "Family", "Grid", "Study", "StudyInterrupted", "VisionConfig",
           "diagnose_dir", "diagnose_runs", "parse_grid", "read_grid", "train_vision"]
