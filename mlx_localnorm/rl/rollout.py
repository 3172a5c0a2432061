"""Rollouts: G sampled completions per prompt in one batched generation, completions of
text prompts, and the log-probabilities of sampled tokens under a model."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx
from mlx import nn
from mlx_lm.generate import BatchGenerator
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import make_sampler

from ..ops._checks import check_size
from .advantages import _check_group_size


def token_logprobs(model: nn.Module, tokens: mx.array) -> mx.array:
    r"""``[B, L-1]`` log-probabilities :math:`\log p(x_{t+1} \mid x_{\le t})` of ``tokens[:, 1:]``.

    ``tokens`` is ``[B, L]`` (prompt then completion); ``model`` is any mlx-lm model
    (``model(inputs) -> logits``). Computed in float32 as ``logit - logsumexp(logits)``.
    """
    owner = "token_logprobs"
    if not isinstance(tokens, mx.array):
        raise TypeError(f"{owner}: tokens must be an mx.array, got {type(tokens).__name__}")
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise ValueError(f"{owner}: tokens must be 2-D [batch, length >= 2], "
                         f"got shape {tuple(tokens.shape)}")
    if not mx.issubdtype(tokens.dtype, mx.integer):
        raise TypeError(f"{owner}: tokens must hold integer token ids, got {tokens.dtype}")
    logits = model(tokens[:, :-1]).astype(mx.float32)
    picked = mx.take_along_axis(logits, tokens[:, 1:, None], axis=-1)[..., 0]
    return picked - mx.logsumexp(logits, axis=-1)


@dataclass
class Rollout:
    """Completions of one batched generation, laid out for :func:`policy_loss`.

    Row ``i * group_size + j`` is completion ``j`` of prompt ``i``. ``tokens`` is
    ``[B, L]``: prompt, completion (with its stop token, if it stopped), then padding.
    ``mask`` and ``logprobs`` are ``[B, L-1]``, aligned with
    ``token_logprobs(model, tokens)``: true / the sampling model's log-probability where the
    next token is a completion token, false / 0 elsewhere.
    """

    tokens: mx.array
    mask: mx.array
    logprobs: mx.array
    completions: list[list[int]]
    finish_reasons: list[str]


def _check_prompts(prompts, owner: str) -> list[list[int]]:
    if not isinstance(prompts, Sequence) or not prompts:
        raise ValueError(f"{owner}: prompts must be a non-empty list of token-id lists, "
                         f"got {prompts!r}")
    for i, p in enumerate(prompts):
        if not isinstance(p, Sequence) or not p or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in p):
            raise ValueError(f"{owner}: prompts[{i}] must be a non-empty list of token ids, "
                             f"got {p!r}")
    return [list(p) for p in prompts]


def _prefill(model: nn.Module, prompt: list[int]) -> list:
    """mlx-lm's KV cache of ``prompt[:-1]``: its last token starts the decode."""
    cache = make_prompt_cache(model)
    if len(prompt) > 1:
        model(mx.array([prompt[:-1]]), cache=cache)
        mx.eval([c.state for c in cache])
    return cache


def _generate(model, prompts, group_size, max_tokens, sampler, stop_tokens):
    """(completion tokens, their log-probabilities, finish reason) for ``group_size``
    completions of each prompt, in order, decoded in one batch."""
    n = len(prompts) * group_size
    # Each prompt is prefilled once; its group decodes from copies of that cache.
    caches = [_prefill(model, p) for p in prompts]
    gen = BatchGenerator(model, max_tokens=max_tokens, sampler=sampler,
                         stop_tokens=[[t] for t in stop_tokens] or None,
                         completion_batch_size=n, prefill_batch_size=n)
    try:
        uids = gen.insert([[p[-1]] for p in prompts for _ in range(group_size)],
                          caches=[c for c in caches for _ in range(group_size)],
                          all_tokens=[p[:-1] for p in prompts for _ in range(group_size)])
        tokens = {uid: [] for uid in uids}
        logprobs = {uid: [] for uid in uids}
        finish = {}
        while responses := gen.next_generated():
            # One read per step: holding every step's full-vocabulary vector would cost B*T*V.
            picked = mx.stack([r.logprobs[r.token] for r in responses]).tolist()
            for r, lp in zip(responses, picked):
                tokens[r.uid].append(r.token)
                logprobs[r.uid].append(lp)
                if r.finish_reason is not None:
                    finish[r.uid] = r.finish_reason
    finally:
        gen.close()
    return [(tokens[u], logprobs[u], finish[u]) for u in uids]


