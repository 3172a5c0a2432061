"""The step loop every trainer shares: progress bar, metrics, evaluation, checkpoints,
Ctrl-C and exact resume.

A trainer subclasses :class:`TrainLoop`: its ``__init__`` calls ``super().__init__(config,
resume)``, builds ``self.model`` and ``self.optimizer``, then calls ``self._start()``, which
restores the newest checkpoint when resuming. It implements :meth:`train_step` (one
optimizer step) and, as it needs them, :meth:`eval_metrics`, :meth:`state_dict` /
:meth:`load_state_dict` (what a resumed run needs besides weights and optimizer state, e.g.
the data position), :meth:`on_checkpoint` (what to write next to each checkpoint) and
:meth:`finish` (what to write once the last step is done). A trainer that sets
``evaluate_at_start`` also logs :meth:`eval_metrics` as step 0 of a new run (the starting
point of a fine-tuning run's validation curve).

``config`` is a dataclass with ``to_dict()`` and the fields ``out_dir``, ``total_steps``,
``eval_every``, ``log_every``, ``save_every``, ``keep_checkpoints`` and ``progress``.
Under ``mlx.launch`` every process runs the loop; rank 0 writes all files.
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.nn.utils import average_gradients
from mlx.optimizers import clip_grad_norm
from mlx.utils import tree_flatten

from ..data._io import atomic_open
from .checkpoint import (CheckpointError, list_checkpoints, load_checkpoint,
                         remove_leftovers, save_checkpoint)
from .metrics import MetricsLog, plot_metrics

CONFIG_FILE = "train_config.json"


def saved_config(config_cls: type, out_dir: str | Path, overrides: dict[str, Any] | None,
                 resumable: tuple[str, ...]):
    """The config a run saved in ``out_dir`` (a ``config_cls``), with ``overrides`` applied;
    only the fields in ``resumable`` may differ from the saved values."""
    path = Path(out_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"--resume: {path} does not exist; is {out_dir} a run "
                                "directory? Start a run without --resume first")
    saved = json.loads(path.read_text())
    saved["out_dir"] = str(out_dir)
    overrides = overrides or {}
    refuse_changes(saved, overrides, resumable, "--resume")
    saved.update(overrides)
    return config_cls.from_dict(saved, where=str(path))


def refuse_changes(saved: dict, given: dict, resumable: tuple[str, ...], where: str) -> None:
    """ValueError naming the first field of ``given`` outside ``resumable`` whose value
    differs from ``saved``'s."""
    for key, value in given.items():
        if key in saved and saved[key] != value and key not in resumable:
            raise ValueError(f"{where}: {key} cannot change in a resumed run (saved "
                             f"{saved[key]!r}, given {value!r}); only "
                             f"{', '.join(resumable)} can")


def check_resumed_config(config: Any, out_dir: Path, resumable: tuple[str, ...]) -> None:
    """ValueError naming the first field of ``config`` outside ``resumable`` (and
    ``out_dir``) that differs from the run's saved config: a checkpoint holds what the saved
    settings shaped (e.g. an optimizer state), so a changed one would fail or silently mix."""
    path = out_dir / CONFIG_FILE
    if not path.is_file():
        return  # a checkpoint without its config: the checkpoint's own checks apply
    given = json.loads(json.dumps(config.to_dict()))  # tuples -> lists, as saved
    given.pop("out_dir", None)
    refuse_changes(json.loads(path.read_text()), given, resumable, "resume")


