"""Run metrics: one JSON object per logged step in ``metrics.jsonl``, and a loss/throughput plot."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..data._io import atomic_open


class MetricsLog:
    """Appends records to ``path``; on resume drops the records past the checkpoint's step."""

    def __init__(self, path: str | Path, resume_step: int | None = None):
        self.path = Path(path)
        self.records: list[dict[str, Any]] = [] if resume_step is None else [
            r for r in read_metrics(self.path) if r["step"] <= resume_step]
        self._rewrite()

    def log(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def _rewrite(self) -> None:
        # A full disk or Ctrl-C leaves the old file and no stray copy.
        with atomic_open(self.path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in self.records)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (a torn last line from a crash is skipped)."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def plot_metrics(records: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Training and validation loss against tokens, and throughput, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if "loss" in r]
    valid = [r for r in records if "val_loss" in r]
    fig, (ax_loss, ax_speed) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot([r["tokens"] for r in train], [r["loss"] for r in train], lw=0.8,
                 label="train")
    if valid:
        ax_loss.plot([r["tokens"] for r in valid], [r["val_loss"] for r in valid], "o-",
                     label="validation")
    ax_loss.set_xlabel("tokens")
    ax_loss.set_ylabel("cross-entropy (nats/token)")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    timed = [r for r in train if r.get("tokens_per_s")]
    ax_speed.plot([r["step"] for r in timed], [r["tokens_per_s"] for r in timed], lw=0.8)
    ax_speed.set_xlabel("step")
    ax_speed.set_ylabel("tokens / s")
    ax_speed.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def save_figure(fig, path: str | Path) -> Path:
    """Save a matplotlib figure as PNG atomically (no half-written plot) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path