def rollout(model: nn.Module, prompts: Sequence[Sequence[int]], group_size: int, *,
            max_tokens: int, sampler=None, stop_tokens: Sequence[int] = (),
            pad_id: int = 0) -> Rollout:
    """Sample ``group_size`` completions of each prompt in one batched generation.

    Uses mlx-lm's ``BatchGenerator`` (batched KV caches, its samplers): ``sampler`` is an
    mlx-lm sampler, default ``make_sampler(temp=1.0)``; a completion ends after
    ``max_tokens`` tokens or at one of ``stop_tokens`` (kept in the completion, so the
    policy learns to stop). The log-probabilities are of the model's distribution before the
    sampler (no temperature), as :func:`token_logprobs` recomputes them.
    """
    owner = "rollout"
    prompts = _check_prompts(prompts, owner)
    _check_group_size(group_size, owner)
    check_size(max_tokens, "max_tokens", owner)
    sampler = sampler or make_sampler(temp=1.0)
    repeated = [p for p in prompts for _ in range(group_size)]
    results = _generate(model, prompts, group_size, max_tokens, sampler, list(stop_tokens))

    width = max(len(p) + len(c) for p, (c, _, _) in zip(repeated, results))
    tokens, mask, logprobs = [], [], []
    for prompt, (completion, lps, _) in zip(repeated, results):
        pad = width - len(prompt) - len(completion)
        tokens.append(prompt + completion + [pad_id] * pad)
        # Position t predicts token t + 1: the completion starts at len(prompt) - 1.
        before = len(prompt) - 1
        mask.append([False] * before + [True] * len(completion) + [False] * pad)
        logprobs.append([0.0] * before + lps + [0.0] * pad)
    return Rollout(tokens=mx.array(tokens), mask=mx.array(mask),
                   logprobs=mx.array(logprobs, dtype=mx.float32),
                   completions=[c for c, _, _ in results],
                   finish_reasons=[f for _, _, f in results])


def decode_completions(tokenizer, completions: Sequence[list[int]],
                       finish_reasons: Sequence[str]) -> list[str]:
    """The text of each completion; a stop token ends it but is not part of its text."""
    return [tokenizer.decode(c[:-1] if reason == "stop" else c)
            for c, reason in zip(completions, finish_reasons)]


def complete(model: nn.Module, tokenizer, prompts: Sequence[str], *, max_tokens: int,
             sampler=None, stop_tokens: Sequence[int] | None = None) -> list[str]:
    """One completion per text prompt, all in one batched generation (greedy by default).

    ``tokenizer`` needs ``encode``, ``decode`` and, unless ``stop_tokens`` is given,
    ``eos_token_ids`` (mlx-lm's ``TokenizerWrapper`` has them).
    """
    owner = "complete"
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts:
        raise ValueError(f"{owner}: prompts must be a non-empty list of strings, got {prompts!r}")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"{owner}: prompts[{i}] must be a string, got {p!r}")
    check_size(max_tokens, "max_tokens", owner)
    stop = tokenizer.eos_token_ids if stop_tokens is None else stop_tokens
    results = _generate(model, [tokenizer.encode(p) for p in prompts], 1, max_tokens,
                        sampler or make_sampler(temp=0.0), list(stop))
    return decode_completions(tokenizer, [c for c, _, _ in results], [f for _, _, f in results])
