"""Quantization-aware fine-tuning: ``QATTrainer(config).run()`` loads a float model,
swaps in fake-quantized layers (``prepare_qat``), trains them on a text corpus or mlx-lm
fine-tuning JSONL with cross-entropy or distillation from the float model's logits, and
writes the exported quantized model into ``out_dir`` (``mlx_lm.load`` reads it). It runs
in the shared :class:`~mlx_localnorm.train.loop.TrainLoop`: progress bar, metrics, loss
plot, Ctrl-C checkpoint and exact resume.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
from dataclasses import dataclass, field
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np

from ..data import Batches, Corpus, SFTBatches, load_corpus, load_sft, masked_cross_entropy
from ..data.sft import read_jsonl
from ..models import Model
from ..optim import Averaged
from ..optim._checks import check_positive
from ..train.loop import TrainLoop
from ..train.model_dir import load_model_dir
from ..train.schedule import lr_schedule
from .fake import check_quantization
from .layers import SCALE_INITS, QATEmbedding, prepare_qat, qat_layers
from .save import save


@dataclass
class QATConfig:
    """One QAT run; every field is a ``mlx-localnorm qat`` flag."""

    model: str = field(default="", metadata={"help": "float model directory mlx_lm.load reads"})
    out_dir: str = field(default="runs/qat", metadata={
        "help": "run directory: checkpoints, metrics, loss.png and the quantized model"})
    bits: int = field(default=4, metadata={"help": "bits per weight"})
    group_size: int = field(default=64, metadata={"help": "weights per quantization group"})
    mode: str = field(default="affine", metadata={"help": "affine | mxfp4 | nvfp4 | mxfp8"})
    embeddings: bool = field(default=True, metadata={
        "help": "quantize the embedding (and a tied head) too, as mlx_lm's quantize_model"})
    learn_scales: bool = field(default=False, metadata={
        "help": "learn each group's scale and bias (LSQ+, affine only)"})
    scale_init: str = field(default="minmax", metadata={
        "help": "learn_scales: start from mx.quantize's min-max grid (minmax) or each "
        "group's least-squared-error range (mse)"})
    scale_lr_ratio: float = field(default=1.0, metadata={
        "help": "learn_scales: the scales' and biases' learning rate as a fraction of "
        "learning_rate"})
    embedding_lr_ratio: float = field(default=1.0, metadata={
        "help": "the quantized embedding's (and so a tied head's) weight learning rate as a "
        "multiple of learning_rate"})
    average_last: int = field(default=0, metadata={
        "help": "evaluate and export the mean of the parameters over the last N steps (SWA, "
        "arXiv 1803.05407); 0: the last step's"})
    clip: bool = field(default=False, metadata={
        "help": "straight-through gradient zero where the grid saturates"})
    train_others: bool = field(default=True, metadata={
        "help": "also train norms, biases and other float parameters"})
    distill: bool = field(default=False, metadata={
        "help": "loss: KL(float model || QAT model) on the logits instead of cross-entropy"})
    data: str | None = field(default=None, metadata={
        "help": "None: Shakespeare; a text corpus (.txt/.jsonl of 'text' or a folder); or "
        "mlx-lm fine-tuning JSONL (completions/chat file, or a folder with train.jsonl and "
        "valid.jsonl; prompts masked out)"})
    batch_size: int = field(default=8, metadata={"help": "sequences per step"})
    seq_len: int = field(default=128, metadata={"help": "tokens per sequence"})
    total_steps: int = field(default=200, metadata={"help": "optimizer steps"})
    learning_rate: float = field(default=1e-4, metadata={"help": "Adam peak learning rate"})
    warmup_steps: int = field(default=10, metadata={"help": "linear warm-up steps"})
    eval_every: int = field(default=50, metadata={"help": "validate every N steps (0: end)"})
    eval_batches: int = field(default=8, metadata={
        "help": "held-out batches per evaluation (0: the whole held-out set)"})
    log_every: int = field(default=10, metadata={"help": "log metrics every N steps"})
    save_every: int = field(default=100, metadata={"help": "checkpoint every N steps (0: end)"})
    keep_checkpoints: int = field(default=2, metadata={"help": "checkpoints kept"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})
    seed: int = field(default=0, metadata={"help": "data order seed"})

    def __post_init__(self):
        check_quantization(self.group_size, self.bits, self.mode, "qat")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type == "bool" and value not in (True, False):
                raise TypeError(f"qat: {f.name} must be True or False, got {value!r}")
            if f.type == "int" and (isinstance(value, bool) or not isinstance(value, int)):
                raise TypeError(f"qat: {f.name} must be an int, got {value!r}")
        for name in ("batch_size", "seq_len", "total_steps", "log_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"qat: {name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "average_last", "eval_every", "eval_batches", "save_every",
                     "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"qat: {name} must be >= 0, got {getattr(self, name)}")
        if self.average_last > self.total_steps:
            raise ValueError(f"qat: average_last must be <= total_steps={self.total_steps}, "
                             f"got {self.average_last}")
        for name in ("learning_rate", "scale_lr_ratio", "embedding_lr_ratio"):
            check_positive(getattr(self, name), name, "qat")
        for name, needs in (("scale_lr_ratio", "learn_scales"),
                            ("embedding_lr_ratio", "embeddings")):
            if getattr(self, name) != 1.0 and not getattr(self, needs):
                raise ValueError(f"qat: {name} applies with {needs} only, got "
                                 f"{getattr(self, name)!r} without it")
        if self.learn_scales and self.mode != "affine":
            raise ValueError(f"qat: learn_scales needs mode='affine', got {self.mode!r}")
        if self.scale_init not in SCALE_INITS:
            raise ValueError(f"qat: scale_init must be one of {SCALE_INITS}, got "
                             f"{self.scale_init!r}")
        if self.scale_init != "minmax" and not self.learn_scales:
            raise ValueError(f"qat: scale_init={self.scale_init!r} applies with learn_scales "
                             "only")
        if not self.model:
            raise ValueError("qat: --model is required (a float model directory)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class TokenData:
    """A corpus as two token arrays (documents joined by EOS) in a model's own tokenizer."""

    train: np.ndarray
    valid: np.ndarray


