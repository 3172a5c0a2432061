"""The reward curve of a GRPO run as one PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..train.metrics import save_figure


def _band(ax, records: list[dict[str, Any]], key: str, label: str) -> None:
    """``key``'s mean per step with a +-1 std band (``key_std``) where it is logged."""
    rows = [r for r in records if key in r]
    if not rows:
        return
    steps = np.array([r["step"] for r in rows])
    mean = np.array([r[key] for r in rows])
    ax.plot(steps, mean, lw=0.8, label=label)
    std_key = "reward_std" if key == "reward_mean" else f"{key}_std"
    if all(std_key in r for r in rows):
        std = np.array([r[std_key] for r in rows])
        ax.fill_between(steps, mean - std, mean + std, alpha=0.2)


def plot_rewards(records: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Training and held-out reward, KL and clip fraction, and completion length per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_reward, ax_policy, ax_length) = plt.subplots(1, 3, figsize=(14, 4))
    _band(ax_reward, records, "reward_mean", "sampled (mean, +-std)")
    held_out = [r for r in records if "eval_reward" in r]
    if held_out:
        ax_reward.plot([r["step"] for r in held_out], [r["eval_reward"] for r in held_out],
                       "o-", label="held-out (greedy)")
        sampled = [r for r in held_out if "eval_reward_sampled" in r]
        ax_reward.plot([r["step"] for r in sampled], [r["eval_reward_sampled"] for r in sampled],
                       "s--", label="held-out (sampled)")
    ax_reward.set_ylabel("reward")
    for key in ("kl", "clip_fraction"):
        _band(ax_policy, records, key, key.replace("_", " "))
    ax_policy.set_ylabel("KL to the reference / clipped share")
    _band(ax_length, records, "completion_length", "completion length")
    ax_length.set_ylabel("tokens per completion")
    for ax in (ax_reward, ax_policy, ax_length):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)
