"""Learning-rate schedules as functions of the optimizer step (traceable by ``mx.compile``)."""

from __future__ import annotations

import math
from collections.abc import Callable

import mlx.core as mx


def lr_schedule(peak: float, steps: int, warmup: int = 0, kind: str = "cosine",
                min_ratio: float = 0.1, decay_fraction: float = 0.2) -> Callable:
    """``lr(step) = peak * warmup(step) * shape(step)`` for 0-based optimizer steps.

    Warm-up is linear from ``peak / warmup`` at step 0 to ``peak`` at ``warmup - 1`` (MLX's
    ``linear_schedule`` starts at 0, which wastes the first step). ``shape`` is 1 for
    "constant"; "cosine" decays from 1 to ``min_ratio`` between warm-up and ``steps``;
    "wsd" (warmup-stable-decay, arXiv 2404.06395) holds 1 and decays linearly to
    ``min_ratio`` over the last ``decay_fraction`` of the steps.
    """
    def schedule(step: mx.array) -> mx.array:
        step = mx.array(step, dtype=mx.float32)
        lr = mx.array(peak, dtype=mx.float32)
        if warmup > 0:
            lr = lr * mx.minimum(1.0, (step + 1) / warmup)
        if kind == "cosine":
            progress = mx.clip((step - warmup) / max(1, steps - warmup), 0.0, 1.0)
            lr = lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + mx.cos(math.pi * progress)))
        elif kind == "wsd":
            start = steps * (1 - decay_fraction)
            progress = mx.clip((step - start) / max(1.0, steps - start), 0.0, 1.0)
            lr = lr * (1 - (1 - min_ratio) * progress)
        return lr

    return schedule
