"""``GRPOConfig``: one dataclass describes a whole GRPO run (policy, prompts, reward,
algorithm, optimizer, budget). It is saved beside the checkpoints as ``train_config.json``;
``mlx-localnorm grpo`` exposes every field as a flag (``--field-name``)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..train.adapters import MODES
from ..train.config import check_field_types
from ..train.schedule import lr_schedule
from .step import PRESETS, GRPOOptions
from .tasks import TASKS

# GRPOOptions fields a run may set over its algorithm's preset (None: the preset's value).
OPTION_OVERRIDES = ("advantage", "ratio", "normalize", "eps_low", "eps_high", "beta", "updates",
                    "drop_equal_groups")
# Fields a resumed run may change; everything else must match the saved config.
RESUMABLE_CHANGES = ("steps", "eval_every", "save_every", "keep_checkpoints", "log_every",
                     "progress")


def _help(text: str, **kw) -> Any:
    return field(metadata={"help": text}, **kw)


@dataclass
class GRPOConfig:
    """Everything that defines a GRPO run; checked on construction."""

    # Policy, prompts and reward
    model: str | None = _help("directory mlx_lm.load reads: the policy (none with "
                              "warmup_steps > 0: the warm-up's model)", default=None)
    out_dir: str = _help("run directory: checkpoints, metrics, plot, adapters/model",
                         default="runs/grpo")
    task: str | None = _help(f"a shipped task: {', '.join(TASKS)} (or --prompts)",
                             default=None)
    prompts: str | None = _help("JSONL file, one {\"prompt\": ..., fields...} per line",
                                default=None)
    eval_prompts: str | None = _help("JSONL file of held-out prompts (default with --task: "
                                     "its test split; none: no held-out evaluation)",
                                     default=None)
    reward: str | None = _help("MODULE:FUNCTION or FILE.py:FUNCTION, several comma-separated "
                               "(default with --task: the task's, rl.tasks.task_reward)",
                               default=None)
    reward_weights: str | None = _help("comma-separated weights, one per reward (default 1)",
                                       default=None)
    trust_remote_code: bool = _help("let mlx_lm.load run the model directory's own code",
                                    default=False)
    # Supervised warm-up (shipped tasks)
    warmup_steps: int = _help("pre-train a new small model on the task's demonstrations for "
                              "this many steps first (in OUT_DIR/warmup; needs --task, no "
                              "--model); 0 = off", default=0)
    warmup_config: dict = _help("PretrainConfig fields of the warm-up as JSON, e.g. "
                                "'{\"hidden_size\": 256}'", default_factory=dict)
    # What trains
    mode: str = _help(f"trainable parameters: {', '.join(MODES)}", default="lora")
    lora_layers: int | None = _help("lora/dora: blocks that get adapters, from the last "
                                    "(none = all)", default=None)
    lora_rank: int = _help("lora/dora rank", default=8)
    lora_scale: float = _help("lora/dora scale (alpha / rank)", default=20.0)
    lora_dropout: float = _help("lora/dora dropout (acts in the updates only)", default=0.0)
    # Algorithm
    algorithm: str = _help(f"preset of rl.PRESETS: {', '.join(PRESETS)}", default="grpo")
    group_size: int = _help("completions sampled per prompt (G >= 2)", default=8)
    prompts_per_step: int = _help("prompts per step (a rollout has G times as many rows)",
                                  default=4)
    max_tokens: int = _help("longest completion, in tokens", default=32)
    temperature: float = _help("sampling temperature of the rollouts", default=1.0)
    advantage: str | None = _help("grpo, dr_grpo or rloo (none: the preset's)", default=None)
    ratio: str | None = _help("token or sequence (none: the preset's)", default=None)
    normalize: str | None = _help("sequence, token or constant (none: the preset's)",
                                  default=None)
    eps_low: float | None = _help("clip the ratio below at 1 - eps_low (none: the preset's)",
                                  default=None)
    eps_high: float | None = _help("clip the ratio above at 1 + eps_high (none: the preset's)",
                                   default=None)
    beta: float | None = _help("KL penalty weight (none: the preset's)", default=None)
    updates: int | None = _help("policy-gradient updates per rollout (none: 1)", default=None)
    drop_equal_groups: bool | None = _help("skip groups whose rewards are all equal (none: "
                                           "the preset's)", default=None)
    # Optimizer (AdamW)
    learning_rate: float = _help("peak learning rate", default=1e-5)
    grad_clip: float = _help("clip each update's global gradient norm to this; 0 = off",
                             default=1.0)
    lr_warmup: int = _help("linear learning-rate warm-up steps", default=0)
    weight_decay: float = _help("AdamW's decoupled weight decay", default=0.0)
    # Budget, evaluation, checkpoints
    steps: int = _help("GRPO steps (one rollout each)", default=100)
    eval_every: int = _help("held-out reward every this many steps (0 = only at the end)",
                            default=10)
    eval_size: int = _help("held-out prompts per evaluation (with --task)", default=64)
    eval_tokens: int | None = _help("longest held-out completion (none = max_tokens)",
                                    default=None)
    save_every: int = _help("checkpoint every this many steps (0 = only at the end)",
                            default=25)
    keep_checkpoints: int = _help("how many recent checkpoints to keep", default=3)
    log_every: int = _help("metrics.jsonl line every this many steps", default=1)
    seed: int = _help("seed of the prompt order and the sampling (step s uses (seed, s))",
                      default=0)
    progress: bool = _help("show a progress bar", default=True)

    def __post_init__(self):
        self._check_types()
        owner = "GRPOConfig"
        for name in ("group_size", "prompts_per_step", "max_tokens", "steps", "eval_size",
                     "keep_checkpoints", "log_every", "lora_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"{owner}: {name} must be a positive int, got "
                                 f"{getattr(self, name)!r}")
        for name in ("warmup_steps", "lr_warmup", "eval_every", "save_every", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"{owner}: {name} must be an int >= 0, got "
                                 f"{getattr(self, name)!r}")
        if self.learning_rate <= 0 or self.weight_decay < 0:
            raise ValueError(f"{owner}: learning_rate must be > 0 and weight_decay >= 0, got "
                             f"{self.learning_rate!r}, {self.weight_decay!r}")
        if self.mode not in MODES:
            raise ValueError(f"{owner}: mode must be one of {list(MODES)}, got {self.mode!r}")
        self._check_sources()
        self.reward_weight_list()
        self.options()  # GRPOOptions checks the algorithm's fields

    def _check_types(self) -> None:
        check_field_types(self, "GRPOConfig")

    def _check_sources(self) -> None:
        owner = "GRPOConfig"
        if (self.task is None) == (self.prompts is None):
            raise ValueError(f"{owner}: give exactly one of task (one of {list(TASKS)}) and "
                             f"prompts (a JSONL file), got task={self.task!r}, "
                             f"prompts={self.prompts!r}")
        if self.task is not None and self.task not in TASKS:
            raise ValueError(f"{owner}: task must be one of {list(TASKS)}, got {self.task!r}")
        if self.task is None and self.reward is None:
            raise ValueError(f"{owner}: prompts need a reward (MODULE:FUNCTION), got none")
        if self.warmup_steps and (self.task is None or self.model is not None):
            raise ValueError(f"{owner}: warmup_steps={self.warmup_steps} trains a new model "
                             f"on a task's demonstrations: it needs task and no model, got "
                             f"task={self.task!r}, model={self.model!r}")
        if not self.warmup_steps and self.model is None:
            raise ValueError(f"{owner}: model must be a directory mlx_lm.load reads (or use "
                             "warmup_steps > 0 with a task), got none")
        if self.mode not in ("lora", "dora") and (
                self.lora_layers is not None or self.lora_dropout):
            raise ValueError(f"{owner}: lora_layers and lora_dropout apply to modes lora and "
                             f"dora, got them with mode {self.mode!r}")

    def reward_weight_list(self) -> list[float] | None:
        """``reward_weights`` as floats, one per reward spec (None: all 1)."""
        if self.reward_weights is None:
            return None
        specs = 1 if self.reward is None else len(self.reward.split(","))
        try:
            weights = [float(w) for w in self.reward_weights.split(",")]
        except ValueError:
            weights = []
        if len(weights) != specs or not all(map(math.isfinite, weights)):
            raise ValueError(f"GRPOConfig: reward_weights must be {specs} comma-separated "
                             f"finite number(s), one per reward, got {self.reward_weights!r}")
        return weights

    def options(self) -> GRPOOptions:
        """The algorithm: the preset with this config's fields over it."""
        given = {k: getattr(self, k) for k in OPTION_OVERRIDES if getattr(self, k) is not None}
        return GRPOOptions.preset(self.algorithm, group_size=self.group_size,
                                  max_tokens=self.max_tokens, temperature=self.temperature,
                                  grad_clip=self.grad_clip, **given)

    def lr_schedule(self):
        return lr_schedule(self.learning_rate, self.steps, self.lr_warmup, "constant")

    @property
    def total_steps(self) -> int:
        return self.steps

    @property
    def policy_dir(self) -> Path:
        """The model GRPO starts from: ``model``, or the warm-up's run directory."""
        return Path(self.model) if self.model is not None else Path(self.out_dir) / "warmup"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "GRPOConfig") -> GRPOConfig:
        """A config from field values; errors name ``where`` (e.g. the saved config file)."""
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"{where}: unknown config field(s) {unknown}")
        try:
            return cls(**values)
        except (ValueError, TypeError) as err:
            raise type(err)(f"{where}: {err}") from None
