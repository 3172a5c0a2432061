"""How long a grid will take, from a few timed steps of each family (``study --estimate``).

For each family, one short run of its first configuration (``steps`` optimizer steps, one
evaluation, the final checkpoint and export) is timed in a scratch directory. A full run is
then ``overhead + steps x step + evaluations x evaluation``, with ``step`` the median
wall-clock seconds of the timed steps after the first (compiling) one, ``evaluation`` one
timed validation pass, and ``overhead`` what the short run spent outside its steps (model
set-up, compiling, export). The process CPU seconds per step are reported beside it: on a
machine that others load, wall-clock times grow but CPU seconds much less; on an idle
machine a step takes between CPU/threads and CPU seconds of wall-clock time.
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from ..train import Pretrainer, read_metrics
from .grid import Family, Grid
from .results import write_csv
from .vision import VisionConfig, load_dataset, train_vision

COLUMNS = ("family", "kind", "runs", "steps", "step_s", "cpu_step_s", "eval_s", "evals",
           "overhead_s", "run_s", "family_s", "family_cpu_s", "load_avg")


def estimate(grid: Grid, out_dir: str | Path, seeds: tuple[int, ...] | None = None,
             steps: int = 8) -> list[dict[str, Any]]:
    """One row (``COLUMNS``) per family, also written to ``out_dir/estimate.csv``."""
    from tqdm.auto import tqdm

    seeds = tuple(seeds or grid.seeds)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".estimate-") as scratch:
        for family in tqdm(grid.families, desc="timing", unit="family"):
            timed = _time_lm if family.kind == "lm" else _time_vision
            row = timed(family, Path(scratch) / family.name, steps, out_dir)
            runs = len(family.learning_rates) + len(seeds) - 1
            row.update(family=family.name, kind=family.kind, runs=runs,
                       run_s=row["overhead_s"] + row["steps"] * row["step_s"]
                       + row["evals"] * row["eval_s"], load_avg=os.getloadavg()[0])
            row["family_s"] = runs * row["run_s"]
            row["family_cpu_s"] = runs * (row["overhead_s"] + row["steps"] * row["cpu_step_s"]
                                          + row["evals"] * row["eval_s"])
            rows.append(row)
    write_csv(rows, out_dir / "estimate.csv", COLUMNS)
    return rows


def _time_lm(family: Family, scratch: Path, steps: int, out_dir: Path) -> dict[str, Any]:
    from .runner import link_shared_data

    full = family.config(scratch, family.learning_rates[0], 0)
    short = dataclasses.replace(full, steps=steps, tokens=0, eval_every=steps, save_every=0,
                                warmup_steps=min(full.warmup_steps, steps))
    scratch.mkdir(parents=True)
    link_shared_data(out_dir, short, scratch)
    start, cpu = time.perf_counter(), time.process_time()
    trainer = Pretrainer(short)
    trainer.run()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    records = [r for r in read_metrics(scratch / "metrics.jsonl") if "tokens_per_s" in r]
    seconds = [trainer.tokens_per_step / r["tokens_per_s"] for r in records]
    start = time.perf_counter()
    trainer.evaluate()
    eval_s = time.perf_counter() - start
    step_s = statistics.median(seconds[1:])
    evals = full.total_steps // full.eval_every if full.eval_every else 1
    return {"steps": full.total_steps, "step_s": step_s, "cpu_step_s": cpu / steps,
            "eval_s": eval_s, "evals": evals,
            "overhead_s": max(0.0, wall - sum(seconds[1:]) - len(seconds[:1]) * step_s)}


def _time_vision(family: Family, scratch: Path, steps: int, out_dir: Path) -> dict[str, Any]:
    full: VisionConfig = family.config(scratch, family.learning_rates[0], 0)
    short = dataclasses.replace(full, steps=steps, eval_every=steps)
    data = load_dataset(full.dataset)
    start, cpu = time.perf_counter(), time.process_time()
    train_vision(dataclasses.replace(short, steps=1), data)  # compile and set-up
    once = time.perf_counter() - start
    start = time.perf_counter()
    train_vision(short, data)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    step_s = wall / steps
    return {"steps": full.steps, "step_s": step_s, "cpu_step_s": cpu / (steps + 1),
            "eval_s": max(0.0, once - step_s), "evals": math.ceil(full.steps / full.eval_every),
            "overhead_s": 0.0}
