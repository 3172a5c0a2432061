"""One GRPO-family step: rollout, rewards, advantages, policy-gradient updates."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from math import inf

import mlx.core as mx
import numpy as np
from mlx import nn
from mlx.optimizers import clip_grad_norm
from mlx_lm.sample_utils import make_sampler

from ..ops._checks import check_choice, check_flag, check_number, check_size
from .advantages import ADVANTAGE_MODES, _check_group_size, drop_equal_groups, group_advantages
from .loss import NORMALIZERS, RATIO_LEVELS, policy_loss
from .reference import adapters_off
from .rewards import RewardFn, score_completions
from .rollout import complete, decode_completions, rollout, token_logprobs


def _help(text: str, **kw):
    return field(metadata={"help": text}, **kw)


@dataclass
class GRPOOptions:
    """The algorithm of a GRPO-family step; :meth:`preset` gives each paper's settings."""

    group_size: int = _help("completions sampled per prompt (G >= 2)", default=8)
    max_tokens: int = _help("longest completion, in tokens", default=32)
    temperature: float = _help("sampling temperature of the rollouts (> 0)", default=1.0)
    advantage: str = _help("grpo, dr_grpo or rloo (see group_advantages)", default="grpo")
    ratio: str = _help("importance ratio per token, or per sequence (GSPO)", default="token")
    normalize: str = _help("loss per sequence (GRPO), token (DAPO) or constant (Dr. GRPO)",
                           default="sequence")
    eps_low: float = _help("clip the ratio below at 1 - eps_low", default=0.2)
    eps_high: float | None = _help("clip the ratio above at 1 + eps_high; none = eps_low",
                                   default=None)
    beta: float = _help("weight of the KL penalty to the reference policy", default=0.0)
    updates: int = _help("policy-gradient updates per rollout (old log-probs kept)", default=1)
    drop_equal_groups: bool = _help("DAPO: skip groups whose rewards are all equal",
                                    default=False)
    grad_clip: float = _help("clip each update's global gradient norm to this; 0 = off",
                             default=0.0)

    def __post_init__(self):
        owner = "GRPOOptions"
        _check_group_size(self.group_size, owner)
        check_size(self.max_tokens, "max_tokens", owner)
        check_number(self.temperature, "temperature", owner, "positive")
        check_choice(self.advantage, ADVANTAGE_MODES, "advantage", owner)
        check_choice(self.ratio, RATIO_LEVELS, "ratio", owner)
        check_choice(self.normalize, NORMALIZERS, "normalize", owner)
        check_number(self.eps_low, "eps_low", owner, "non_negative")
        if self.eps_high is not None:
            check_number(self.eps_high, "eps_high", owner, "non_negative")
        check_number(self.beta, "beta", owner, "non_negative")
        check_size(self.updates, "updates", owner)
        check_flag(self.drop_equal_groups, "drop_equal_groups", owner)
        check_number(self.grad_clip, "grad_clip", owner, "non_negative")

    @classmethod
    def preset(cls, name: str, **overrides) -> GRPOOptions:
        """The options of a paper (``PRESETS``), with ``overrides`` on top."""
        check_choice(name, tuple(PRESETS), "preset", "GRPOOptions.preset")
        return cls(**(PRESETS[name] | overrides))


PRESETS = {
    # arXiv 2402.03300: std-normalized advantages, per-sequence mean, KL 0.04.
    "grpo": dict(advantage="grpo", normalize="sequence", beta=0.04),
    # arXiv 2503.20783: no std division, no length normalization, no KL.
    "dr_grpo": dict(advantage="dr_grpo", normalize="constant", beta=0.0),
    # arXiv 2503.14476: clip-higher, token-level loss, dynamic sampling, no KL.
    "dapo": dict(advantage="grpo", normalize="token", eps_low=0.2, eps_high=0.28, beta=0.0,
                 drop_equal_groups=True),
    # arXiv 2507.18071: sequence-level ratio, clipped at 3e-4 / 4e-4, no KL.
    "gspo": dict(advantage="grpo", ratio="sequence", normalize="sequence", eps_low=3e-4,
                 eps_high=4e-4, beta=0.0),
}


def _check_records(records, owner: str) -> None:
    if isinstance(records, (str, dict)) or not isinstance(records, Sequence) or not records:
        raise ValueError(f"{owner}: records must be a non-empty list of "
                         f"{{\"prompt\": ...}} dicts, got {records!r}")
    for i, r in enumerate(records):
        if not isinstance(r, dict) or not isinstance(r.get("prompt"), str):
            raise ValueError(f'{owner}: records[{i}] must be a dict with a string "prompt", '
                             f"got {r!r}")


def _reference_logprobs(model, reference, tokens) -> mx.array:
    if reference is not None:
        ref = token_logprobs(reference, tokens)
        mx.eval(ref)
        return mx.stop_gradient(ref)
    with adapters_off(model):
        ref = token_logprobs(model, tokens)
        mx.eval(ref)
    return ref


