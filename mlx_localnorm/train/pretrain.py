"""Pre-training: text in, a trained LocalNorm LM that mlx-lm can run out.

``Pretrainer(config).run()`` prepares the data (tokenizer + token files in ``out_dir``),
builds the model and optimizer, and runs a compiled training step in the shared
:class:`~.loop.TrainLoop` (validation, metrics, checkpoints, a progress bar). Ctrl-C
checkpoints and exits cleanly;
``Pretrainer(config, resume=True)`` continues from the newest checkpoint so that every later
loss equals the uninterrupted run's. Under ``mlx.launch`` the batch is split over the
processes and gradients are averaged (data parallel); rank 0 writes all files.
"""

from __future__ import annotations

import contextlib
import math
import os
from functools import partial
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map

from ..data import Batches, prepare_data
from ..models import Model, save_model
from ..optim import make_optimizer
from .config import RESUMABLE_CHANGES, PretrainConfig
from .loop import TrainLoop, saved_config
from .schedule import lr_schedule

# Peak learning rates when the config leaves it unset.
DEFAULT_LR = {"adamw": 3e-3, "lamb": 3e-3, "lars": 0.1, "muon": 0.02, "normuon": 0.02,
              "scion": 0.02}
DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def resume_config(out_dir: str | Path, overrides: dict[str, Any] | None = None) -> PretrainConfig:
    """The saved config of the run in ``out_dir``, with the allowed ``overrides`` applied."""
    return saved_config(PretrainConfig, out_dir, overrides, RESUMABLE_CHANGES)


def make_training_optimizer(config: PretrainConfig, model: nn.Module):
    """``make_optimizer`` with the run's schedules (and nGPT/anGPT weight constraints)."""
    steps = config.total_steps

    def schedule(peak: float):
        return lr_schedule(peak, steps, config.warmup_steps, config.schedule,
                           config.min_lr_ratio, config.decay_fraction)

    hparams: dict[str, Any] = {"learning_rate": schedule(
        config.learning_rate if config.learning_rate is not None
        else DEFAULT_LR[config.optimizer])}
    if config.optimizer in ("muon", "normuon", "scion"):
        hparams["adamw_learning_rate"] = schedule(config.adamw_learning_rate)
    if config.weight_decay is not None:
        hparams["weight_decay"] = config.weight_decay
    constraint = {"ngpt": "normalize", "angpt": "constrain"}.get(config.placement)
    return make_optimizer(config.optimizer, model, constraint=constraint, **hparams)


_CHECKPOINTED: dict[type, type] = {}


def checkpoint_blocks(model: nn.Module) -> None:
    """Recompute each block's activations in the backward pass (``mx.checkpoint``).

    Each block instance gets a subclass whose ``__call__`` is checkpointed, so other models
    of the same class are unaffected (mlx-lm's ``grad_checkpoint`` patches the class itself)
    and parameter names do not change.
    """
    for layer in model.layers:
        cls = type(layer)
        if cls not in _CHECKPOINTED:
            def checkpointed(self, *args, _call=cls.__call__):
                def inner(params, *args):
                    self.update(params)
                    return _call(self, *args)
                return mx.checkpoint(inner)(self.trainable_parameters(), *args)

            _CHECKPOINTED[cls] = type(f"Checkpointed{cls.__name__}", (cls,),
                                      {"__call__": checkpointed})
        layer.__class__ = _CHECKPOINTED[cls]


def _cross_entropy(model: Model, inputs: mx.array, targets: mx.array) -> mx.array:
    logits = model(inputs).astype(mx.float32)
    return nn.losses.cross_entropy(logits, targets, reduction="mean") + model.aux_loss()


