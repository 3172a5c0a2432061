"""GRPO family: group-relative advantages, clipped policy losses and rollouts.

The pieces of an RL fine-tuning loop, usable on their own: :func:`group_advantages`
(GRPO, Dr. GRPO, RLOO), :func:`drop_equal_groups` (DAPO's dynamic sampling),
:func:`policy_loss` (token or GSPO sequence ratio, clip-higher, KL to a reference) and
:func:`token_logprobs`. See docs/rl.md.
"""

from .advantages import ADVANTAGE_MODES, drop_equal_groups, group_advantages
from .loss import NORMALIZERS, RATIO_LEVELS, policy_loss
from .rollout import token_logprobs

__all__ = [
    "ADVANTAGE_MODES",
    "NORMALIZERS",
    "RATIO_LEVELS",
    "drop_equal_groups",
    "group_advantages",
    "policy_loss",
    "token_logprobs",
]
