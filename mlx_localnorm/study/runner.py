"""The study runner: every family's learning-rate sweep, then its other seeds; resumable.

Per family the first seed runs at every learning rate of its sweep; the rate with the
lowest final validation loss (a diverged run counts as infinitely bad; if all diverge, the
first listed rate) then runs on the other seeds. Each run lives in
``OUT/runs/FAMILY/lr<rate>-seed<seed>/`` and is done once its ``summary.json`` exists:
finished runs are skipped, an interrupted one resumes from its checkpoint. Language-model
runs of the same corpus and tokenizer share one tokenizer and token files (``OUT/data/``),
so they see exactly the same tokens.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import mlx.core as mx

from ..data import prepare_data
from ..train import Pretrainer, list_checkpoints, read_metrics, resume_config
from .grid import GROUP_SEPARATOR, Family, Grid
from .results import LM_COLUMNS, VISION_COLUMNS, markdown_table, summarize, write_csv
from .vision import load_dataset, train_vision

SUMMARY = "summary.json"


class StudyInterrupted(Exception):
    """Ctrl-C stopped a run; it has checkpointed and the study resumes where it stopped."""


def run_path(out_dir: str | Path, family: str, lr: float, seed: int) -> Path:
    return Path(out_dir) / "runs" / family / f"lr{lr:g}-seed{seed}"


class Study:
    """A grid's runs under ``out_dir`` (see the module docstring)."""

    def __init__(self, grid: Grid, out_dir: str | Path, seeds: tuple[int, ...] | None = None,
                 progress: bool = True):
        self.grid, self.out_dir = grid, Path(out_dir)
        self.seeds = tuple(seeds or grid.seeds)
        self.progress = progress
        self._datasets: dict[str, dict] = {}

    @property
    def total_runs(self) -> int:
        return sum(len(f.learning_rates) + len(self.seeds) - 1 for f in self.grid.families)

    def run(self, jobs: int = 1) -> list[dict[str, Any]]:
        """Run (or skip) every run, then write the CSV files, the table and the plots.

        ``jobs`` families train at once, each in its own process (one per core is the most
        that helps); the results do not depend on it, only the wall-clock does.
        """
        from tqdm.auto import tqdm

        if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
            raise ValueError(f"Study.run: jobs must be a positive int, got {jobs!r}")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with tqdm(total=self.total_runs, desc="study", unit="run", dynamic_ncols=True,
                  disable=not self.progress) as self.bar:
            if jobs == 1:
                rows = [row for family in self.grid.families for row in self._family(family)]
            else:
                rows = self._run_parallel(jobs)
        self.report(rows)
        return rows

    def _run_parallel(self, jobs: int) -> list[dict[str, Any]]:
        """Every family in a pool of ``jobs`` processes; the rows in the grid's order."""
        # The shared token files are made once, here: workers making them at once would clash.
        for family in self.grid.families:
            if family.kind == "lm":
                directory = run_path(self.out_dir, family.name, family.learning_rates[0], 0)
                shared_data(self.out_dir, family.config(directory, family.learning_rates[0], 0))
        context = multiprocessing.get_context("spawn")  # MLX state must not be forked
        stop = context.Event()
        names = [family.name for family in self.grid.families]
        done: dict[str, list[dict[str, Any]]] = {}
        pool = context.Pool(min(jobs, len(names)), initializer=_start_worker, initargs=(stop,))
        try:
            tasks = [(self.grid, self.out_dir, self.seeds, name) for name in names]
            for name, rows in pool.imap_unordered(_family_rows, tasks):
                done[name] = rows
                self.bar.update(len(rows))
        except BaseException:
            stop.set()  # the workers' current runs checkpoint (Ctrl-C); none starts another
            raise
        finally:
            pool.close()
            pool.join()
        return [row for name in names for row in done[name]]

    def _family(self, family: Family) -> list[dict[str, Any]]:
        first, others = self.seeds[0], self.seeds[1:]
        sweep = [self._run(family, lr, first) for lr in family.learning_rates]
        best = min(sweep, key=lambda r: _finite_or_inf(r["final_val_loss"]))["lr"]
        rows = sweep + [self._run(family, best, seed) for seed in others]
        return [{**row, "selected": "yes" if row["lr"] == best else "no"} for row in rows]

    def _run(self, family: Family, lr: float, seed: int) -> dict[str, Any]:
        """A run's row: what ``summary.json`` recorded when it finished (whether it diverged,
        its peak memory) and the measures of its metrics, computed again each time so that
        a changed ``target_loss`` or ``spike_threshold`` applies to finished runs too."""
        directory = run_path(self.out_dir, family.name, lr, seed)
        done = directory / SUMMARY
        if not done.is_file():
            if _STOP is not None and _STOP.is_set():
                raise StudyInterrupted(f"stopped before {directory}")
            self.bar.set_postfix_str(f"{family.name} lr={lr:g} seed={seed}")
            config = family.config(directory, lr, seed)
            directory.mkdir(parents=True, exist_ok=True)
            train = self._train_lm if family.kind == "lm" else self._train_vision
            diverged, peak_mb = train(config)
            _write_json(done, {"diverged": diverged, "peak_memory_mb": peak_mb})
        self.bar.update(1)
        facts = json.loads(done.read_text())
        return {"family": family.name, "group": family.group, "kind": family.kind,
                "config": family.describe(), "lr": lr, "seed": seed,
                "run_dir": str(directory.relative_to(self.out_dir)),
                "peak_memory_mb": facts["peak_memory_mb"],
                **summarize(read_metrics(directory / "metrics.jsonl"), facts["diverged"],
                            self.grid.target_loss, self.grid.spike_threshold)}

    def _train_lm(self, config) -> tuple[bool, float]:
        """Train one LM run (resuming its checkpoint); ``(diverged, peak memory in MB)``."""
        directory = Path(config.out_dir)
        resume = bool(list_checkpoints(directory))
        if resume:  # raises if the grid changed what this run trains
            resume_config(directory, config.to_dict())
        else:
            link_shared_data(self.out_dir, config, directory)
        mx.reset_peak_memory()
        try:
            summary = Pretrainer(config, resume=resume).run()
        except FloatingPointError:
            return True, mx.get_peak_memory() / 1e6
        if summary["interrupted"]:
            raise StudyInterrupted(f"stopped in {directory} at step {summary['step']}")
        return False, mx.get_peak_memory() / 1e6

    def _train_vision(self, config) -> tuple[bool, float]:
        if config.dataset not in self._datasets:
            self._datasets[config.dataset] = load_dataset(config.dataset)
        mx.reset_peak_memory()
        try:
            train_vision(config, self._datasets[config.dataset])
        except FloatingPointError:
            return True, mx.get_peak_memory() / 1e6
        return False, mx.get_peak_memory() / 1e6

    def report(self, rows: list[dict[str, Any]]) -> None:
        """results.csv, vision_results.csv, table.md, the plots and the diagnostics."""
        from .plots import plot_curves, plot_final

        for kind, columns, name, measure in (
                ("lm", LM_COLUMNS, "results", "final_val_loss"),
                ("vision", VISION_COLUMNS, "vision_results", "final_val_accuracy")):
            chosen = [r for r in rows if r["kind"] == kind]
            if not chosen:
                continue
            write_csv(chosen, self.out_dir / f"{name}.csv", columns)
            prefix = "" if kind == "lm" else "vision_"
            _write_text(self.out_dir / f"{prefix}table.md", markdown_table(chosen, measure)
                        + ("" if kind == "lm" else "\n" + markdown_table(chosen, "final_val_loss")))
            plot_curves(chosen, self.out_dir, self.out_dir / f"{prefix}loss_curves.png")
            plot_final(chosen, self.out_dir / f"{prefix}final_val_loss.png")
            if kind == "vision":
                plot_curves(chosen, self.out_dir, self.out_dir / "vision_accuracy_curves.png",
                            key="val_accuracy")
                plot_final(chosen, self.out_dir / "vision_final_val_accuracy.png",
                           measure="final_val_accuracy")
        if self.grid.diagnose:
            self._diagnose(rows)

    def _diagnose(self, rows: list[dict[str, Any]]) -> None:
        """Per group, the diagnostics of each family's selected first-seed run."""
        from .diagnose import diagnose_runs

        groups: dict[str, list[tuple[str, Path]]] = {}
        for row in rows:
            if (row["kind"] == "lm" and row["selected"] == "yes" and row["seed"] == self.seeds[0]
                    and row["diverged"] == "no"):
                for group in row["group"].split(GROUP_SEPARATOR):
                    groups.setdefault(group, []).append(
                        (row["family"], self.out_dir / row["run_dir"]))
        for group, runs in groups.items():
            diagnose_runs(runs, self.out_dir / "diagnostics" / group, title=group)


