"""``mlx-localnorm bench train``: what the demo's choices cost per training step.

The demo-size model (``PretrainConfig`` defaults: width 256, 8 blocks, 8192-piece vocabulary;
other sizes with ``--vocab``, ``--hidden``, ``--layers``, ``--heads``) is trained with one
compiled step (value and gradient, global-norm clipping, update; the trainer's step) for
mlx-lm's Llama + AdamW and for our model with RMSNorm + Pre-LN + AdamW (target: >= 0.97 of
Llama's tokens/s), then with SeeDNorm, Peri-LN and Muon swapped in one at a time and all
together (the demo). Configurations are timed in turn for several rounds
and each keeps its fastest round. Peak memory is the model and optimizer state plus the
peak of one step above it.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.optimizers import clip_grad_norm
from mlx.utils import tree_flatten

from .._argparse import OneLineParser
from ..models import Model, ModelArgs
from ..optim import make_optimizer
from ..train.config import PretrainConfig
from ._sizes import add_model_size_flags, parse_bench_args
from .common import device, machine, markdown_table, write_csv
from .model import llama_model

# (label, model, norm, placement, optimizer); the first two rows are the like-for-like pair.
CONFIGURATIONS = [
    ("mlx-lm llama + adamw", "llama", "rmsnorm", "pre", "adamw"),
    ("rmsnorm + pre + adamw", "localnorm", "rmsnorm", "pre", "adamw"),
    ("seednorm + pre + adamw", "localnorm", "seednorm", "pre", "adamw"),
    ("rmsnorm + peri + adamw", "localnorm", "rmsnorm", "peri", "adamw"),
    ("rmsnorm + pre + muon", "localnorm", "rmsnorm", "pre", "muon"),
    ("seednorm + peri + muon (demo)", "localnorm", "seednorm", "peri", "muon"),
]


def model_size(config: PretrainConfig) -> dict:
    """The size of a ``PretrainConfig``'s model as ModelArgs fields."""
    args = config.model_args()
    return {name: getattr(args, name) for name in (
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "intermediate_size")}


def training_step(model: nn.Module, optimizer_name: str, tokens: mx.array) -> Callable:
    """The trainer's compiled step on next-token cross-entropy; a call returns [loss, state]."""
    optimizer = make_optimizer(optimizer_name, model, learning_rate=1e-3)

    def loss_fn(model, tokens):
        logits = model(tokens[:, :-1]).astype(mx.float32)
        return nn.losses.cross_entropy(logits, tokens[:, 1:], reduction="mean")

    loss_and_grad = nn.value_and_grad(model, loss_fn)
    optimizer.init(model.trainable_parameters())
    state = [model.state, optimizer.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(tokens):
        loss, grads = loss_and_grad(model, tokens)
        grads, _ = clip_grad_norm(grads, 1.0)
        optimizer.update(model, grads)
        return loss

    return lambda: [step(tokens), state]


def run(size: dict, batch: int, seq_len: int, rounds: int) -> list[dict]:
    tokens = mx.random.randint(0, size["vocab_size"], (batch, seq_len + 1),
                               key=mx.random.key(0))
    steps, peaks = [], []
    for label, kind, norm, placement, opt in CONFIGURATIONS:
        mx.random.seed(0)
        model = llama_model(size) if kind == "llama" else Model(
            ModelArgs(**size, norm_type=norm, placement=placement))
        step = training_step(model, opt, tokens)
        for _ in range(2):  # compile and warm up
            loss, state = step()
            mx.eval(loss, state)
        # Other configurations stay alive, so count this one's state plus its step's transient.
        own_state = sum(a.nbytes for _, a in tree_flatten(state) if isinstance(a, mx.array))
        mx.reset_peak_memory()
        before = mx.get_active_memory()
        mx.eval(step())
        peaks.append(own_state + mx.get_peak_memory() - before)
        steps.append(step)
        print(f"  built {label}", flush=True)

    best = [float("inf")] * len(steps)
    for r in range(rounds):
        order = range(len(steps)) if r % 2 == 0 else reversed(range(len(steps)))
        for i in order:
            start = time.perf_counter()
            mx.eval(steps[i]())
            best[i] = min(best[i], time.perf_counter() - start)
        print(f"  round {r + 1}/{rounds}", flush=True)

    n_tokens = batch * seq_len
    rows = []
    for (label, kind, norm, placement, opt), seconds, peak in zip(CONFIGURATIONS, best, peaks):
        rows.append({
            "machine": machine(), "device": device(), "mlx": mx.__version__,
            "configuration": label, "model": kind, "norm": norm, "placement": placement,
            "optimizer": opt, "tokens_per_step": n_tokens,
            "ms_per_step": round(1000 * seconds, 1),
            "tokens_per_s": round(n_tokens / seconds),
            "vs_llama": round(best[0] / seconds, 3),
            "vs_rmsnorm_pre_adamw": round(best[1] / seconds, 3),
            "peak_memory_mb": round(peak / 2**20, 1),
        })
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="mlx-localnorm bench train", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/results", help="output directory")
    add_model_size_flags(parser)
    parser.add_argument("--batch", type=int, default=16, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--rounds", type=int, default=6,
                        help="timing rounds (each configuration keeps its fastest)")
    args, config = parse_bench_args(parser, argv, ("batch", "seq_len", "rounds"))
    size = model_size(config)
    rows = run(size, args.batch, args.seq_len, args.rounds)
    path = write_csv(rows, Path(args.out) / "train.csv")
    print(markdown_table(rows, ["configuration", "ms_per_step", "tokens_per_s", "vs_llama",
                                "vs_rmsnorm_pre_adamw", "peak_memory_mb"]))
    print(f"\nour RMSNorm + Pre-LN + AdamW / mlx-lm Llama: {rows[1]['vs_llama']} (target >= "
          f"0.97)\nwrote {path}")
    return 0
