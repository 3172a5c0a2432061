"""How long a grid will take, from short timed runs of each family (``study --estimate``).

Per family, its first configuration runs three times in a scratch directory: 1 step (to
warm MLX's compile caches, as the study's earlier runs would), then ``short`` and ``long``
steps, each with one evaluation, the final checkpoint and the export. From the process CPU
seconds of the last two, ``step = (cpu_long - cpu_short) / (long - short)`` and
``overhead = cpu_short - short x step`` (set-up, compiling, checkpoint, export). A full run
is ``overhead + steps x step x (1 + evaluations x eval_batches / (3 x steps))`` (an
evaluation batch is a forward pass, about a third of a training step).

CPU seconds, not wall-clock: on a machine others load, wall-clock times grow with the load
but a process's CPU seconds much less. On an idle machine a step's wall-clock time lies
between its CPU seconds divided by the threads MLX and BLAS use (up to the core count) and
its CPU seconds, so the CPU estimate is the upper end. The wall-clock estimate at the
current load is reported beside it, with the load average.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from ..train import Pretrainer
from .grid import Family, Grid
from .results import write_csv
from .vision import load_dataset, train_vision

COLUMNS = ("family", "kind", "runs", "steps", "cpu_step_s", "cpu_overhead_s", "cpu_run_s",
           "cpu_family_s", "wall_step_s", "wall_family_s", "load_avg")


def estimate(grid: Grid, out_dir: str | Path, seeds: tuple[int, ...] | None = None,
             short: int = 3, long: int = 9) -> list[dict[str, Any]]:
    """One row (``COLUMNS``) per family, also written to ``out_dir/estimate.csv``."""
    from tqdm.auto import tqdm

    seeds = tuple(seeds or grid.seeds)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".estimate-") as scratch:
        for family in tqdm(grid.families, desc="timing", unit="family"):
            rows.append(_family_row(family, Path(scratch) / family.name, out_dir, seeds,
                                    short, long))
    write_csv(rows, out_dir / "estimate.csv", COLUMNS)
    return rows


def _family_row(family: Family, scratch: Path, out_dir: Path, seeds: tuple[int, ...],
                short: int, long: int) -> dict[str, Any]:
    full = family.config(scratch, family.learning_rates[0], seeds[0])
    timed = _time_lm if family.kind == "lm" else _time_vision
    timed(full, 1, scratch / "warm", out_dir)
    (cpu_a, wall_a), (cpu_b, wall_b) = (timed(full, n, scratch / str(n), out_dir)
                                        for n in (short, long))
    step, overhead = _split(cpu_a, cpu_b, short, long)
    wall_step, wall_overhead = _split(wall_a, wall_b, short, long)
    steps = full.total_steps if family.kind == "lm" else full.steps
    evals = (steps // full.eval_every if full.eval_every else 1) * getattr(
        full, "eval_batches", 3) / 3  # vision: the test set, about 3 batches' work
    runs = len(family.learning_rates) + len(seeds) - 1
    per_run = overhead + (steps + evals) * step
    return {"family": family.name, "kind": family.kind, "runs": runs, "steps": steps,
            "cpu_step_s": step, "cpu_overhead_s": overhead, "cpu_run_s": per_run,
            "cpu_family_s": runs * per_run, "wall_step_s": wall_step,
            "wall_family_s": runs * (wall_overhead + (steps + evals) * wall_step),
            "load_avg": os.getloadavg()[0]}


def _split(seconds_short: float, seconds_long: float, short: int, long: int
           ) -> tuple[float, float]:
    """(seconds per step, fixed seconds per run) from runs of ``short`` and ``long`` steps."""
    step = (seconds_long - seconds_short) / (long - short)
    if step <= 0:  # timing noise larger than the extra steps: count the whole run as steps
        step = seconds_long / long
    return step, max(0.0, seconds_short - short * step)


def _timed(fn) -> tuple[float, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - cpu, time.perf_counter() - wall


def _time_lm(full, steps: int, directory: Path, out_dir: Path) -> tuple[float, float]:
    """(CPU, wall) seconds of a ``steps``-step run of ``full``'s configuration."""
    from .runner import link_shared_data

    config = dataclasses.replace(full, out_dir=str(directory), steps=steps, tokens=0,
                                 eval_every=steps, save_every=0,
                                 warmup_steps=min(full.warmup_steps, steps))
    directory.mkdir(parents=True)
    link_shared_data(out_dir, config, directory)
    return _timed(lambda: Pretrainer(config).run())


def _time_vision(full, steps: int, directory: Path, out_dir: Path) -> tuple[float, float]:
    config = dataclasses.replace(full, out_dir=str(directory), steps=steps, eval_every=steps)
    data = load_dataset(full.dataset)
    return _timed(lambda: train_vision(config, data))