def tokenize(source: str | Corpus | None, tokenizer) -> TokenData:
    """``load_corpus(source)`` (None: Shakespeare) encoded with an mlx-lm tokenizer."""
    corpus = source if isinstance(source, Corpus) else load_corpus(source)
    if not corpus.valid:
        raise ValueError(f"qat: data {corpus.source!r} has no held-out documents (give a "
                         "folder of several files or a .jsonl of several lines)")
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def encode(texts: list[str]) -> np.ndarray:
        return np.array([t for text in texts for t in tokenizer.encode(text) + eos],
                        dtype=np.int32)

    return TokenData(encode(corpus.train), encode(corpus.valid))


def load_float_model(path: str) -> tuple[nn.Module, Any, dict]:
    """``(model, tokenizer, config)`` of a float model directory (a quantized one is refused)."""
    model, tokenizer, config = load_model_dir(path)
    if "quantization" in config:
        raise ValueError(f"--model: {path} is already quantized; QAT starts from float weights")
    return model, tokenizer, config


def _is_fine_tuning_data(source: str | None) -> bool:
    """mlx-lm's layout (a folder with train.jsonl) or a JSONL of completions/chat records."""
    if source is None:
        return False
    path = Path(source)
    if (path / "train.jsonl").is_file():
        return True
    return path.suffix == ".jsonl" and path.is_file() and read_jsonl(path)[0] != "text"


def _with_mask(batch: tuple) -> tuple[mx.array, mx.array, mx.array]:
    if len(batch) == 3:
        return batch
    inputs, targets = batch
    return inputs, targets, mx.ones(targets.shape, dtype=mx.float32)


