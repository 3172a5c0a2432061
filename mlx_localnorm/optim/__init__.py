"""Normalized optimizers: Muon (Newton–Schulz / Polar Express), NorMuon, Scion, LARS, LAMB,
AdamW with float32 moments, weight constraints, parameter groups and parameter averaging.
All are ``mlx.optimizers.Optimizer`` subclasses that work inside ``mx.compile`` and under
``MultiOptimizer``."""

from .adamw import AdamW
from .averaged import Averaged
from .constrained import Constrained
from .groups import (
    OPTIMIZERS,
    PARAM_GROUPS,
    MultiOptimizer,
    make_optimizer,
    param_groups,
    split_params,
)
from .muon import LR_SCALES, Muon, NorMuon
from .orth import NEWTON_SCHULZ, ORTH_METHODS, POLAR_EXPRESS, orthogonalize
from .scion import SCION_NORMS, Scion
from .trust import LAMB, LARS

__all__ = [
    "LAMB",
    "LARS",
    "LR_SCALES",
    "NEWTON_SCHULZ",
    "OPTIMIZERS",
    "ORTH_METHODS",
    "PARAM_GROUPS",
    "POLAR_EXPRESS",
    "SCION_NORMS",
    "AdamW",
    "Averaged",
    "Constrained",
    "MultiOptimizer",
    "Muon",
    "NorMuon",
    "Scion",
    "make_optimizer",
    "orthogonalize",
    "param_groups",
    "split_params",
]
