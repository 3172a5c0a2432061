"""Per-layer diagnostics of a model: how each placement moves and clusters the tokens.

On a batch of held-out text, with ``h_0`` the input of the first block (the embeddings) and
``h_l`` the output of block ``l`` (the residual stream the next block reads):

- ``hidden_rms[l] = sqrt(mean(h_l^2))`` over every entry: how the stream's scale grows.
- ``cosine[l]``: the mean cosine similarity of all pairs ``i != j`` of token vectors of one
  sequence, averaged over sequences (1 = every token points the same way).
- ``speed[l]``: the mean angle (radians) between a token's ``h_{l-1}`` and ``h_l``, the
  distance block ``l`` moves it on the sphere: tokens seen as particles that cluster with
  depth (arXiv 2312.10794), at a speed the placement sets.
- ``grad_norm[l]``: the L2 norm of the loss gradient over all parameters of block ``l``.
- ``update_rms[l, matrix]``: ``sqrt(mean((W' - W)^2))`` for each weight matrix of block
  ``l`` after one optimizer step on the same batch. **Decision**: one real step (at the
  run's peak learning rates, a constant schedule) rather than the difference of two
  checkpoints, which averages many steps (their updates partly cancel) and follows the
  schedule's decay. "init" uses a fresh optimizer; "trained" the run's saved optimizer
  state (its momenta) from its newest checkpoint. A model directory without a run gets a
  fresh ``--optimizer`` for both.

Each is measured "init" (the model re-initialized from the run's config with its seed, as
the trainer does at step 0) and "trained" (the newest checkpoint, or the model directory's
weights). Statistics are computed in float64 NumPy.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.optimizers import clip_grad_norm
from mlx.utils import tree_flatten, tree_unflatten

from .._argparse import OneLineParser

STAGES = ("init", "trained")
METRICS = ("hidden_rms", "cosine", "speed", "grad_norm", "update_rms")
COLUMNS = ("label", "stage", "metric", "layer", "matrix", "value")
PROG = "mlx-localnorm diagnose"


# ---------------------------------------------------------------------- statistics
def rms(h: np.ndarray) -> float:
    """``sqrt(mean(h^2))`` over every entry, in float64."""
    h = np.asarray(h, dtype=np.float64)
    return float(np.sqrt(np.mean(h * h)))


def _unit(h: np.ndarray) -> np.ndarray:
    h = np.asarray(h, dtype=np.float64)
    norm = np.linalg.norm(h, axis=-1, keepdims=True)
    return h / np.maximum(norm, np.finfo(np.float64).tiny)


def mean_pairwise_cosine(h: np.ndarray) -> float:
    """Mean of ``cos(h[b, i], h[b, j])`` over pairs ``i != j`` of each sequence ``b``, then
    over sequences; ``h`` is ``(batch, tokens, dims)`` with at least 2 tokens."""
    u = _unit(h)
    tokens = u.shape[1]
    if tokens < 2:
        raise ValueError(f"mean_pairwise_cosine needs at least 2 tokens, got shape {u.shape}")
    sums = np.einsum("btd,bsd->b", u, u)  # sum over all pairs (i, j), diagonal included
    diagonal = np.einsum("btd,btd->b", u, u)
    return float(np.mean((sums - diagonal) / (tokens * (tokens - 1))))


def angles(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Angle between matching vectors of ``a`` and ``b`` (last axis), in radians.

    ``2 atan2(|u - v|, |u + v|)`` of the unit vectors (Kahan): exact near 0 and pi, where
    ``arccos`` of a rounded cosine is not.
    """
    u, v = _unit(a), _unit(b)
    return 2 * np.arctan2(np.linalg.norm(u - v, axis=-1), np.linalg.norm(u + v, axis=-1))


# ---------------------------------------------------------------------- model readings
class _Recorder(nn.Module):
    """Calls a block and hands its input (first block only) and output to ``sink``."""

    def __init__(self, block: nn.Module, sink: Callable, first: bool):
        super().__init__()
        self.block, self.sink, self.first = block, sink, first

    def __call__(self, x, *args, **kwargs):
        if self.first:
            self.sink(x)
        out = self.block(x, *args, **kwargs)
        self.sink(out)
        return out


