"""Group-relative advantages of the GRPO family and DAPO's filter of uninformative groups."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from ..ops._checks import check_choice, check_number

ADVANTAGE_MODES = ("grpo", "dr_grpo", "rloo")


def _check_group_size(group_size, owner: str) -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"{owner}: group_size must be an int >= 2, got {group_size!r}")
    if group_size < 2:
        raise ValueError(f"{owner}: group_size must be an int >= 2 (a group needs a baseline), "
                         f"got {group_size}")
    return group_size


def _grouped_rewards(rewards, group_size, owner: str) -> mx.array:
    """Flat rewards as a float32 ``[num_groups, group_size]`` array, checked."""
    _check_group_size(group_size, owner)
    try:
        r = np.asarray(rewards, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{owner}: rewards must be numbers, got {rewards!r}") from e
    if r.ndim != 1:
        raise ValueError(f"{owner}: rewards must be 1-D (grouped by consecutive runs of "
                         f"group_size), got shape {r.shape}")
    if r.size == 0 or r.size % group_size:
        raise ValueError(f"{owner}: rewards must hold at least one group, their length a "
                         f"multiple of group_size={group_size}, got {r.size}")
    bad = np.flatnonzero(~np.isfinite(r))
    if bad.size:
        raise ValueError(f"{owner}: rewards must be finite, got {r[bad[0]]} at index {bad[0]}")
    return mx.array(r.reshape(-1, group_size), dtype=mx.float32)


def group_advantages(rewards, group_size: int, mode: str = "grpo", eps: float = 1e-6) -> mx.array:
    r"""Advantage of each completion relative to its own group.

    ``rewards`` is flat, grouped by consecutive runs of ``group_size`` (the G completions of
    one prompt). With :math:`\bar r` and :math:`\sigma` (population std) of the group:

    - ``"grpo"`` (arXiv 2402.03300): :math:`A_i = (r_i - \bar r) / (\sigma + \epsilon)`
    - ``"dr_grpo"`` (arXiv 2503.20783): :math:`A_i = r_i - \bar r`
    - ``"rloo"`` (arXiv 2402.14740): :math:`A_i = r_i - \frac{1}{G-1}\sum_{j \ne i} r_j
      = \frac{G}{G-1}(r_i - \bar r)`

    A group whose rewards are all equal gets advantage 0 exactly. Returns float32 ``[N]``.
    """
    owner = "group_advantages"
    check_choice(mode, ADVANTAGE_MODES, "mode", owner)
    check_number(eps, "eps", owner, "non_negative")
    r = _grouped_rewards(rewards, group_size, owner)
    centered = r - r.mean(axis=1, keepdims=True)
    if mode == "grpo":
        adv = centered / (mx.sqrt(r.var(axis=1, keepdims=True)) + eps)
    elif mode == "rloo":
        adv = centered * (group_size / (group_size - 1))
    else:
        adv = centered
    # Rounding in the mean would leave tiny non-zero advantages in an equal group.
    equal = r.max(axis=1, keepdims=True) == r.min(axis=1, keepdims=True)
    return mx.where(equal, 0.0, adv).reshape(-1)


def drop_equal_groups(rewards, group_size: int) -> mx.array:
    """Indices of the completions in groups whose rewards are not all equal.

    DAPO's dynamic sampling (arXiv 2503.14476): a group with equal rewards has zero advantage
    everywhere and only dilutes the batch. Use the indices with ``mx.take`` (or list
    indexing) on rewards, tokens and masks; the result is empty if every group is equal.
    """
    r = np.array(_grouped_rewards(rewards, group_size, "drop_equal_groups"))
    informative = r.max(axis=1) != r.min(axis=1)
    return mx.array(np.arange(r.size).reshape(r.shape)[informative].reshape(-1), dtype=mx.int32)
