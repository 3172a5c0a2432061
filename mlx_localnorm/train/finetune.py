"""Fine-tuning: a model mlx-lm loads + JSONL data in, an adapter mlx-lm applies out.

``Finetuner(config).run()`` loads ``config.model`` with ``mlx_lm.load``, makes only the
parameters of ``config.mode`` trainable (:mod:`.adapters`), and trains them on
``config.data`` (mlx-lm's ``text``/``completions``/``chat`` JSONL, prompt tokens masked out of
the loss, :mod:`mlx_localnorm.data.sft`) with AdamW, in the shared loop (progress bar,
metrics, loss plot, validation on ``valid.jsonl``, Ctrl-C checkpoint, exact resume). With
every checkpoint (the last step's and a Ctrl-C's too) ``out_dir`` gets ``adapter_config.json``
and ``adapters.safetensors`` of that step:
``mlx_lm.load(config.model, adapter_path=out_dir)`` runs the fine-tuned model and
``mlx-localnorm fuse`` bakes it in.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np

from ..data.sft import INSTRUCT_DIR, SFTBatches, load_sft, masked_cross_entropy
from .adapters import MODES, NORM_PARAMS, apply_mode, parameter_counts, save_adapter
from .config import check_field_types
from .gathered_loss import gather_plan, gathered_cross_entropy, splits_head
from .loop import TrainLoop, saved_config
from .model_dir import load_model_dir
from .schedule import lr_schedule

# Peak learning rates when the config leaves it unset.
DEFAULT_LR = {"lora": 1e-4, "dora": 1e-4, "norms": 1e-3, "full": 3e-5}
# The shipped instruction set (completions about the package's norms).
INSTRUCT = "localnorm-instruct"
SCHEDULES = ("cosine", "wsd", "constant")
# Fields a resumed run may change; everything else must match the saved config.
RESUMABLE_CHANGES = ("steps", "eval_every", "save_every", "keep_checkpoints", "log_every",
                     "progress")


def _help(text: str, **kw) -> Any:
    return field(metadata={"help": text}, **kw)


@dataclass
class FinetuneConfig:
    """Everything that defines a fine-tuning run; saved as ``train_config.json``."""

    model: str = _help("model directory mlx_lm.load reads (saved runs and models, mlx-lm "
                       "models)", default="")
    data: str = _help(f"JSONL file, directory with train.jsonl/valid.jsonl, or {INSTRUCT!r} "
                      "(the shipped instruction set)", default=INSTRUCT)
    out_dir: str = _help("run directory: adapter, checkpoints, metrics, plot",
                         default="runs/finetune")
    mode: str = _help(f"what trains: one of {', '.join(MODES)}", default="lora")
    num_layers: int | None = _help("lora/dora: adapt the last this many blocks (none = all)",
                                   default=None)
    rank: int = _help("lora/dora rank", default=8)
    scale: float | None = _help("lora/dora scale of the update (mlx-lm's; = alpha / rank); "
                                "none = 20, or alpha / rank when alpha is set", default=None)
    alpha: float | None = _help("lora/dora alpha (scale = alpha / rank)", default=None)
    dropout: float = _help("lora/dora dropout on the adapter input", default=0.0)
    norm_params: str = _help("norms: 'all' parameters of the norm layers, their 'gains' "
                             "(weight, bias) or their 'weight' only", default="all")
    mask_prompt: bool = _help("leave prompt tokens out of the loss (completions, chat)",
                              default=True)
    batch_size: int = _help("examples per optimizer step", default=4)
    max_seq_len: int = _help("longest example in tokens (longer ones are truncated)",
                             default=512)
    learning_rate: float | None = _help(
        "peak AdamW learning rate; none = the mode's default (lora/dora 1e-4, norms 1e-3, "
        "full 3e-5)", default=None)
    weight_decay: float = _help("AdamW decoupled weight decay", default=0.0)
    schedule: str = _help("learning-rate schedule: cosine, wsd or constant", default="cosine")
    warmup_steps: int = _help("linear warm-up steps", default=10)
    min_lr_ratio: float = _help("final learning rate as a fraction of the peak", default=0.1)
    grad_clip: float = _help("clip the global gradient norm to this; 0 = off", default=1.0)
    steps: int = _help("optimizer steps", default=200)
    eval_every: int = _help("validation loss every this many steps (0 = only at the end)",
                            default=50)
    eval_batches: int = _help("validation batches per evaluation", default=8)
    save_every: int = _help("checkpoint every this many steps (0 = only at the end)",
                            default=100)
    keep_checkpoints: int = _help("how many recent checkpoints to keep", default=2)
    log_every: int = _help("metrics.jsonl line every this many steps", default=1)
    seed: int = _help("seed of the adapter initialization, dropout and data order", default=0)
    trust_remote_code: bool = _help("let mlx-lm run a model file the model directory names "
                                    "(not needed for models this package saved)",
                                    default=False)
    progress: bool = _help("show a progress bar", default=True)

    def __post_init__(self):
        self.validate()

    @property
    def total_steps(self) -> int:
        return self.steps

    def lora_parameters(self) -> dict[str, Any] | None:
        """mlx-lm's ``lora_parameters`` of a lora/dora run (None for the other modes)."""
        if self.mode not in ("lora", "dora"):
            return None
        scale = self.scale if self.scale is not None else (
            20.0 if self.alpha is None else self.alpha / self.rank)
        return {"rank": self.rank, "scale": scale, "dropout": self.dropout}

    def peak_lr(self) -> float:
        return DEFAULT_LR[self.mode] if self.learning_rate is None else self.learning_rate

    def validate(self) -> None:
        """Check every field before any work (types, ranges, names)."""
        check_field_types(self, "FinetuneConfig")
        if not self.model:
            raise ValueError("FinetuneConfig: model must name a model directory (--model)")
        for name, choices in (("mode", MODES), ("norm_params", NORM_PARAMS),
                              ("schedule", SCHEDULES)):
            if getattr(self, name) not in choices:
                raise ValueError(f"FinetuneConfig: {name} must be one of {list(choices)}, got "
                                 f"{getattr(self, name)!r}")
        for name in ("rank", "batch_size", "max_seq_len", "steps", "eval_batches",
                     "keep_checkpoints", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"FinetuneConfig: {name} must be a positive int, got "
                                 f"{getattr(self, name)!r}")
        for name in ("eval_every", "save_every", "warmup_steps", "seed", "weight_decay",
                     "grad_clip"):
            if getattr(self, name) < 0:
                raise ValueError(f"FinetuneConfig: {name} must be >= 0, got "
                                 f"{getattr(self, name)!r}")
        if self.learning_rate is not None and self.learning_rate <= 0:
            raise ValueError(f"FinetuneConfig: learning_rate must be > 0, got "
                             f"{self.learning_rate!r}")
        if not 0 <= self.min_lr_ratio <= 1 or not 0 <= self.dropout < 1:
            raise ValueError(f"FinetuneConfig: min_lr_ratio must be in [0, 1] and dropout in "
                             f"[0, 1), got {self.min_lr_ratio!r}, {self.dropout!r}")
        if self.scale is not None and self.alpha is not None:
            raise ValueError(f"FinetuneConfig: give scale or alpha (scale = alpha / rank), "
                             f"not both; got scale={self.scale!r}, alpha={self.alpha!r}")
        lora_only = {"num_layers": None, "scale": None, "alpha": None, "dropout": 0.0}
        if self.mode not in ("lora", "dora"):
            given = [k for k, default in lora_only.items() if getattr(self, k) != default]
            if given:
                raise ValueError(f"FinetuneConfig: {', '.join(given)} apply to modes lora "
                                 f"and dora only, not {self.mode!r}")
        if self.norm_params != "all" and self.mode != "norms":
            raise ValueError(f"FinetuneConfig: norm_params applies to mode 'norms' only, not "
                             f"{self.mode!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "FinetuneConfig"
                  ) -> FinetuneConfig:
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"{where}: unknown config field(s) {unknown}")
        return cls(**values)