def _owner(model: nn.Module) -> nn.Module:
    """The module whose ``layers`` list the forward pass walks (``model.model`` in mlx-lm)."""
    return model.model if "model" in model and "layers" in model.model else model


def hidden_states(model: nn.Module, inputs: mx.array) -> list[np.ndarray]:
    """``[h_0, ..., h_L]`` (float64): the first block's input, then every block's output."""
    owner, states = _owner(model), []
    blocks = owner.layers
    owner.layers = [_Recorder(b, states.append, i == 0) for i, b in enumerate(blocks)]
    try:
        model(inputs)
    finally:
        owner.layers = blocks
    return [np.array(s.astype(mx.float32), dtype=np.float64) for s in states]


def _loss(model: nn.Module, inputs: mx.array, targets: mx.array) -> mx.array:
    return nn.losses.cross_entropy(model(inputs).astype(mx.float32), targets, reduction="mean")


def tree_norm(tree: Any) -> float:
    """The L2 norm of all arrays of a parameter tree together (float64)."""
    return float(np.sqrt(sum(np.sum(np.array(v, dtype=np.float64) ** 2)
                             for _, v in tree_flatten(tree))))


def layer_grad_norms(model: nn.Module, inputs: mx.array, targets: mx.array) -> list[float]:
    """``[|grad of block 1|, ..., |grad of block L|]`` of the mean cross-entropy."""
    _, grads = nn.value_and_grad(model, _loss)(model, inputs, targets)
    layers = grads["model"]["layers"] if "model" in grads else grads["layers"]
    return [tree_norm(g) for g in layers]


def update_rms(model: nn.Module, optimizer, inputs: mx.array, targets: mx.array,
               grad_clip: float = 0.0) -> list[tuple[int, str, float]]:
    """``(block, matrix, RMS(W' - W))`` for every 2-D weight of every block after one step
    of ``optimizer`` on the batch; the model's weights are restored afterwards."""
    before = tree_flatten(model.trainable_parameters())
    _, grads = nn.value_and_grad(model, _loss)(model, inputs, targets)
    if grad_clip > 0:
        grads, _ = clip_grad_norm(grads, grad_clip)
    optimizer.update(model, grads)
    mx.eval(model.parameters())
    after = dict(tree_flatten(model.trainable_parameters()))
    model.update(tree_unflatten(before))
    rows = []
    prefix = "model.layers." if "model" in model else "layers."
    for name, old in before:
        if old.ndim == 2 and name.startswith(prefix):
            block, matrix = name[len(prefix):].split(".", 1)
            rows.append((int(block) + 1, matrix.removesuffix(".weight"),
                         rms(np.array(after[name]) - np.array(old))))
    return rows


def measure(model: nn.Module, optimizer, inputs: mx.array, targets: mx.array,
            grad_clip: float = 0.0) -> list[dict[str, Any]]:
    """Every metric of the module docstring as rows ``metric, layer, matrix, value``."""
    states = hidden_states(model, inputs)
    rows = [{"metric": "hidden_rms", "layer": l, "value": rms(h)} for l, h in enumerate(states)]
    rows += [{"metric": "cosine", "layer": l, "value": mean_pairwise_cosine(h)}
             for l, h in enumerate(states)]
    rows += [{"metric": "speed", "layer": l, "value": float(np.mean(angles(a, b)))}
             for l, (a, b) in enumerate(zip(states, states[1:]), start=1)]
    rows += [{"metric": "grad_norm", "layer": l, "value": g}
             for l, g in enumerate(layer_grad_norms(model, inputs, targets), start=1)]
    rows += [{"metric": "update_rms", "layer": l, "matrix": m, "value": v}
             for l, m, v in update_rms(model, optimizer, inputs, targets, grad_clip)]
    return [{"matrix": "", **r} for r in rows]


