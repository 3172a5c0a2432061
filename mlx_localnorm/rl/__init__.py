"""GRPO family: group-relative advantages, clipped policy losses, rewards and rollouts.

The pieces of an RL fine-tuning loop, usable on their own: :func:`group_advantages`
(GRPO, Dr. GRPO, RLOO), :func:`drop_equal_groups` (DAPO's dynamic sampling),
:func:`policy_loss` (token or GSPO sequence ratio, clip-higher, KL to a reference),
:func:`adapters_off` (a LoRA model's reference policy),
:func:`rollout` (G completions per prompt in one batched generation), :func:`complete`,
:func:`token_logprobs`, reward functions (:func:`score_completions`, :func:`combine_rewards`,
:func:`load_reward`, :func:`load_prompts`) and the shipped verifiable tasks in
:mod:`.tasks`; :func:`grpo_step` puts them together (:class:`GRPOOptions`, with each
paper's :data:`PRESETS`) and :func:`evaluate` scores held-out prompts. See docs/rl.md.
"""

from . import tasks
from .advantages import ADVANTAGE_MODES, drop_equal_groups, group_advantages
from .loss import NORMALIZERS, RATIO_LEVELS, policy_loss
from .reference import adapters_off
from .rewards import (
    RewardError,
    RewardTypeError,
    call_reward,
    combine_rewards,
    load_prompts,
    load_reward,
    reward_name,
    score_completions,
)
from .rollout import Rollout, complete, decode_completions, rollout, token_logprobs
from .step import PRESETS, GRPOOptions, evaluate, grpo_step

__all__ = [
    "ADVANTAGE_MODES",
    "GRPOOptions",
    "NORMALIZERS",
    "PRESETS",
    "RATIO_LEVELS",
    "RewardError",
    "RewardTypeError",
    "Rollout",
    "adapters_off",
    "call_reward",
    "combine_rewards",
    "complete",
    "decode_completions",
    "drop_equal_groups",
    "evaluate",
    "group_advantages",
    "grpo_step",
    "load_prompts",
    "load_reward",
    "policy_loss",
    "reward_name",
    "rollout",
    "score_completions",
    "tasks",
    "token_logprobs",
]
