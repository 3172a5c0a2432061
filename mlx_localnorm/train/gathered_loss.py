"""Masked cross-entropy with the LM head run only on the positions the loss trains on.

In fine-tuning most positions of a batch carry no loss: prompts are masked and rows padded.
The head and its softmax (``B T D V`` multiply-adds and ``B T V`` exponentials, each way)
are a third of a LoRA step of the demo model; gathering the ``K`` trained positions'
hidden states first makes that ``K D V``. The loss is the same masked mean as
:func:`~mlx_localnorm.data.sft.masked_cross_entropy` over full logits, summed in another
order. ``K`` is fixed per batch width (:meth:`SFTBatches.trained_bound`), so the compiled
step traces once per width, as it does for the batch itself.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np


def splits_head(model: nn.Module) -> bool:
    """Whether ``model`` has the ``hidden_states`` and ``head`` methods (as the package's
    ``Model``) that :func:`gathered_cross_entropy` calls."""
    return all(callable(getattr(type(model), name, None)) for name in ("hidden_states", "head"))


def gather_plan(mask: mx.array, size: int) -> tuple[mx.array, mx.array]:
    """``(positions, weights)``: the flat indices of ``mask``'s nonzero entries and their
    values, padded to ``size`` (at least 1: the softmax needs a row even when nothing is
    trained) with index 0 and weight 0 (the padding adds nothing)."""
    flat = np.array(mask, np.float32).reshape(-1)
    where = np.flatnonzero(flat)
    if len(where) > size:
        raise ValueError(f"gather_plan: mask has {len(where)} nonzero positions, more than "
                         f"size={size}")
    size = max(size, 1)
    positions, weights = np.zeros(size, np.int32), np.zeros(size, np.float32)
    positions[: len(where)], weights[: len(where)] = where, flat[where]
    return mx.array(positions), mx.array(weights)


def gathered_cross_entropy(model: nn.Module, inputs: mx.array, targets: mx.array,
                           positions: mx.array, weights: mx.array) -> mx.array:
    r"""Mean next-token cross-entropy over the gathered positions:

    .. math:: L = \frac{\sum_k w_k\,\mathrm{CE}(\mathrm{head}(h_{p_k}), y_{p_k})}
                       {\max(1, \sum_k w_k)}

    with ``h = model.hidden_states(inputs)`` flattened to ``(B T, D)``, ``p = positions``,
    ``w = weights`` (from :func:`gather_plan`) and ``y`` the flattened ``targets``; summed in
    float32.
    """
    h = model.hidden_states(inputs)
    rows = h.reshape(-1, h.shape[-1])[positions]
    ce = nn.losses.cross_entropy(model.head(rows), targets.reshape(-1)[positions])
    return (ce.astype(mx.float32) * weights).sum() / mx.maximum(weights.sum(), 1.0)
