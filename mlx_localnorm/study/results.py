"""One row per run from its ``metrics.jsonl``, the study's CSV files and its Markdown table."""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..data._io import atomic_open

# Columns of results.csv (language-model runs) and vision_results.csv.
LM_COLUMNS = ("family", "group", "config", "lr", "seed", "selected", "final_val_loss",
              "best_val_loss", "tokens_to_target", "tokens_per_s", "peak_memory_mb",
              "loss_spikes", "diverged", "steps", "tokens", "run_dir")
VISION_COLUMNS = ("family", "group", "config", "lr", "seed", "selected", "final_val_loss",
                  "best_val_loss", "final_val_accuracy", "best_val_accuracy", "loss_spikes",
                  "diverged", "steps", "run_dir")
# Median of this many previous training losses is the reference of a spike.
SPIKE_WINDOW = 20


def count_spikes(losses: Sequence[float], threshold: float,
                 window: int = SPIKE_WINDOW) -> int:
    """Loss spikes: steps whose loss exceeds the median of the ``window`` steps before it by
    more than ``threshold`` nats. Consecutive spiking steps are one spike; the first
    ``window`` steps (the initial fall) are never spikes."""
    spikes, inside = 0, False
    for t in range(window, len(losses)):
        high = losses[t] > statistics.median(losses[t - window:t]) + threshold
        spikes += high and not inside
        inside = high
    return spikes


def summarize(records: list[dict[str, Any]], diverged: bool, target_loss: float,
              spike_threshold: float) -> dict[str, Any]:
    """A run's measures from its metrics records (NaN where a run has none)."""
    train = [r for r in records if "loss" in r and math.isfinite(r["loss"])]
    evals = [r for r in records if "val_loss" in r]
    val = [r["val_loss"] for r in evals]
    speeds = [r["tokens_per_s"] for r in train[1:] if "tokens_per_s" in r]  # [0]: compiling
    row = {
        "final_val_loss": math.nan if diverged or not val else val[-1],
        "best_val_loss": min(val, default=math.nan),
        "tokens_to_target": next((r["tokens"] for r in evals if r["val_loss"] <= target_loss),
                                 math.nan),
        "tokens_per_s": statistics.median(speeds) if speeds else math.nan,
        "loss_spikes": count_spikes([r["loss"] for r in train], spike_threshold),
        "diverged": "yes" if diverged else "no",
        "steps": records[-1]["step"] if records else 0,
        "tokens": records[-1].get("tokens", 0) if records else 0,
    }
    if any("val_accuracy" in r for r in evals):
        accuracy = [r["val_accuracy"] for r in evals]
        row["final_val_accuracy"] = math.nan if diverged else accuracy[-1]
        row["best_val_accuracy"] = max(accuracy)
    return row


def write_csv(rows: list[dict[str, Any]], path: str | Path, columns: Sequence[str]) -> Path:
    """Write ``rows`` (missing columns empty) to ``path`` atomically."""
    path = Path(path)
    with atomic_open(path, "w") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({k: _cell(row.get(k)) for k in columns} for row in rows)
    return path


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return "" if value is None else value


def family_stats(rows: list[dict[str, Any]], measure: str = "final_val_loss"
                 ) -> dict[str, dict[str, Any]]:
    """Per family (selected learning rate only): mean, sample std and count of ``measure``
    over its finished seeds, and how many seeds diverged."""
    stats: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row["selected"] != "yes":
            continue
        entry = stats.setdefault(row["family"], {"group": row["group"], "lr": row["lr"],
                                                 "values": [], "diverged": 0, "seeds": 0})
        entry["seeds"] += 1
        entry["diverged"] += row["diverged"] == "yes"
        if not math.isnan(row.get(measure, math.nan)):
            entry["values"].append(row[measure])
    for entry in stats.values():
        values = entry["values"]
        entry["mean"] = statistics.fmean(values) if values else math.nan
        entry["std"] = statistics.stdev(values) if len(values) > 1 else math.nan
    return stats


def markdown_table(rows: list[dict[str, Any]], measure: str = "final_val_loss") -> str:
    """Per family: the selected learning rate and ``measure`` as mean +- std over seeds."""
    lines = [f"| group | family | lr | {measure} (mean +- std) | seeds | diverged |",
             "|---|---|---|---|---|---|"]
    for family, s in family_stats(rows, measure).items():
        spread = "" if math.isnan(s["std"]) else f" +- {s['std']:.4f}"
        lines.append(f"| {s['group']} | {family} | {s['lr']:g} | {s['mean']:.4f}{spread} | "
                     f"{s['seeds']} | {s['diverged']} |")
    return "\n".join(lines) + "\n"