# Set in a worker process of Study.run(jobs > 1): the main process asks the workers to stop.
_STOP = None


def _start_worker(stop) -> None:
    global _STOP
    _STOP = stop
    # Ctrl-C between runs is the main process's to handle; a run's own handler (the training
    # loop's) still checkpoints and stops it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _family_rows(task) -> tuple[str, list[dict[str, Any]]]:
    """One family's rows, in a worker process."""
    from tqdm.auto import tqdm

    grid, out_dir, seeds, name = task
    study = Study(grid, out_dir, seeds, progress=False)
    study.bar = tqdm(disable=True)
    family = next(f for f in grid.families if f.name == name)
    return name, study._family(family)


def shared_data(out_dir: Path, config) -> Path:
    """The study's tokenizer and token files for ``config``'s corpus (made once)."""
    corpus = config.corpus
    shared = Path(out_dir) / "data" / (
        f"{Path(corpus).name}-{config.tokenizer_type}{config.vocab_size}")
    prepare_data(None if corpus == "shakespeare" else corpus, shared, config.vocab_size,
                 config.tokenizer_type)
    return shared


def link_shared_data(out_dir: Path, config, directory: Path) -> None:
    """Hard-link (or copy) the shared tokenizer and token files into a new run."""
    shared = shared_data(out_dir, config)
    for item in shared.iterdir():
        if item.is_file() and not (directory / item.name).exists():
            try:
                os.link(item, directory / item.name)
            except OSError:  # another file system, or links not allowed
                shutil.copy2(item, directory / item.name)


def publish(out_dir: str | Path, dest: str | Path) -> list[Path]:
    """Copy the study's report (CSV files, tables, plots, grouped diagnostics) from
    ``out_dir`` to ``dest`` (e.g. ``docs/study``), without the runs themselves."""
    out_dir, dest = Path(out_dir), Path(dest)
    report = [p for pattern in ("*.csv", "*.md", "*.png", "diagnostics/*/diagnostics.*")
              for p in sorted(out_dir.glob(pattern))]
    copied = []
    for path in report:
        target = dest / path.relative_to(out_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        shutil.copyfile(path, tmp)
        os.replace(tmp, target)
        copied.append(target)
    return copied


def _finite_or_inf(value: float) -> float:
    return value if math.isfinite(value) else math.inf


def _write_json(path: Path, value: Any) -> None:
    _write_text(path, json.dumps(value, indent=1))


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