class TrainLoop:
    """One training run's loop (see the module docstring)."""

    evaluate_at_start = False
    resumable: tuple[str, ...] = ()  # config fields a resumed run may change

    def __init__(self, config: Any, resume: bool = False):
        self.config = config
        self.out_dir = Path(config.out_dir)
        self.group = mx.distributed.init()
        self.rank, self.world = self.group.rank(), self.group.size()
        self.is_main = self.rank == 0
        if self.is_main:
            remove_leftovers(self.out_dir)
        self._checkpoints = list_checkpoints(self.out_dir)
        if resume and not self._checkpoints:
            raise CheckpointError(f"--resume: {self.out_dir} has no checkpoint to resume from")
        if not resume and self._checkpoints:
            raise ValueError(f"{self.out_dir} already holds a run (checkpoints up to "
                             f"{self._checkpoints[-1].name}); pass --resume to continue it or "
                             "choose another out_dir")
        if resume:
            check_resumed_config(config, self.out_dir, self.resumable)
        self.resume = resume
        self.step, self.tokens_seen, self.elapsed = 0, 0, 0.0
        self._saved_step = None  # the step whose checkpoint is on disk, if any
        self._stop_requested = False

    def _start(self) -> None:
        """Restore the newest checkpoint when resuming and open the metrics log; call once
        ``self.model`` and ``self.optimizer`` exist."""
        if self.resume:
            state = load_checkpoint(self._checkpoints[-1], self.model, self.optimizer)
            self.step = self._saved_step = state["step"]
            self.tokens_seen, self.elapsed = state["tokens"], state["elapsed_s"]
            self.load_state_dict(state)
        if self.is_main:
            self._write_config()
            self.metrics = MetricsLog(self.out_dir / "metrics.jsonl",
                                      resume_step=self.step if self.resume else None)

    # ------------------------------------------------------------------ hooks
    def train_step(self) -> dict[str, float]:
        """Take one optimizer step (evaluated); return at least ``loss`` and ``tokens``
        (this step's token count) plus any other metrics to log."""
        raise NotImplementedError

    def eval_metrics(self) -> dict[str, float]:
        """Validation metrics logged every ``eval_every`` steps and at the last step."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """JSON-serializable state a resumed run needs besides weights and optimizer."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved (``state`` is the whole checkpoint state)."""

    def on_checkpoint(self, step: int) -> None:
        """Called on rank 0 after each checkpoint is on disk, including the one a Ctrl-C
        writes, e.g. to keep a loadable artifact next to it."""

    def finish(self) -> None:
        """Called on rank 0 after the last step's checkpoint, e.g. to export the model."""

    def title(self) -> str:
        """The plot's title."""
        params = sum(v.size for _, v in tree_flatten(self.model.parameters()))
        return f"{params / 1e6:.1f}M params"

    def description(self) -> str:
        """The progress bar's label."""
        return type(self).__name__

    def plot(self) -> None:
        plot_metrics(self.metrics.records, self.out_dir / "loss.png", self.title())

    # ------------------------------------------------------------------ loop
    def run(self, until: int | None = None) -> dict[str, Any]:
        """Train to ``total_steps`` (or stop after step ``until``), checkpoint, and finish.

        Returns a summary: ``step``, ``loss``, ``val_loss``, ``interrupted`` and
        ``start_val_loss`` (the validation loss before the first step when the trainer sets
        ``evaluate_at_start`` and this call started the run; else None).
        """
        config = self.config
        last = config.total_steps if until is None else min(until, config.total_steps)
        start_val_loss = self._evaluate_start() if self.step == 0 and not self.resume else None
        main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, self._on_sigint) if main_thread else None
        bar = self._progress_bar(last)
        loss_value, val_loss = math.nan, None
        try:
            while self.step < last and not self._should_stop():
                start = time.perf_counter()
                record = self.train_step()
                seconds = time.perf_counter() - start
                self.step += 1
                self.elapsed += seconds
                self.tokens_seen += record["tokens"]
                loss_value = record["loss"]
                if not math.isfinite(loss_value):
                    raise FloatingPointError(
                        f"training loss is {loss_value} at step {self.step}; lower the "
                        "learning_rate or raise warmup_steps (the last checkpoint is intact)")
                record = {"step": self.step, **record, "lr": self._current_lr(),
                          "tokens": self.tokens_seen, "tokens_per_s": record["tokens"] / seconds,
                          "elapsed_s": self.elapsed}
                evaluate = (config.eval_every and self.step % config.eval_every == 0) or (
                    self.step == config.total_steps)
                if evaluate:
                    record.update(self.eval_metrics())
                    val_loss = record.get("val_loss", val_loss)
                if self.is_main and (self.step % config.log_every == 0 or evaluate):
                    self.metrics.log(record)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(**self.postfix(record))
                if config.save_every and self.step % config.save_every == 0:
                    self._checkpoint()
        finally:
            if bar is not None:
                bar.close()
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
        interrupted = self.step < config.total_steps
        self._checkpoint()
        if self.is_main:
            if not interrupted:
                self.finish()
            self.plot()
        return {"step": self.step, "loss": loss_value, "val_loss": val_loss,
                "interrupted": interrupted, "start_val_loss": start_val_loss}

    def _evaluate_start(self) -> float | None:
        """Log the validation metrics of the untrained model as step 0 (if the trainer
        ``evaluate_at_start``); their ``val_loss``."""
        if not self.evaluate_at_start:
            return None
        metrics = self.eval_metrics()
        if metrics and self.is_main:
            self.metrics.log({"step": 0, "tokens": 0, **metrics})
        return metrics.get("val_loss")

    def postfix(self, record: dict[str, Any]) -> dict[str, str]:
        """What the progress bar shows after each step."""
        shown = {"loss": f"{record['loss']:.3f}", "tok_s": f"{record['tokens_per_s']:.0f}"}
        if "val_loss" in record:
            shown["val"] = f"{record['val_loss']:.3f}"
        return shown

    # ------------------------------------------------------------------ helpers
    def apply_gradients(self, loss: mx.array, grads: dict, grad_clip: float) -> mx.array:
        """Average ``loss`` and ``grads`` over the processes, clip the gradient norm to
        ``grad_clip`` (0: no clipping) and update the model: the end of a compiled step."""
        if self.world > 1:
            grads = average_gradients(grads, group=self.group)
            loss = mx.distributed.all_sum(loss, group=self.group) / self.world
        if grad_clip > 0:
            grads, _ = clip_grad_norm(grads, grad_clip)
        self.optimizer.update(self.model, grads)
        return loss

    def _write_config(self) -> None:
        with atomic_open(self.out_dir / CONFIG_FILE, "w") as f:
            f.write(json.dumps(self.config.to_dict(), indent=1))

    def _checkpoint(self) -> None:
        """Save the current step unless it is already saved (e.g. Ctrl-C right after a save)."""
        if not self.is_main or self.step == self._saved_step:
            return
        state = {**self.state_dict(), "tokens": self.tokens_seen, "elapsed_s": self.elapsed,
                 "config": self.config.to_dict()}
        save_checkpoint(self.out_dir, self.step, self.model, self.optimizer, state,
                        keep=self.config.keep_checkpoints)
        self._saved_step = self.step
        self.on_checkpoint(self.step)

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

    def _barrier(self) -> None:
        if self.world > 1:
            mx.eval(mx.distributed.all_sum(mx.array(1.0), group=self.group))

    def _current_lr(self) -> float:
        lr = self.optimizer.learning_rate
        return float(lr.item() if isinstance(lr, mx.array) else lr)

    def _progress_bar(self, last: int):
        if not (self.is_main and self.config.progress):
            return None
        from tqdm.auto import tqdm

        return tqdm(total=last, initial=self.step, unit="step", dynamic_ncols=True,
                    desc=self.description())