# ---------------------------------------------------------------------- run / model directories
@dataclasses.dataclass
class Subject:
    """What is diagnosed: the two models, their optimizers, the batch and the clip."""

    models: dict[str, nn.Module]
    optimizers: dict[str, Any]
    inputs: mx.array
    targets: mx.array
    grad_clip: float = 0.0


def load_subject(path: str | Path, batch_size: int = 4, seq_len: int = 128,
                 optimizer: str = "adamw", seed: int = 0) -> Subject:
    """A run directory (``train_config.json``) or an mlx-lm model directory."""
    path = Path(path)
    if (path / "train_config.json").is_file():
        return _run_subject(path, batch_size, seq_len)
    if (path / "config.json").is_file():
        return _model_subject(path, batch_size, seq_len, optimizer, seed)
    raise FileNotFoundError(f"{path} is neither a run directory (train_config.json) nor a "
                            "model directory (config.json)")


def _run_subject(path: Path, batch_size: int, seq_len: int) -> Subject:
    from ..data import Batches, TokenFile
    from ..models import Model
    from ..train import PretrainConfig, list_checkpoints, load_checkpoint
    from ..train.pretrain import make_training_optimizer

    saved = json.loads((path / "train_config.json").read_text())
    config = PretrainConfig.from_dict({**saved, "out_dir": str(path), "schedule": "constant",
                                       "warmup_steps": 0}, where=str(path))
    checkpoints = list_checkpoints(path)
    if not checkpoints:
        raise FileNotFoundError(f"{path} has no checkpoint to diagnose")
    valid = TokenFile(path / "valid.bin")
    models, optimizers = {}, {}
    for stage in STAGES:
        mx.random.seed(config.seed)  # the trainer's order: seed, then build the model
        model = Model(config.model_args(_vocab_size(path)))
        optimizers[stage] = make_training_optimizer(config, model)
        optimizers[stage].init(model.trainable_parameters())
        if stage == "trained":
            load_checkpoint(checkpoints[-1], model, optimizers[stage])
        models[stage] = model
    length = min(seq_len, config.seq_len)
    sequences = (len(valid) - 1) // length
    if sequences < 1:
        raise ValueError(f"{path}/valid.bin holds {len(valid)} tokens, fewer than one "
                         f"sequence of {length}")
    inputs, targets = next(Batches(valid, min(batch_size, sequences), length,
                                   shuffle=False).epoch_batches())
    return Subject(models, optimizers, inputs, targets, config.grad_clip)


def _vocab_size(path: Path) -> int:
    from ..data import load_tokenizer

    return load_tokenizer(path).vocab_size()


def _model_subject(path: Path, batch_size: int, seq_len: int, optimizer: str,
                   seed: int) -> Subject:
    from mlx_lm import load

    from ..data import load_corpus
    from ..optim import make_optimizer

    trained, tokenizer = load(str(path), trust_remote_code=True)
    mx.random.seed(seed)
    init = type(trained)(trained.args)
    text = "\n".join(load_corpus(None).valid)[: 8 * batch_size * seq_len]
    ids = np.array(tokenizer.encode(text)[: batch_size * seq_len + 1], dtype=np.int32)
    rows = (len(ids) - 1) // seq_len
    inputs = mx.array(ids[: rows * seq_len].reshape(rows, seq_len))
    targets = mx.array(ids[1: rows * seq_len + 1].reshape(rows, seq_len))
    models = {"init": init, "trained": trained}
    return Subject(models, {s: make_optimizer(optimizer, m) for s, m in models.items()},
                   inputs, targets)


def diagnose_dir(path: str | Path, label: str = "", **options) -> list[dict[str, Any]]:
    """The rows (``COLUMNS``) of both stages of one run or model directory."""
    subject = load_subject(path, **options)
    return [{"label": label or Path(path).name, "stage": stage, **row}
            for stage in STAGES
            for row in measure(subject.models[stage], subject.optimizers[stage],
                               subject.inputs, subject.targets, subject.grad_clip)]


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    with open(path, newline="") as f:
        return [{**r, "layer": int(r["layer"]), "value": float(r["value"])}
                for r in csv.DictReader(f)]


