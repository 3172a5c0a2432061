"""``mlx-localnorm study --grid FILE``: run a grid of runs, resumably, and write the results.

A bad command line exits 2, a bad grid file, corpus or run directory 1, each with one line
on stderr; Ctrl-C checkpoints the current run and exits 130 (run the command again to
continue where it stopped).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .._argparse import OneLineParser

PROG = "mlx-localnorm study"


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog=PROG, description="Run a grid of pre-training (and conv "
                           "classifier) runs, resumably; write results.csv, tables and plots.")
    parser.add_argument("--grid", required=True, help="grid file (TOML or JSON)")
    parser.add_argument("--out", default="runs/study",
                        help="study directory: runs/, results.csv, plots (default: runs/study)")
    parser.add_argument("--seeds", type=int, nargs="+",
                        help="seeds to run instead of the grid's (e.g. --seeds 0)")
    parser.add_argument("--publish", metavar="DIR",
                        help="then copy the report (CSV, tables, plots, diagnostics; not the "
                        "runs) to DIR, e.g. docs/study")
    parser.add_argument("--jobs", type=_positive_int, default=1,
                        help="families trained at once, each in its own process (default 1; "
                        "up to one per core helps)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--estimate", action="store_true",
                        help="time a few steps of each family and estimate the grid's "
                        "duration (OUT/estimate.csv) instead of running it")
    return parser


def main(argv: list[str] | None = None) -> int:
    from .grid import check_seeds, read_grid
    from .runner import Study, StudyInterrupted, publish

    args = build_parser().parse_args(argv)
    try:
        if args.seeds is not None:
            check_seeds(args.seeds, "--seeds")
    except ValueError as err:
        return _fail(err, 2)
    try:
        grid = read_grid(args.grid)
    except (ValueError, TypeError) as err:
        return _fail(err, 1)
    try:
        if args.estimate:
            return _estimate(grid, args)
        Study(grid, args.out, args.seeds, progress=not args.no_progress).run(args.jobs)
        if args.publish:
            publish(args.out, args.publish)
    except (ValueError, ImportError) as err:  # corpus, run directory, a missing extra
        return _fail(err, 1)
    except (StudyInterrupted, KeyboardInterrupt) as err:
        print(f"{PROG}: interrupted ({str(err) or 'Ctrl-C'}); run the same command again to "
              "continue", file=sys.stderr)
        return 130
    out = Path(args.out)
    print(f"Results: {out / 'results.csv'}, table: {out / 'table.md'}, plots: {out}/*.png"
          + (f"; copied to {args.publish}" if args.publish else ""))
    return 0


def _estimate(grid, args) -> int:
    from .estimate import estimate

    rows = estimate(grid, args.out, args.seeds)
    for row in rows:
        print(f"{row['family']:<28} {row['runs']} runs x {row['cpu_run_s']:7.1f} CPU s "
              f"(step {row['cpu_step_s'] * 1e3:6.1f} ms CPU, {row['wall_step_s'] * 1e3:6.1f} "
              "ms wall)")
    cpu = sum(r["cpu_family_s"] for r in rows)
    wall = sum(r["wall_family_s"] for r in rows)
    print(f"Total: {cpu / 3600:.2f} h of CPU time (the upper end on an idle machine); "
          f"{wall / 3600:.2f} h wall-clock at this load (1-min load average "
          f"{rows[-1]['load_avg']:.1f}). Per family: {Path(args.out) / 'estimate.csv'}")
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}")
    return value


def _fail(error: BaseException, status: int) -> int:
    print(f"{PROG}: error: {' '.join(str(error).split())}", file=sys.stderr)
    return status
