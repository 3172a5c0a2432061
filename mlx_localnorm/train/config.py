"""``PretrainConfig``: one dataclass describes a whole pre-training run.

It is saved beside the checkpoints as ``train_config.json``; the CLI exposes every field as
a flag (``--field-name``) and a JSON/YAML file may set any of them (``--config FILE``).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..data.tokenizer import MIN_VOCAB_SIZE, MODEL_TYPES
from ..models import ModelArgs
from ..norms import NORMS
from ..optim import OPTIMIZERS
from ..placements import HYPERSPHERE_NORMS, PLACEMENTS

SCHEDULES = ("cosine", "wsd", "constant")
DTYPES = ("float32", "bfloat16", "float16")
# layer_pattern letters -> ModelArgs layer types.
LAYER_LETTERS = {"F": "full_attention", "S": "sliding_attention", "L": "linear_attention"}
# Fields a resumed run may change; everything else must match the saved config.
RESUMABLE_CHANGES = ("steps", "tokens", "eval_every", "save_every", "keep_checkpoints",
                     "log_every", "sample_tokens", "sample_prompt", "progress")


# A field's annotation -> (accepted types, how an error message names them).
_TYPES = {"int": (int, "an int"), "float": ((int, float), "a number"), "str": (str, "a string"),
          "bool": (bool, "True or False"), "dict": (dict, "a JSON object")}


def _help(text: str, **kw) -> Any:
    return field(metadata={"help": text}, **kw)


def check_field_types(config: Any, owner: str) -> None:
    """``TypeError`` unless every field of the dataclass ``config`` holds its annotated type
    (``X | None`` may be None); ``ValueError`` for a float field that is not finite."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        base, optional = field_type(f.type)
        if value is None and optional:
            continue
        # bool is an int to isinstance, but True is no step count
        if isinstance(value, bool) != (base == "bool") or not isinstance(value, _TYPES[base][0]):
            expected = _TYPES[base][1] + (" or None" if optional else "")
            raise TypeError(f"{owner}: {f.name} must be {expected}, got {value!r} "
                            f"({type(value).__name__})")
        if base == "float" and not math.isfinite(value):
            raise ValueError(f"{owner}: {f.name} must be a finite number, got {value!r}")


def field_type(annotation: str) -> tuple[str, bool]:
    """``("float", True)`` for a field annotated ``float | None``: the base type, and None."""
    parts = [p.strip() for p in annotation.split("|")]
    return next(p for p in parts if p != "None"), "None" in parts