def write_rows(rows: list[dict[str, Any]], path: str | Path) -> Path:
    from .results import write_csv

    return write_csv(rows, path, COLUMNS)


def diagnose_runs(runs: list[tuple[str, Path]], out_dir: str | Path, title: str = "",
                  **options) -> list[dict[str, Any]]:
    """Diagnose each ``(label, run directory)`` (each run's rows are cached in its
    ``diagnostics.csv``); write them together to ``out_dir/diagnostics.csv`` and
    ``diagnostics.png``."""
    rows = []
    for label, path in runs:
        cached = Path(path) / "diagnostics.csv"
        if not cached.is_file():
            write_rows(diagnose_dir(path, label, **options), cached)
        rows += [{**r, "label": label} for r in read_rows(cached)]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_rows(rows, out_dir / "diagnostics.csv")
    plot_diagnostics(rows, out_dir / "diagnostics.png", title)
    return rows


def plot_diagnostics(rows: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Rows: the metrics; columns: init and trained; one line per label (and per matrix
    when there is one label; else the mean over a block's matrices)."""
    from .plots import _pyplot, save_figure

    plt = _pyplot()
    labels = list(dict.fromkeys(r["label"] for r in rows))
    fig, axes = plt.subplots(len(METRICS), len(STAGES), figsize=(11, 3 * len(METRICS)),
                             squeeze=False)
    for col, stage in enumerate(STAGES):
        for row_index, metric in enumerate(METRICS):
            ax = axes[row_index][col]
            for label, series in _series(rows, stage, metric, labels).items():
                ax.plot(*zip(*series), marker=".", label=label)
            ax.set_title(f"{metric} ({stage})", fontsize=9)
            ax.set_xlabel("block (0: embeddings)" if metric in ("hidden_rms", "cosine")
                          else "block")
            ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
            if metric in ("hidden_rms", "grad_norm", "update_rms"):
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def _series(rows, stage, metric, labels) -> dict[str, list[tuple[int, float]]]:
    chosen = [r for r in rows if r["stage"] == stage and r["metric"] == metric]
    series: dict[str, dict[int, list[float]]] = {}
    for r in chosen:
        key = f"{r['label']} {r['matrix']}" if r["matrix"] and len(labels) == 1 else r["label"]
        series.setdefault(key, {}).setdefault(r["layer"], []).append(r["value"])
    return {k: [(layer, float(np.mean(v))) for layer, v in sorted(s.items())]
            for k, s in series.items()}


# ---------------------------------------------------------------------- command
def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("path", metavar="RUN_OR_MODEL_DIR",
                        help="a pretrain run directory or an mlx-lm model directory")
    parser.add_argument("--out", help="output directory (default: RUN_OR_MODEL_DIR/diagnostics)")
    parser.add_argument("--batch-size", type=int, default=4, help="held-out sequences")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--optimizer", default="adamw",
                        help="model directories only: the optimizer of the update_rms step")
    parser.add_argument("--seed", type=int, default=0,
                        help="model directories only: seed of the 'init' model")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("batch_size", "seq_len"):
        if getattr(args, name) < 2:
            print(f"{PROG}: error: --{name.replace('_', '-')} must be >= 2, got "
                  f"{getattr(args, name)}", file=sys.stderr)
            return 2
    out = Path(args.out) if args.out else Path(args.path) / "diagnostics"
    try:
        rows = diagnose_dir(args.path, batch_size=args.batch_size, seq_len=args.seq_len,
                            optimizer=args.optimizer, seed=args.seed)
    except (ValueError, TypeError) as err:  # CheckpointError is a ValueError
        print(f"{PROG}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    out.mkdir(parents=True, exist_ok=True)
    write_rows(rows, out / "diagnostics.csv")
    plot_diagnostics(rows, out / "diagnostics.png", str(args.path))
    print(f"Diagnostics: {out / 'diagnostics.csv'}, plot: {out / 'diagnostics.png'}")
    return 0
