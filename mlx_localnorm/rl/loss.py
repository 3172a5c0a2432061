"""The clipped policy-gradient surrogate of the GRPO family, with an optional KL penalty."""

from __future__ import annotations

import mlx.core as mx

from ..ops._checks import check_choice, check_number, check_size

RATIO_LEVELS = ("token", "sequence")
NORMALIZERS = ("sequence", "token", "constant")


def _as_array(x, name: str, shape: tuple | None, owner: str) -> mx.array:
    if not isinstance(x, mx.array):
        raise TypeError(f"{owner}: {name} must be an mx.array, got {type(x).__name__}")
    if shape is not None and tuple(x.shape) != shape:
        raise ValueError(f"{owner}: {name} must have shape {shape}, got {tuple(x.shape)}")
    return x


def _check_max_len(max_len, normalize: str, width: int, owner: str) -> int:
    if max_len is None:
        return width
    if normalize != "constant":
        raise ValueError(f"{owner}: max_len is used only with normalize='constant', "
                         f"got normalize={normalize!r}")
    return check_size(max_len, "max_len", owner)


def _masked_mean(x: mx.array, mask: mx.array) -> mx.array:
    return mx.where(mask, x, 0.0).sum() / mx.maximum(mask.sum(), 1)


def policy_loss(logprobs: mx.array, old_logprobs: mx.array | None, advantages: mx.array,
                mask: mx.array, *, ref_logprobs: mx.array | None = None, beta: float = 0.0,
                eps_low: float = 0.2, eps_high: float | None = None, ratio: str = "token",
                normalize: str = "sequence", max_len: int | None = None
                ) -> tuple[mx.array, dict[str, mx.array]]:
    r"""Clipped surrogate loss of GRPO (arXiv 2402.03300) and its variants, and its metrics.

    Per completion token :math:`t` of completion :math:`i`, with advantage :math:`A_i`:

    .. math:: \ell_{it} = -\min(\rho_{it} A_i,\ \mathrm{clip}(\rho_{it}, 1-\epsilon_{low},
              1+\epsilon_{high}) A_i) + \beta\,(e^{d_{it}} - d_{it} - 1),\quad
              d_{it} = \log\pi_{ref} - \log\pi_\theta

    - ``ratio="token"``: :math:`\rho_{it} = \pi_\theta / \pi_{old}` per token (GRPO);
      ``"sequence"``: GSPO's (arXiv 2507.18071)
      :math:`s_i = \exp(\frac{1}{|y_i|}\sum_t \log\frac{\pi_\theta}{\pi_{old}})` for every token.
    - ``eps_high > eps_low`` is DAPO's clip-higher (arXiv 2503.14476); ``eps_high=None``
      means ``eps_low``.
    - The KL term is the k3 estimator of the GRPO paper, to a frozen reference policy.
    - ``normalize``: ``"sequence"`` averages each completion over its tokens, then over
      completions (GRPO); ``"token"`` averages over all tokens of the batch (DAPO);
      ``"constant"`` sums and divides by ``B * max_len`` (Dr. GRPO, arXiv 2503.20783:
      the generation budget, e.g. the rollout's ``max_tokens``; default the width ``T``).

    Args:
        logprobs: ``[B, T]`` log-probabilities of the sampled tokens under the policy
            (differentiable).
        old_logprobs: ``[B, T]`` the same under the rollout policy, or ``None`` for one update
            per rollout (then :math:`\pi_{old} = \pi_\theta`: ratio 1, gradient of
            :math:`\rho A`).
        advantages: ``[B]``, e.g. from :func:`group_advantages`.
        mask: ``[B, T]``, true on completion tokens; other positions may hold anything.
        ref_logprobs: ``[B, T]`` under the reference policy; needed when ``beta > 0``.

    Returns:
        ``(loss, metrics)``; metrics (no gradient) are token means over the mask of
        ``clip_fraction`` (its ``clip_low_fraction`` and ``clip_high_fraction`` parts: tokens
        whose clipped term is the active one), ``ratio_mean``, ``kl`` (when ``ref_logprobs``
        is given), and the token count ``tokens``.
    """
    owner = "policy_loss"
    logprobs = _as_array(logprobs, "logprobs", None, owner)
    if logprobs.ndim != 2:
        raise ValueError(f"{owner}: logprobs must be 2-D [completions, tokens], "
                         f"got shape {tuple(logprobs.shape)}")
    shape = tuple(logprobs.shape)
    if old_logprobs is None:
        old_logprobs = logprobs
    _as_array(old_logprobs, "old_logprobs", shape, owner)
    _as_array(advantages, "advantages", shape[:1], owner)
    mask = _as_array(mask, "mask", shape, owner).astype(mx.bool_)
    check_choice(ratio, RATIO_LEVELS, "ratio", owner)
    check_choice(normalize, NORMALIZERS, "normalize", owner)
    eps_low = check_number(eps_low, "eps_low", owner, "non_negative")
    eps_high = eps_low if eps_high is None else check_number(
        eps_high, "eps_high", owner, "non_negative")
    beta = check_number(beta, "beta", owner, "non_negative")
    if ref_logprobs is None and beta > 0:
        raise ValueError(f"{owner}: beta={beta} needs ref_logprobs, got None")
    max_len = _check_max_len(max_len, normalize, shape[1], owner)

    # Padding may hold -inf or NaN: select, never multiply, so it cannot leak into gradients.
    log_ratio = mx.where(mask, logprobs - mx.stop_gradient(old_logprobs), 0.0)
    lengths = mask.sum(axis=1)
    if ratio == "sequence":
        seq = log_ratio.sum(axis=1, keepdims=True) / mx.maximum(lengths, 1)[:, None]
        log_ratio = mx.broadcast_to(seq, shape)
    rho = mx.exp(log_ratio)
    adv = advantages.astype(mx.float32)[:, None]
    per_token = -mx.minimum(rho * adv, mx.clip(rho, 1 - eps_low, 1 + eps_high) * adv)
    metrics = {}
    if ref_logprobs is not None:
        _as_array(ref_logprobs, "ref_logprobs", shape, owner)
        d = mx.where(mask, mx.stop_gradient(ref_logprobs) - logprobs, 0.0)
        kl = mx.exp(d) - d - 1
        per_token = per_token + beta * kl
        metrics["kl"] = _masked_mean(mx.stop_gradient(kl), mask)
    per_token = mx.where(mask, per_token, 0.0)

    if normalize == "sequence":
        loss = (per_token.sum(axis=1) / mx.maximum(lengths, 1)).mean()
    elif normalize == "token":
        loss = per_token.sum() / mx.maximum(lengths.sum(), 1)
    else:
        loss = per_token.sum() / (shape[0] * max_len)

    rho = mx.stop_gradient(rho)
    low = (rho < 1 - eps_low) & (adv < 0)
    high = (rho > 1 + eps_high) & (adv > 0)
    metrics.update(clip_fraction=_masked_mean(low | high, mask),
                   clip_low_fraction=_masked_mean(low, mask),
                   clip_high_fraction=_masked_mean(high, mask),
                   ratio_mean=_masked_mean(rho, mask), tokens=lengths.sum())
    return loss, metrics