class Pretrainer(TrainLoop):
    """One pre-training run (see the module docstring)."""

    resumable = RESUMABLE_CHANGES

    def __init__(self, config: PretrainConfig, resume: bool = False):
        world = mx.distributed.init().size()
        if config.batch_size % (world * config.grad_accum):
            raise ValueError(f"batch_size={config.batch_size} must be divisible by "
                             f"processes x grad_accum = {world} x {config.grad_accum}")
        super().__init__(config, resume)
        self.data = self._prepare_data()
        self.tokens_per_step = config.batch_size * config.seq_len
        mx.random.seed(config.seed)
        self.model = Model(config.model_args(self.data.tokenizer.vocab_size()))
        if config.dtype != "float32":
            self.model.set_dtype(DTYPES[config.dtype])
        if config.grad_checkpoint:
            checkpoint_blocks(self.model)
        self.optimizer = make_training_optimizer(config, self.model)
        self.optimizer.init(self.model.trainable_parameters())
        self.batches = Batches(self.data.train, config.batch_size, config.seq_len,
                               seed=config.seed, rank=self.rank, world_size=self.world)
        self.valid_batches = self._validation_batches()
        self._start()
        self._train_step = self._compile_step()

    # ------------------------------------------------------------------ set-up
    def _prepare_data(self):
        """Rank 0 trains the tokenizer and writes token files; the others then reuse them."""
        config = self.config
        source = None if config.corpus == "shakespeare" else config.corpus
        if self.is_main:
            data = prepare_data(source, self.out_dir, config.vocab_size, config.tokenizer_type)
        self._barrier()
        if not self.is_main:
            data = prepare_data(source, self.out_dir, config.vocab_size, config.tokenizer_type)
        return data

    def _compile_step(self):
        """A compiled step: value and gradient, data-parallel average, clipping, update."""
        model, optimizer, config = self.model, self.optimizer, self.config
        state = [model.state, optimizer.state]
        loss_and_grad = nn.value_and_grad(model, _cross_entropy)
        micro = config.batch_size // self.world // config.grad_accum

        finish = partial(self.apply_gradients, grad_clip=config.grad_clip)

        if config.grad_accum == 1:
            @partial(mx.compile, inputs=state, outputs=state)
            def step(inputs, targets):
                return finish(*loss_and_grad(model, inputs, targets))
            return step

        grad_fn = mx.compile(partial(loss_and_grad, model), inputs=state, outputs=state)
        apply = mx.compile(finish, inputs=state, outputs=state)

        def accumulated_step(inputs, targets):
            total_loss, total_grads = None, None
            for i in range(config.grad_accum):  # evaluated one micro-batch at a time
                rows = slice(i * micro, (i + 1) * micro)
                loss, grads = grad_fn(inputs[rows], targets[rows])
                mx.eval(loss, grads)
                if total_grads is None:
                    total_loss, total_grads = loss, grads
                else:
                    total_loss = total_loss + loss
                    total_grads = tree_map(mx.add, total_grads, grads)
            scale = 1.0 / config.grad_accum
            return apply(total_loss * scale, tree_map(lambda g: g * scale, total_grads))

        return accumulated_step

    def _validation_batches(self) -> Batches | None:
        """Fixed-order validation batches, as large as the training batch if the text allows."""
        if self.data.valid is None:
            return None
        sequences = (len(self.data.valid.tokens) - 1) // self.config.seq_len
        if sequences == 0:
            return None
        return Batches(self.data.valid, min(self.config.batch_size, sequences),
                       self.config.seq_len, shuffle=False)

    # ------------------------------------------------------------------ loop hooks
    def train_step(self) -> dict[str, float]:
        inputs, targets = next(self.batches)
        loss = self._train_step(inputs, targets)
        mx.eval(loss, self.model.state, self.optimizer.state)
        return {"loss": loss.item(), "tokens": self.tokens_per_step}

    def evaluate(self) -> float | None:
        """Mean validation loss over the first ``eval_batches`` validation batches."""
        if self.valid_batches is None:
            return None
        losses = []
        for i, (inputs, targets) in enumerate(self.valid_batches.epoch_batches()):
            if i == self.config.eval_batches:
                break
            losses.append(_cross_entropy(self.model, inputs, targets))
        return mx.mean(mx.stack(losses)).item()

    def eval_metrics(self) -> dict[str, float]:
        val_loss = self.evaluate()
        if val_loss is None:
            return {}
        return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50))}

    def state_dict(self) -> dict[str, Any]:
        return {"data": self.batches.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batches.load_state_dict(state["data"])

    def finish(self) -> None:
        """The run directory made loadable by mlx-lm."""
        self.export()

    def export(self) -> Path:
        """Write config.json, model.safetensors and the model file into ``out_dir``.

        The run directory already holds the tokenizer, so ``mlx_lm.load(out_dir,
        trust_remote_code=True)`` then loads the trained model. Each file is replaced
        atomically.
        """
        from transformers import PreTrainedTokenizerFast

        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(self.out_dir))
        # Our scratch directory: what a killed export left in it is ours to replace.
        staging = save_model(self.model, tokenizer, self.out_dir / ".export", overwrite=True)
        for item in staging.iterdir():
            os.replace(item, self.out_dir / item.name)
        staging.rmdir()
        return self.out_dir

    def sample(self, prompt: str | None = None, max_tokens: int | None = None) -> str:
        """Text that mlx-lm generates from the exported run directory (temperature 0.8)."""
        from mlx_lm import generate, load
        from mlx_lm.sample_utils import make_sampler

        with _quiet_transformers():  # it warns that it does not know model_type "localnorm"
            model, tokenizer = load(str(self.out_dir), trust_remote_code=True)
        mx.random.seed(self.config.seed)
        return generate(model, tokenizer, prompt or self.config.sample_prompt,
                        max_tokens=max_tokens or self.config.sample_tokens,
                        sampler=make_sampler(temp=0.8, top_p=0.95), verbose=False)

    def description(self) -> str:
        return f"{self.config.norm}/{self.config.placement}/{self.config.optimizer}"

    def title(self) -> str:
        c = self.config
        return (f"{super().title()}, {c.norm} + {c.placement} + {c.optimizer}, "
                f"batch {c.batch_size}x{c.seq_len}")


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)

