"""Pre-training: text in, a trained LocalNorm LM that mlx-lm can run out.

``Pretrainer(config).run()`` prepares the data (tokenizer + token files in ``out_dir``),
builds the model and optimizer, and runs a compiled training step with validation,
metrics, checkpoints and a progress bar. Ctrl-C checkpoints and exits cleanly;
``Pretrainer(config, resume=True)`` continues from the newest checkpoint so that every later
loss equals the uninterrupted run's. Under ``mlx.launch`` the batch is split over the
processes and gradients are averaged (data parallel); rank 0 writes all files.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
from functools import partial
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.utils import average_gradients
from mlx.optimizers import clip_grad_norm
from mlx.utils import tree_flatten, tree_map

from ..data import Batches, prepare_data
from ..models import Model, save_model
from ..optim import make_optimizer
from .checkpoint import (CheckpointError, list_checkpoints, load_checkpoint,
                         remove_leftovers, save_checkpoint)
from .config import RESUMABLE_CHANGES, PretrainConfig
from .metrics import MetricsLog, plot_metrics
from .schedule import lr_schedule

CONFIG_FILE = "train_config.json"
# Peak learning rates when the config leaves it unset.
DEFAULT_LR = {"adamw": 3e-3, "lamb": 3e-3, "lars": 0.1, "muon": 0.02, "normuon": 0.02,
              "scion": 0.02}
DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def resume_config(out_dir: str | Path, overrides: dict[str, Any] | None = None) -> PretrainConfig:
    """The saved config of the run in ``out_dir``, with the allowed ``overrides`` applied."""
    path = Path(out_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"--resume: {path} does not exist; is {out_dir} a run "
                                "directory? Start a run without --resume first")
    saved = json.loads(path.read_text())
    saved["out_dir"] = str(out_dir)
    for key, value in (overrides or {}).items():
        if key in saved and saved[key] != value and key not in RESUMABLE_CHANGES:
            raise ValueError(f"--resume: {key} cannot change in a resumed run (saved "
                             f"{saved[key]!r}, given {value!r}); only "
                             f"{', '.join(RESUMABLE_CHANGES)} can")
        saved[key] = value
    return PretrainConfig.from_dict(saved, where=str(path))


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


class Pretrainer:
    """One pre-training run (see the module docstring)."""

    def __init__(self, config: PretrainConfig, resume: bool = False):
        self.config = config
        self.out_dir = Path(config.out_dir)
        self.group = mx.distributed.init()
        self.rank, self.world = self.group.rank(), self.group.size()
        self.is_main = self.rank == 0
        if config.batch_size % (self.world * config.grad_accum):
            raise ValueError(f"batch_size={config.batch_size} must be divisible by "
                             f"processes x grad_accum = {self.world} x {config.grad_accum}")
        if self.is_main:
            remove_leftovers(self.out_dir)
        checkpoints = list_checkpoints(self.out_dir)
        if resume and not checkpoints:
            raise CheckpointError(f"--resume: {self.out_dir} has no checkpoint to resume from")
        if not resume and checkpoints:
            raise ValueError(f"{self.out_dir} already holds a run (checkpoints up to "
                             f"{checkpoints[-1].name}); pass --resume to continue it or choose "
                             "another out_dir")

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
        self.step, self.tokens_seen, self.elapsed = 0, 0, 0.0
        self._saved_step = None  # the step whose checkpoint is on disk, if any
        if resume:
            state = load_checkpoint(checkpoints[-1], self.model, self.optimizer)
            self.batches.load_state_dict(state["data"])
            self.step = self._saved_step = state["step"]
            self.tokens_seen, self.elapsed = state["tokens"], state["elapsed_s"]
        if self.is_main:
            self._write_config()
            self.metrics = MetricsLog(self.out_dir / "metrics.jsonl",
                                      resume_step=self.step if resume else None)
        self._train_step = self._compile_step()
        self._stop_requested = False

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

    def _barrier(self) -> None:
        if self.world > 1:
            mx.eval(mx.distributed.all_sum(mx.array(1.0), group=self.group))

    def _write_config(self) -> None:
        path = self.out_dir / CONFIG_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.config.to_dict(), indent=1))
        os.replace(tmp, path)

    def _compile_step(self):
        """A compiled step: value and gradient, data-parallel average, clipping, update."""
        model, optimizer, config = self.model, self.optimizer, self.config
        state = [model.state, optimizer.state]
        loss_and_grad = nn.value_and_grad(model, _cross_entropy)
        micro = config.batch_size // self.world // config.grad_accum

        def finish(loss, grads):
            if self.world > 1:
                grads = average_gradients(grads, group=self.group)
                loss = mx.distributed.all_sum(loss, group=self.group) / self.world
            if config.grad_clip > 0:
                grads, _ = clip_grad_norm(grads, config.grad_clip)
            optimizer.update(model, grads)
            return loss

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

    # ------------------------------------------------------------------ loop
    def _validation_batches(self) -> Batches | None:
        """Fixed-order validation batches, as large as the training batch if the text allows."""
        if self.data.valid is None:
            return None
        sequences = (len(self.data.valid.tokens) - 1) // self.config.seq_len
        if sequences == 0:
            return None
        return Batches(self.data.valid, min(self.config.batch_size, sequences),
                       self.config.seq_len, shuffle=False)

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

    def _checkpoint(self) -> None:
        """Save the current step unless it is already saved (e.g. Ctrl-C right after a save)."""
        if not self.is_main or self.step == self._saved_step:
            return
        state = {"data": self.batches.state_dict(), "tokens": self.tokens_seen,
                 "elapsed_s": self.elapsed, "config": self.config.to_dict()}
        save_checkpoint(self.out_dir, self.step, self.model, self.optimizer, state,
                        keep=self.config.keep_checkpoints)
        self._saved_step = self.step

    def _should_stop(self) -> bool:
        """A Ctrl-C on any process stops every process after the same step."""
        if self.world == 1:
            return self._stop_requested
        votes = mx.distributed.all_sum(mx.array(float(self._stop_requested)), group=self.group)
        return votes.item() > 0

    def _on_sigint(self, signum, frame) -> None:
        if self._stop_requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self._stop_requested = True

    def run(self, until: int | None = None) -> dict[str, Any]:
        """Train to ``total_steps`` (or stop after step ``until``), checkpoint, and finish.

        Returns a summary: ``step``, ``loss``, ``val_loss``, ``interrupted``.
        """
        config = self.config
        last = config.total_steps if until is None else min(until, config.total_steps)
        previous = signal.signal(signal.SIGINT, self._on_sigint) if _main_thread() else None
        bar = self._progress_bar(last)
        loss_value, val_loss = math.nan, None
        try:
            while self.step < last and not self._should_stop():
                inputs, targets = next(self.batches)
                start = time.perf_counter()
                loss = self._train_step(inputs, targets)
                mx.eval(loss, self.model.state, self.optimizer.state)
                seconds = time.perf_counter() - start
                self.step += 1
                self.elapsed += seconds
                self.tokens_seen += self.tokens_per_step
                loss_value = loss.item()
                if not math.isfinite(loss_value):
                    raise FloatingPointError(
                        f"training loss is {loss_value} at step {self.step}; lower the "
                        "learning_rate or raise warmup_steps (the last checkpoint is intact)")
                record = {"step": self.step, "loss": loss_value,
                          "lr": self._current_lr(), "tokens": self.tokens_seen,
                          "tokens_per_s": self.tokens_per_step / seconds,
                          "elapsed_s": self.elapsed}
                evaluate = (config.eval_every and self.step % config.eval_every == 0) or (
                    self.step == config.total_steps)
                if evaluate:
                    val_loss = self.evaluate()
                    if val_loss is not None:
                        record.update(val_loss=val_loss, val_ppl=math.exp(min(val_loss, 50)))
                if self.is_main and (self.step % config.log_every == 0 or evaluate):
                    self.metrics.log(record)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss_value:.3f}",
                                    tok_s=f"{record['tokens_per_s']:.0f}",
                                    **({"val": f"{val_loss:.3f}"} if val_loss else {}))
                if config.save_every and self.step % config.save_every == 0:
                    self._checkpoint()
        finally:
            if bar is not None:
                bar.close()
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
        interrupted = self.step < config.total_steps
        if interrupted:
            self._checkpoint()
        else:
            self._finish()
        if self.is_main:
            plot_metrics(self.metrics.records, self.out_dir / "loss.png", self._title())
        return {"step": self.step, "loss": loss_value, "val_loss": val_loss,
                "interrupted": interrupted}

    def _finish(self) -> None:
        """Final checkpoint, and the run directory made loadable by mlx-lm."""
        self._checkpoint()
        if self.is_main:
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

    # ------------------------------------------------------------------ helpers
    def _current_lr(self) -> float:
        lr = self.optimizer.learning_rate
        return float(lr.item() if isinstance(lr, mx.array) else lr)

    def _progress_bar(self, last: int):
        if not (self.is_main and self.config.progress):
            return None
        from tqdm.auto import tqdm

        return tqdm(total=last, initial=self.step, unit="step", dynamic_ncols=True,
                    desc=f"{self.config.norm}/{self.config.placement}/{self.config.optimizer}")

    def _title(self) -> str:
        c = self.config
        params = sum(v.size for _, v in tree_flatten(self.model.parameters()))
        return (f"{params / 1e6:.1f}M params, {c.norm} + {c.placement} + {c.optimizer}, "
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


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
