"""``GRPOTrainer``: GRPO-family training of any mlx-lm model on the shared training loop.

Each step samples ``group_size`` completions of ``prompts_per_step`` prompts, scores them and
updates the policy (:func:`~.step.grpo_step`); held-out prompts are scored every
``eval_every`` steps (and before the first step), greedily and with one sampled completion
each. The prompts of step ``s`` and its sampling noise come from ``(seed, s)`` alone, so a
run resumed from a checkpoint repeats the uninterrupted run exactly. The end result is an
mlx-lm adapter directory (``lora``, ``dora``, ``norms``) or model directory (``full``) in
``out_dir``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx_lm.sample_utils import make_sampler

from ..train.adapters import apply_mode, save_adapter
from ..train.loop import TrainLoop
from ..train.model_dir import load_model_dir, save_model_dir
from .config import RESUMABLE_CHANGES, GRPOConfig
from .plot import plot_rewards
from .rewards import RewardFn, combine_rewards, load_prompts, load_reward
from .step import evaluate, grpo_step
from .tasks import make_prompts, task_reward
from .warmup import warmup

ADAPTERS, MODEL = "adapters", "model"


def step_seed(seed: int, step: int, *stream: int) -> int:
    """A 32-bit seed for step ``step`` of a run seeded ``seed`` (distinct pairs, distinct
    streams: ``seed + step`` would give seed 1 step 0 the stream of seed 0 step 1); a
    ``stream`` number gives the step another independent stream (the held-out sampling)."""
    return int(np.random.SeedSequence([seed, step, *stream]).generate_state(1)[0])


def make_reward(config: GRPOConfig) -> RewardFn:
    """The run's reward: its specs loaded (and weighted), or the task's own."""
    if config.reward is None:
        return task_reward(config.task)
    functions = [load_reward(spec.strip()) for spec in config.reward.split(",")]
    weights = config.reward_weight_list()
    if len(functions) == 1 and weights is None:
        return functions[0]
    return combine_rewards(functions, weights)


def prompt_batch(records: list[dict], step: int, size: int, seed: int) -> list[dict]:
    """The ``size`` records of step ``step``: epochs through ``records``, each in its own
    seeded order."""
    n, batch = len(records), []
    for position in range(step * size, (step + 1) * size):
        epoch, index = divmod(position, n)
        order = np.random.default_rng([seed, epoch]).permutation(n)
        batch.append(records[order[index]])
    return batch


class GRPOTrainer(TrainLoop):
    """One GRPO run (see the module docstring); ``reward`` defaults to the config's."""

    resumable = RESUMABLE_CHANGES

    def __init__(self, config: GRPOConfig, resume: bool = False,
                 reward: RewardFn | None = None):
        if mx.distributed.init().size() > 1:
            raise ValueError("grpo runs in one process; start it without mlx.launch")
        super().__init__(config, resume)
        self.reward = reward or make_reward(config)
        self.records = None if config.task else load_prompts(config.prompts)
        self.eval_records = self._eval_records()
        if config.warmup_steps and not resume:
            warmup(config.task, config.policy_dir, config.warmup_steps, config.seed,
                   config.warmup_config, config.progress)
        self.model, self.tokenizer, self.model_config = load_model_dir(
            config.policy_dir, config.trust_remote_code)
        mx.random.seed(config.seed)  # the adapters' initialization
        self.adapter_config = self._apply_mode()
        self.options = config.options()
        self.reference = self._reference()
        self.optimizer = optim.AdamW(learning_rate=config.lr_schedule(),
                                     weight_decay=config.weight_decay)
        self.optimizer.init(self.model.trainable_parameters())  # a checkpoint holds its state
        self._start()
        if self.is_main and not resume and self.eval_records:
            self.metrics.log({"step": 0, **self.eval_metrics()})

    # ------------------------------------------------------------------ set-up
    def _eval_records(self) -> list[dict] | None:
        config = self.config
        if config.eval_prompts is not None:
            return load_prompts(config.eval_prompts)
        if config.task is not None:  # a fixed held-out set, the same for every seed
            return make_prompts(config.task, config.eval_size, seed=0, split="test")
        return None

    def _apply_mode(self) -> dict[str, Any]:
        config = self.config
        lora = None
        if config.mode in ("lora", "dora"):
            lora = {"rank": config.lora_rank, "scale": config.lora_scale,
                    "dropout": config.lora_dropout}
        return apply_mode(self.model, config.mode, config.lora_layers, lora)

    def _reference(self):
        """A frozen copy for the KL penalty when the adapters cannot be switched off."""
        if self.options.beta == 0 or self.config.mode in ("lora", "dora"):
            return None
        reference, _, _ = load_model_dir(self.config.policy_dir, self.config.trust_remote_code)
        reference.freeze()
        return reference

    # ------------------------------------------------------------------ loop hooks
    def batch(self, step: int) -> list[dict]:
        """The prompt records of step ``step`` (0-based)."""
        config = self.config
        if self.records is None:
            return make_prompts(config.task, config.prompts_per_step,
                                seed=step_seed(config.seed, step))
        return prompt_batch(self.records, step, config.prompts_per_step, config.seed)

    def train_step(self) -> dict[str, float]:
        mx.random.seed(step_seed(self.config.seed, self.step))
        metrics = grpo_step(self.model, self.optimizer, self.tokenizer, self.batch(self.step),
                            self.reward, self.options, reference=self.reference)
        # A step whose groups were all dropped (DAPO) takes no update: loss 0.
        return {"loss": metrics.pop("loss", 0.0),
                "tokens": int(metrics.pop("generated_tokens")),
                "rollout_tokens_per_s": metrics.pop("tokens_per_second"), **metrics}

    def eval_metrics(self) -> dict[str, float]:
        if not self.eval_records:
            return {}
        config = self.config
        max_tokens = config.eval_tokens or config.max_tokens
        greedy = evaluate(self.model, self.tokenizer, self.eval_records, self.reward,
                          max_tokens=max_tokens)
        # The policy's own expected reward: one completion per prompt at the rollout
        # temperature, from a stream fixed by (seed, step) so a resumed run repeats it.
        mx.random.seed(step_seed(config.seed, self.step, 1))
        sampled = evaluate(self.model, self.tokenizer, self.eval_records, self.reward,
                           max_tokens=max_tokens, sampler=make_sampler(temp=config.temperature))
        return {"eval_reward": greedy["reward_mean"], "eval_reward_std": greedy["reward_std"],
                "eval_reward_sampled": sampled["reward_mean"]}

    def finish(self) -> None:
        """Write the adapters (or the whole model) where ``mlx_lm.load`` reads them."""
        if self.config.mode == "full":
            save_model_dir(self.model, self.tokenizer, self.model_config,
                           self.config.policy_dir, self.output_path)
        else:
            save_adapter(self.model, self.adapter_config, self.output_path)

    @property
    def output_path(self) -> Path:
        return self.out_dir / (MODEL if self.config.mode == "full" else ADAPTERS)

    def plot(self) -> None:
        plot_rewards(self.metrics.records, self.out_dir / "reward.png", self.title())

    def title(self) -> str:
        c = self.config
        return (f"{c.task or Path(c.prompts).name}: {c.algorithm}, G={c.group_size}, "
                f"{c.mode}, {super().title()}")

    def description(self) -> str:
        return f"grpo {self.config.task or Path(self.config.prompts).name}"

    def postfix(self, record: dict[str, Any]) -> dict[str, str]:
        shown = {"reward": f"{record['reward_mean']:.3f}",
                 "tok_s": f"{record['tokens_per_s']:.0f}"}
        if "eval_reward" in record:
            shown["eval"] = f"{record['eval_reward']:.3f}"
        return shown