@dataclass
class PretrainConfig:
    """Everything that defines a pre-training run (data, model, optimizer, schedule, I/O)."""

    # Data
    out_dir: str = _help("run directory: tokenizer, token files, checkpoints, metrics, model",
                         default="runs/pretrain")
    corpus: str = _help("'shakespeare' (embedded) or a .txt/.jsonl file or folder",
                        default="shakespeare")
    vocab_size: int = _help("sentencepiece vocabulary size", default=8192)
    tokenizer_type: str = _help("sentencepiece model: bpe or unigram", default="bpe")
    seq_len: int = _help("tokens per training sequence", default=256)
    batch_size: int = _help("sequences per optimizer step (global, over all processes)",
                            default=16)
    grad_accum: int = _help("micro-batches per step (batch_size must be divisible)", default=1)
    # Model
    norm: str = _help("norm of every block (a name of ln.NORMS)", default="seednorm")
    placement: str = _help("where the norms sit (a name of ln.PLACEMENTS)", default="peri")
    norm_options: dict = _help("extra make_norm options as JSON, e.g. '{\"num_heads\": 4}'",
                               default_factory=dict)
    qk_norm: str | None = _help("per-head norm of queries and keys (e.g. rmsnorm); none = off",
                                default=None)
    hidden_size: int = _help("residual stream width", default=256)
    num_layers: int = _help("transformer blocks", default=8)
    num_heads: int = _help("attention heads", default=4)
    num_kv_heads: int | None = _help("key/value heads (GQA); none = num_heads", default=None)
    intermediate_size: int | None = _help("MLP width; none = 3 * hidden_size", default=None)
    context_length: int = _help("longest sequence the model is meant for", default=1024)
    layer_pattern: str | None = _help(
        "block types repeated to num_layers: F full attention, S sliding window, L linear "
        "attention (Gated DeltaNet), e.g. LLLF; none = all F", default=None)
    sliding_window: int = _help("window of the S blocks of layer_pattern", default=256)
    dtype: str = _help("parameter and activation dtype (float32 on CPUs: bf16 has no BLAS)",
                       default="float32")
    grad_checkpoint: bool = _help("recompute block activations in the backward pass",
                                  default=False)
    # Optimizer and schedule
    optimizer: str = _help("a name of ln.optim.OPTIMIZERS", default="muon")
    learning_rate: float | None = _help(
        "peak learning rate of the main optimizer; none = its default (muon/normuon/scion 0.02, "
        "adamw/lamb 3e-3, lars 0.1)", default=None)
    adamw_learning_rate: float = _help(
        "peak learning rate of the AdamW group (embeddings, head, norms) of muon/normuon/scion",
        default=3e-3)
    weight_decay: float | None = _help("decoupled weight decay of the main optimizer; none = "
                                       "its default", default=None)
    schedule: str = _help("learning-rate schedule: cosine, wsd (warmup-stable-decay) or "
                          "constant", default="cosine")
    warmup_steps: int = _help("linear warm-up steps", default=20)
    min_lr_ratio: float = _help("final learning rate as a fraction of the peak", default=0.1)
    decay_fraction: float = _help("wsd: fraction of the steps spent decaying", default=0.2)
    grad_clip: float = _help("clip the global gradient norm to this; 0 = off", default=1.0)
    # Budget, evaluation, checkpoints
    steps: int = _help("optimizer steps (ignored when tokens > 0)", default=300)
    tokens: int = _help("token budget; > 0 sets steps = ceil(tokens / tokens per step)",
                        default=0)
    eval_every: int = _help("validation loss every this many steps (0 = only at the end)",
                            default=50)
    eval_batches: int = _help("validation batches per evaluation", default=8)
    save_every: int = _help("checkpoint every this many steps (0 = only at the end)",
                            default=100)
    keep_checkpoints: int = _help("how many recent checkpoints to keep", default=3)
    log_every: int = _help("metrics.jsonl line every this many steps", default=1)
    seed: int = _help("seed of the initialization and the data order", default=0)
    sample_tokens: int = _help("tokens generated from the trained model at the end (0 = none)",
                               default=80)
    sample_prompt: str = _help("prompt of the final sample", default="ROMEO:")
    progress: bool = _help("show a progress bar", default=True)

    def __post_init__(self):
        self.validate()

    @property
    def total_steps(self) -> int:
        per_step = self.batch_size * self.seq_len
        return math.ceil(self.tokens / per_step) if self.tokens > 0 else self.steps

    def validate(self) -> None:
        """Check every field before any work: types, ranges, names, and that the model fits."""
        self._check_types()
        for name in ("vocab_size", "seq_len", "batch_size", "grad_accum", "hidden_size",
                     "num_layers", "num_heads", "context_length", "sliding_window", "eval_batches",
                     "keep_checkpoints", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"PretrainConfig: {name} must be a positive int, got "
                                 f"{getattr(self, name)!r}")
        for name in ("steps", "tokens", "eval_every", "save_every", "warmup_steps", "seed",
                     "sample_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"PretrainConfig: {name} must be an int >= 0, got "
                                 f"{getattr(self, name)!r}")
        if self.vocab_size < MIN_VOCAB_SIZE:
            raise ValueError(f"PretrainConfig: vocab_size must be an int >= {MIN_VOCAB_SIZE} "
                             f"(sentencepiece's special and byte pieces + 1), got "
                             f"{self.vocab_size!r}")
        if self.total_steps < 1:
            raise ValueError("PretrainConfig: steps (or tokens) must be positive")
        if self.seq_len > self.context_length:
            raise ValueError(f"PretrainConfig: seq_len={self.seq_len} is longer than the "
                             f"model's context_length={self.context_length}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"PretrainConfig: grad_accum={self.grad_accum} must divide "
                             f"batch_size={self.batch_size}")
        self._check_optimization()
        for name, choices in (("schedule", SCHEDULES), ("dtype", DTYPES),
                              ("tokenizer_type", MODEL_TYPES), ("optimizer", sorted(OPTIMIZERS)),
                              ("norm", sorted(NORMS)), ("placement", list(PLACEMENTS)),
                              ("qk_norm", [*sorted(NORMS), None])):
            if getattr(self, name) not in choices:
                raise ValueError(f"PretrainConfig: {name} must be one of {choices}, got "
                                 f"{getattr(self, name)!r}")
        self.layer_types()
        try:
            self.model_args()
        except (ValueError, TypeError) as err:
            raise type(err)(f"PretrainConfig: the model settings do not fit: {err}") from None

    def _check_types(self) -> None:
        check_field_types(self, "PretrainConfig")

    def _check_optimization(self) -> None:
        for name in ("learning_rate", "adamw_learning_rate"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"PretrainConfig: {name} must be > 0, got {value!r}")
        for name in ("weight_decay", "grad_clip"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"PretrainConfig: {name} must be >= 0, got {value!r}")
        if not 0 <= self.min_lr_ratio <= 1 or not 0 < self.decay_fraction <= 1:
            raise ValueError(f"PretrainConfig: min_lr_ratio must be in [0, 1] and "
                             f"decay_fraction in (0, 1], got {self.min_lr_ratio!r}, "
                             f"{self.decay_fraction!r}")

    def model_args(self, vocab_size: int | None = None) -> ModelArgs:
        """The model this run trains; ``vocab_size``: the tokenizer's (default: the config's)."""
        return ModelArgs(
            vocab_size=self.vocab_size if vocab_size is None else vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            intermediate_size=self.intermediate_size or 3 * self.hidden_size,
            max_position_embeddings=self.context_length,
            norm_type=None if self.placement in HYPERSPHERE_NORMS else self.norm,
            norm_options=self.norm_options,
            placement=self.placement,
            qk_norm=self.qk_norm,
            tie_word_embeddings=True,
            layer_types=self.layer_types(),
            sliding_window=self.sliding_window,
        )

    def layer_types(self) -> list[str]:
        """``layer_pattern`` repeated to ``num_layers`` blocks, as ModelArgs layer types."""
        pattern = "F" if self.layer_pattern is None else self.layer_pattern
        if not pattern or set(pattern) - set(LAYER_LETTERS) or self.num_layers % len(pattern):
            raise ValueError(f"PretrainConfig: layer_pattern must be letters of "
                             f"{''.join(LAYER_LETTERS)} whose length divides num_layers="
                             f"{self.num_layers}, got {self.layer_pattern!r}")
        return [LAYER_LETTERS[c] for c in pattern * (self.num_layers // len(pattern))]

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str | None = None) -> PretrainConfig:
        """A config from field values; error messages name ``where`` (e.g. their file)."""
        cls._check_fields(values, where or "PretrainConfig")
        try:
            return cls(**values)
        except (ValueError, TypeError) as err:
            if where is None:
                raise
            raise type(err)(f"{where}: {err}") from None

    @classmethod
    def _check_fields(cls, values: Any, where: str) -> None:
        if not isinstance(values, dict):
            raise ValueError(f"{where}: expected a mapping of config fields, got "
                             f"{type(values).__name__}")
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            raise ValueError(f"{where}: unknown config field(s) {unknown}; valid fields: "
                             f"{', '.join(cls.field_names())}")

    @classmethod
    def read(cls, path: str | Path) -> dict[str, Any]:
        """The field values in a JSON or YAML file; its syntax and field names are checked."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
            values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except UnicodeDecodeError:
            raise ValueError(f"config file {path} is not UTF-8 text") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"config file {path} is not valid JSON: {err}") from None
        except yaml.YAMLError as err:
            raise ValueError(f"config file {path} is not valid YAML: {_yaml_problem(err)}"
                             ) from None
        values = {} if values is None else values
        cls._check_fields(values, str(path))
        return values


def _yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's multi-line message in one line: the problem and where it is."""
    mark = getattr(err, "problem_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
    return f"{getattr(err, 'problem', None) or err}{where}"