class QATData:
    """Training and fixed held-out batches ``(inputs, targets, mask)``: a text corpus in the
    model's tokenizer (mask all ones), or mlx-lm fine-tuning JSONL (``ln.data.load_sft``:
    prompt tokens masked out, one example per row)."""

    def __init__(self, source: str | None, tokenizer, batch_size: int, seq_len: int,
                 seed: int):
        self.fine_tuning = _is_fine_tuning_data(source)
        if self.fine_tuning:
            sft = load_sft(source, tokenizer)
            if not sft.valid:
                raise ValueError(f"qat: data {source} has no valid.jsonl; held-out perplexity "
                                 "needs one")
            self.tokens = None
            self.train = SFTBatches(sft.train, batch_size, seq_len, seed=seed)
            self.valid = SFTBatches(sft.valid, batch_size, seq_len, shuffle=False)
        else:
            self.tokens = tokenize(source, tokenizer)
            self.train = Batches(self.tokens.train, batch_size, seq_len, seed=seed)
            sequences = (len(self.tokens.valid) - 1) // seq_len
            self.valid = Batches(self.tokens.valid, max(1, min(batch_size, sequences)),
                                 seq_len, shuffle=False)

    def next_batch(self) -> tuple[mx.array, mx.array, mx.array]:
        return _with_mask(next(self.train))

    def held_out(self, batches: int):
        """The first ``batches`` validation batches (0: all of them), always the same; with
        text data the last batch is smaller when the held-out sequences do not fill it."""
        every = self.valid.epoch_batches(remainder=True)
        return (_with_mask(b) for b in islice(every, batches or None))

    def held_out_tokens(self, batches: int) -> int:
        """How many target tokens ``held_out(batches)`` scores (prompts excluded)."""
        return int(sum(mask.sum().item() for _, _, mask in self.held_out(batches)))


def cross_entropy(model: nn.Module, inputs: mx.array, targets: mx.array,
                  mask: mx.array) -> mx.array:
    return masked_cross_entropy(model(inputs).astype(mx.float32), targets, mask)


def distillation(model: nn.Module, inputs: mx.array, teacher_logits: mx.array,
                 mask: mx.array) -> mx.array:
    """Mean over the masked tokens of ``KL(p_teacher || p_student) = sum p_t (log p_t -
    log p_s)``."""
    student = nn.log_softmax(model(inputs).astype(mx.float32), axis=-1)
    teacher = nn.log_softmax(teacher_logits.astype(mx.float32), axis=-1)
    kl = (mx.exp(teacher) * (teacher - student)).sum(-1)
    return (kl * mask).sum() / mx.maximum(mask.sum(), 1.0)


def held_out_loss(model: nn.Module, data: QATData, batches: int) -> float:
    """Cross-entropy per target token over the first ``batches`` held-out batches (0: all)."""
    total, count = 0.0, 0.0
    for inputs, targets, mask in data.held_out(batches):
        tokens = mask.sum().item()
        total += cross_entropy(model, inputs, targets, mask).item() * tokens
        count += tokens
    return total / max(count, 1.0)


def make_optimizer(config: QATConfig, model: nn.Module) -> optim.Optimizer:
    """:func:`group_optimizer`, wrapped in :class:`~mlx_localnorm.optim.Averaged` over the
    last ``average_last`` steps when set."""
    optimizer = group_optimizer(config, model)
    if config.average_last:
        optimizer = Averaged(optimizer, start=config.total_steps - config.average_last + 1)
    return optimizer


def group_optimizer(config: QATConfig, model: nn.Module) -> optim.Optimizer:
    """Adam on the warm-up + cosine schedule, per group at a multiple of the rate: with
    learned scales their ``scales`` and ``biases`` at ``scale_lr_ratio`` (LSQ steps the scales
    with their own size in mind, arXiv 1902.08153), the quantized embedding's weight at
    ``embedding_lr_ratio`` (the tied embedding holds most of the 3-bit gap of the demo
    model, docs/quant.md)."""
    def adam(ratio: float) -> optim.Adam:
        return optim.Adam(learning_rate=lr_schedule(config.learning_rate * ratio,
                                                    config.total_steps, config.warmup_steps))

    groups = []  # (ratio, which parameters); the rest train at the peak rate
    if config.embedding_lr_ratio != 1.0:
        embedding_weights = {f"{path}.weight" for path, layer in qat_layers(model).items()
                             if isinstance(layer, QATEmbedding)}
        if not embedding_weights:
            raise ValueError(f"qat: embedding_lr_ratio={config.embedding_lr_ratio:g} needs a "
                             "quantized embedding, and this model has none (its width must be "
                             f"a multiple of group_size={config.group_size})")
        groups.append((config.embedding_lr_ratio,
                       lambda path, _: path in embedding_weights))
    if config.learn_scales:
        groups.append((config.scale_lr_ratio,
                       lambda path, _: path.endswith((".scales", ".biases"))))
    if not groups:
        return adam(1.0)

    def rest(path, value):
        return not any(chosen(path, value) for _, chosen in groups)

    # the peak-rate group first: its rate is the run's logged "lr"; the last takes the rest
    return optim.MultiOptimizer([adam(1.0)] + [adam(ratio) for ratio, _ in groups],
                                [rest] + [chosen for _, chosen in groups[:-1]])