def resume_config(out_dir: str | Path, overrides: dict[str, Any] | None = None
                  ) -> FinetuneConfig:
    """The saved config of the run in ``out_dir``, with the allowed ``overrides`` applied."""
    return saved_config(FinetuneConfig, out_dir, overrides, RESUMABLE_CHANGES)


def _with_aux(model: nn.Module, loss: mx.array) -> mx.array:
    return loss + model.aux_loss() if hasattr(model, "aux_loss") else loss


def _loss(model: nn.Module, inputs: mx.array, targets: mx.array, mask: mx.array) -> mx.array:
    return _with_aux(model, masked_cross_entropy(model(inputs), targets, mask))


def _gathered_loss(model: nn.Module, inputs: mx.array, targets: mx.array, positions: mx.array,
                   weights: mx.array) -> mx.array:
    return _with_aux(model, gathered_cross_entropy(model, inputs, targets, positions, weights))


class Finetuner(TrainLoop):
    """One fine-tuning run (see the module docstring)."""

    evaluate_at_start = True  # the curve starts at the model's validation loss
    resumable = RESUMABLE_CHANGES

    def __init__(self, config: FinetuneConfig, resume: bool = False):
        super().__init__(config, resume)
        self.model, self.tokenizer, _ = load_model_dir(config.model, config.trust_remote_code)
        data = load_sft(INSTRUCT_DIR if config.data == INSTRUCT else config.data,
                        self.tokenizer, mask_prompt=config.mask_prompt)
        mx.random.seed(config.seed)  # the LoRA initialization and the dropout masks
        self.adapter_config = apply_mode(self.model, config.mode, config.num_layers,
                                         config.lora_parameters(), config.norm_params)
        self.trainable, self.total = parameter_counts(self.model)
        self.model.train()
        self.batches = SFTBatches(data.train, config.batch_size, config.max_seq_len,
                                  seed=config.seed, rank=self.rank, world_size=self.world)
        self.valid_batches = None if data.valid is None else SFTBatches(
            data.valid, min(config.batch_size, len(data.valid)), config.max_seq_len,
            shuffle=False)
        self.optimizer = optim.AdamW(
            learning_rate=lr_schedule(config.peak_lr(), config.steps, config.warmup_steps,
                                      config.schedule, config.min_lr_ratio),
            weight_decay=config.weight_decay)
        self.optimizer.init(self.model.trainable_parameters())
        # nGPT/anGPT keep their weights on the sphere; only full fine-tuning moves them.
        self._project = config.mode == "full" and hasattr(self.model, "project_weights")
        # The package's models run their head on the trained positions only (gathered_loss).
        self._gather = splits_head(self.model)
        self._loss_fn = _gathered_loss if self._gather else _loss
        self._start()
        self._train_step = self._compile_step()

    def _compile_step(self):
        model, optimizer, config = self.model, self.optimizer, self.config
        state = [model.state, optimizer.state, mx.random.state]
        loss_and_grad = nn.value_and_grad(model, self._loss_fn)

        @partial(mx.compile, inputs=state, outputs=state)
        def step(*batch):
            loss, grads = loss_and_grad(model, *batch)
            return self.apply_gradients(loss, grads, config.grad_clip)

        return step

    def _loss_inputs(self, batches: SFTBatches, inputs: mx.array, targets: mx.array,
                     mask: mx.array) -> tuple[mx.array, ...]:
        """``self._loss_fn``'s arguments after the model for one batch of ``batches``."""
        if not self._gather:
            return inputs, targets, mask
        return inputs, targets, *gather_plan(mask, batches.trained_bound(inputs.shape[1]))

    # ------------------------------------------------------------------ loop hooks
    def train_step(self) -> dict[str, float]:
        inputs, targets, mask = next(self.batches)
        loss = self._train_step(*self._loss_inputs(self.batches, inputs, targets, mask))
        if self._project:
            self.model.project_weights()
        mx.eval(loss, self.model.state, self.optimizer.state)
        # Tokens the loss was taken over (the prompt and padding are not trained on).
        return {"loss": loss.item(), "tokens": int(mask.sum().item())}

    def eval_metrics(self) -> dict[str, float]:
        """Validation loss: mean over the trained (unmasked) tokens of the first
        ``eval_batches`` validation batches."""
        if self.valid_batches is None:
            return {}
        self.model.eval()
        total = count = 0.0
        for i, (inputs, targets, mask) in enumerate(self.valid_batches.epoch_batches()):
            if i == self.config.eval_batches:
                break
            tokens = mask.sum().item()
            batch = self._loss_inputs(self.valid_batches, inputs, targets, mask)
            total += self._loss_fn(self.model, *batch).item() * tokens
            count += tokens
        self.model.train()
        val_loss = total / max(count, 1.0)
        return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50))}

    def state_dict(self) -> dict[str, Any]:
        # The random key drives dropout: restoring it makes a resumed run exact.
        return {"data": self.batches.state_dict(),
                "random_key": np.array(mx.random.state[0]).tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batches.load_state_dict(state["data"])
        high, low = state["random_key"]
        mx.random.seed((high << 32) | low)  # sets the key to [high, low]

    def on_checkpoint(self, step: int) -> None:
        """Write the adapter into ``out_dir`` with each checkpoint (the last step's, a
        Ctrl-C's): a stopped run's ``out_dir`` loads like a finished one's."""
        save_adapter(self.model, self.adapter_config, self.out_dir)

    def description(self) -> str:
        return f"finetune/{self.config.mode}"

    def title(self) -> str:
        c = self.config
        return (f"{c.mode}: {self.trainable:,} of {self.total:,} parameters trained "
                f"({100 * self.trainable / self.total:.3g}%), batch {c.batch_size}")