def grpo_step(model: nn.Module, optimizer, tokenizer, records: Sequence[dict],
              reward: RewardFn, options: GRPOOptions, *, reference: nn.Module | None = None,
              stop_tokens: Sequence[int] | None = None) -> dict[str, float]:
    r"""Sample ``options.group_size`` completions per record's prompt, score them, and take
    ``options.updates`` policy-gradient steps with :func:`policy_loss`.

    ``tokenizer`` needs ``encode``, ``decode`` and (unless ``stop_tokens`` is given)
    ``eos_token_ids``, as mlx-lm's ``TokenizerWrapper``. With one update the loss is
    on-policy (ratio 1, gradient of :math:`\rho A`); with several, the old log-probabilities
    are recomputed once by a forward pass before the first. ``beta > 0`` needs a
    ``reference`` model, or a LoRA/DoRA ``model`` whose adapters are switched off for it.
    The rollout and the old/reference log-probabilities run in eval mode (no dropout), the
    updates in train mode; the model's own mode is restored at the end.

    Returns floats: ``reward_mean``, ``reward_std``, ``completion_length`` (and its std),
    ``groups_kept`` (all unless DAPO drops some), ``generated_tokens``,
    ``tokens_per_second`` (of the rollout), and, when an update ran, the means over the
    updates of ``loss``, ``clip_fraction``, ``ratio_mean``, ``grad_norm`` (before
    ``options.grad_clip``) and ``kl`` (with ``beta > 0``).
    """
    _check_records(records, "grpo_step")
    if not isinstance(options, GRPOOptions):
        raise TypeError(f"grpo_step: options must be a GRPOOptions, got "
                        f"{type(options).__name__}")
    with _mode(model, training=False):
        return _step(model, optimizer, tokenizer, records, reward, options, reference,
                     stop_tokens)


@contextmanager
def _mode(model: nn.Module, training: bool) -> Iterator[None]:
    """``model.train(training)`` inside the block, its previous mode restored after."""
    previous = model.training
    model.train(training)
    try:
        yield
    finally:
        model.train(previous)


def _step(model, optimizer, tokenizer, records, reward, options, reference, stop_tokens):
    """grpo_step's work, the model in eval mode: sampling and old/reference log-probs see no
    dropout; the updates switch to train mode."""
    G = options.group_size
    tic = time.perf_counter()
    out = rollout(model, [tokenizer.encode(r["prompt"]) for r in records], G,
                  max_tokens=options.max_tokens, sampler=make_sampler(temp=options.temperature),
                  stop_tokens=tokenizer.eos_token_ids if stop_tokens is None else stop_tokens)
    seconds = time.perf_counter() - tic
    rewards = score_completions(reward, [r for r in records for _ in range(G)],
                                decode_completions(tokenizer, out.completions,
                                                   out.finish_reasons))
    lengths = [len(c) for c in out.completions]
    generated = sum(lengths)
    metrics = {"reward_mean": float(np.mean(rewards)), "reward_std": float(np.std(rewards)),
               "completion_length": generated / len(lengths),
               "completion_length_std": float(np.std(lengths)),
               "generated_tokens": float(generated),
               "tokens_per_second": generated / max(seconds, 1e-9)}

    tokens, mask = out.tokens, out.mask
    advantages = group_advantages(rewards, G, mode=options.advantage)
    if options.drop_equal_groups:
        keep = drop_equal_groups(rewards, G)
        metrics["groups_kept"] = float(keep.size // G)
        if keep.size == 0:
            return metrics
        tokens, mask, advantages = tokens[keep], mask[keep], advantages[keep]
    else:
        metrics["groups_kept"] = float(len(records))

    ref = _reference_logprobs(model, reference, tokens) if options.beta > 0 else None
    old = None
    if options.updates > 1:
        old = mx.stop_gradient(token_logprobs(model, tokens))
        mx.eval(old)
    max_len = options.max_tokens if options.normalize == "constant" else None

    def loss_fn(model):
        return policy_loss(token_logprobs(model, tokens), old, advantages, mask,
                           ref_logprobs=ref, beta=options.beta, eps_low=options.eps_low,
                           eps_high=options.eps_high, ratio=options.ratio,
                           normalize=options.normalize, max_len=max_len)

    loss_and_grad = nn.value_and_grad(model, loss_fn)
    totals: dict[str, float] = {}
    with _mode(model, training=True):
        for _ in range(options.updates):
            (loss, step_metrics), grads = loss_and_grad(model)
            # The norm before clipping: one rare success in a batch can make it spike.
            grads, step_metrics["grad_norm"] = clip_grad_norm(grads, options.grad_clip or inf)
            optimizer.update(model, grads)
            mx.eval(model.parameters(), optimizer.state, loss, step_metrics)
            for name in ("clip_fraction", "ratio_mean", "kl", "grad_norm"):
                if name in step_metrics:
                    totals[name] = totals.get(name, 0.0) + step_metrics[name].item()
            totals["loss"] = totals.get("loss", 0.0) + loss.item()
    metrics.update({k: v / options.updates for k, v in totals.items()})
    return metrics


def evaluate(model: nn.Module, tokenizer, records: Sequence[dict], reward: RewardFn, *,
             max_tokens: int, sampler=None,
             stop_tokens: Sequence[int] | None = None) -> dict[str, float]:
    """Mean and std of the reward of one completion per record (greedy by default), e.g. on
    held-out prompts (``rl.tasks.make_prompts(..., split="test")``)."""
    _check_records(records, "evaluate")
    with _mode(model, training=False):
        texts = complete(model, tokenizer, [r["prompt"] for r in records],
                         max_tokens=max_tokens, sampler=sampler, stop_tokens=stop_tokens)
    rewards = score_completions(reward, records, texts)
    return {"reward_mean": float(np.mean(rewards)), "reward_std": float(np.std(rewards))}
