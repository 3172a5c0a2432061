"""The study's figures: validation curves per family and final values with error bars."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from ..train import read_metrics
from ..train.metrics import save_figure
from .grid import GROUP_SEPARATOR
from .results import family_stats


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _grouped(rows: list[dict[str, Any]]) -> dict[str, dict[str, list[dict]]]:
    """group -> family -> its selected rows (in the order they came)."""
    groups: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        if row["selected"] == "yes":
            for group in row["group"].split(GROUP_SEPARATOR):
                groups[group][row["family"]].append(row)
    return groups


def _grid_axes(count: int, width: float = 5.5, height: float = 3.8):
    plt = _pyplot()
    cols = min(count, 3)
    rows = math.ceil(count / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    return fig, axes.flat


def plot_curves(rows: list[dict[str, Any]], out_dir: str | Path, path: str | Path,
                key: str = "val_loss") -> Path:
    """One panel per group: each family's mean ``key`` over its seeds against the tokens (or
    examples) seen, shaded between the seeds' minimum and maximum."""
    groups = _grouped(rows)
    fig, axes = _grid_axes(len(groups))
    for ax, (group, families) in zip(axes, groups.items()):
        for family, runs in families.items():
            curves = [[(r["tokens"], r[key]) for r in read_metrics(
                Path(out_dir) / run["run_dir"] / "metrics.jsonl") if key in r] for run in runs]
            length = min(len(c) for c in curves)
            if length == 0:
                continue
            x = [t for t, _ in curves[0][:length]]
            values = np.array([[v for _, v in c[:length]] for c in curves])
            line, = ax.plot(x, values.mean(axis=0), label=f"{family} ({len(curves)} seeds)")
            ax.fill_between(x, values.min(axis=0), values.max(axis=0), alpha=0.2,
                            color=line.get_color())
        ax.set_title(group)
        ax.set_xlabel("tokens" if rows[0]["kind"] == "lm" else "examples")
        ax.set_ylabel(key.replace("_", " "))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_final(rows: list[dict[str, Any]], path: str | Path,
               measure: str = "final_val_loss") -> Path:
    """Per family: ``measure`` of each seed (dots) and their mean +- std (bar), per group."""
    stats = family_stats(rows, measure)
    groups = _grouped(rows)
    fig, axes = _grid_axes(len(groups), height=0.5 + 0.45 * max(
        len(f) for f in groups.values()))
    for ax, (group, families) in zip(axes, groups.items()):
        names = list(families)
        for y, name in enumerate(names):
            s = stats[name]
            ax.errorbar(s["mean"], y, xerr=0 if math.isnan(s["std"]) else s["std"], fmt="o",
                        capsize=4, color="C0")
            ax.plot(s["values"], [y] * len(s["values"]), "x", color="C1", alpha=0.7)
            if s["diverged"]:
                ax.annotate(f"{s['diverged']} diverged", (s["mean"], y), fontsize=7,
                            xytext=(6, 4), textcoords="offset points", color="C3")
        ax.set_yticks(range(len(names)), [f"{n} (lr {stats[n]['lr']:g})" for n in names],
                      fontsize=8)
        ax.set_title(group)
        ax.set_xlabel(f"{measure.replace('_', ' ')} (mean +- std over seeds, x: each seed)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)