class QATTrainer(TrainLoop):
    """One QAT run (see the module docstring)."""

    # what only changes how the run reports and checkpoints; the rest shapes its state
    resumable = ("eval_every", "eval_batches", "log_every", "save_every", "keep_checkpoints",
                 "progress")

    def __init__(self, config: QATConfig, resume: bool = False):
        super().__init__(config, resume)
        self.model, self.tokenizer, self.model_config = load_float_model(config.model)
        self.teacher = load_float_model(config.model)[0] if config.distill else None
        self.data = QATData(config.data, self.tokenizer, config.batch_size, config.seq_len,
                            config.seed)
        self.tokens_per_step = config.batch_size * config.seq_len
        prepare_qat(self.model, config.bits, config.group_size, config.mode,
                    embeddings=config.embeddings, learn_scales=config.learn_scales,
                    scale_init=config.scale_init, clip=config.clip,
                    train_others=config.train_others)
        self.optimizer = make_optimizer(config, self.model)
        self.optimizer.init(self.model.trainable_parameters())
        self._start()
        self._train_step = self._compile_step()

    def _compile_step(self):
        model, optimizer = self.model, self.optimizer
        state = [model.state, optimizer.state]
        loss_and_grad = nn.value_and_grad(model, distillation if self.teacher else
                                          cross_entropy)

        @partial(mx.compile, inputs=state, outputs=state)
        def step(inputs, targets, mask):
            loss, grads = loss_and_grad(model, inputs, targets, mask)
            optimizer.update(model, grads)
            return loss

        return step

    def train_step(self) -> dict[str, float]:
        inputs, targets, mask = self.data.next_batch()
        if self.teacher is not None:  # the float model's logits are the targets
            targets = mx.stop_gradient(self.teacher(inputs))
        loss = self._train_step(inputs, targets, mask)
        mx.eval(loss, self.model.state, self.optimizer.state)
        return {"loss": loss.item(), "tokens": self.tokens_per_step}

    def eval_metrics(self) -> dict[str, float]:
        """Held-out loss of the model as it would be exported (the running mean with
        ``average_last``)."""
        trained = self.model.trainable_parameters()
        self._use_exported_weights()
        try:
            loss = held_out_loss(self.model, self.data, self.config.eval_batches)
        finally:
            self.model.update(trained)
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50))}

    def _use_exported_weights(self) -> None:
        if isinstance(self.optimizer, Averaged):
            self.model.update(self.optimizer.averaged(self.model.trainable_parameters()))

    def state_dict(self) -> dict[str, Any]:
        return {"data": self.data.train.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.data.train.load_state_dict(state["data"])

    def finish(self) -> None:
        """Export the real quantized model and write it into ``out_dir``; ``self.model``
        keeps the exported weights (the mean with ``average_last``)."""
        self._use_exported_weights()
        staging = self.out_dir / ".export"
        if staging.exists():  # our scratch directory, left by a killed export
            shutil.rmtree(staging)
        config = None if isinstance(self.model, Model) else self.model_config
        save(self.model, self.tokenizer, staging, config, source_dir=self.config.model)
        for item in staging.iterdir():
            os.replace(item, self.out_dir / item.name)
        staging.rmdir()

    def description(self) -> str:
        c = self.config
        return f"qat {c.bits}-bit {c.mode}" + (" distill" if c.distill else "")

    def title(self) -> str:
        c = self.config
        return (f"QAT {c.bits}-bit {c.mode} g{c.group_size}, "
                f"{'KL to float' if c.distill else 'cross-entropy'}, "
                f"batch {c.batch_size}x{c.seq_len}")
