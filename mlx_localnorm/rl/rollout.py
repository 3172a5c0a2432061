"""Rollouts: log-probabilities of sampled tokens under a model."""

from __future__ import annotations

import mlx.core as mx
from mlx import nn


def token_logprobs(model: nn.Module, tokens: mx.array) -> mx.array:
    r"""``[B, L-1]`` log-probabilities :math:`\log p(x_{t+1} \mid x_{\le t})` of ``tokens[:, 1:]``.

    ``tokens`` is ``[B, L]`` (prompt then completion); ``model`` is any mlx-lm model
    (``model(inputs) -> logits``). Computed in float32 as ``logit - logsumexp(logits)``.
    """
    if not isinstance(tokens, mx.array) or tokens.ndim != 2 or tokens.shape[1] < 2:
        shape = tuple(tokens.shape) if isinstance(tokens, mx.array) else type(tokens).__name__
        raise ValueError(f"token_logprobs: tokens must be a 2-D mx.array [batch, length >= 2], "
                         f"got {shape}")
    logits = model(tokens[:, :-1]).astype(mx.float32)
    picked = mx.take_along_axis(logits, tokens[:, 1:, None], axis=-1)[..., 0]
    return picked - mx.logsumexp(logits, axis=-1)
