"""``mlx-localnorm bench optim``: orthogonalization cost and a short training-loss comparison.

1. Time of one orthogonalization (Newton–Schulz, Polar Express) and of one full optimizer step
   (our ``Muon`` against ``mlx.optimizers.Muon`` at the same settings: 5 Newton–Schulz steps,
   momentum 0.95, Nesterov, no weight decay) for (1024, 1024), (4096, 1024) and a stack of
   8 x (512, 512) (or ``--shapes``), in float32 and bfloat16, as ratios to MLX's step in the
   same run. MLX's
   Muon flattens a 3-D parameter to one (8, 262144) matrix, so for the stack it gets the 8
   matrices as 8 separate parameters (the per-matrix update ours computes).
2. Loss of a tiny mlx-lm Llama trained for a fixed number of steps on character-level
   Shakespeare (the package's embedded public-domain corpus, ``mlx_localnorm.data``) with
   AdamW, MLX's Muon (its defaults: coupled weight decay 0.01), our Muon and NorMuon (and,
   with ``--runs``, our Muon with Polar Express); the same initialization and batches for every
   optimizer, and the same AdamW groups for the non-matrix parameters.

Writes ``optim_orth.csv``, ``optim_loss.csv`` and ``optim_loss.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as mlx_optim
import numpy as np
from mlx import nn
from mlx.utils import tree_flatten
from mlx_lm.models import llama

from .._argparse import OneLineParser
from ..data import load_corpus
from ..optim import Muon, make_optimizer, orthogonalize, split_params
from .common import device, machine, markdown_table, write_csv

SHAPES = "1024x1024,4096x1024,8x512x512"
DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16}
OPTIMIZER_RUNS = ("adamw", "mlx_muon", "muon", "normuon", "muon_polar_express")
DEFAULT_RUNS = ("adamw", "mlx_muon", "muon", "normuon")


def time_interleaved_ms(calls: dict[str, Callable[[], object]], warmup: int,
                        rounds: int) -> dict[str, tuple[float, float]]:
    """Median wall and process-CPU time of ``mx.eval(call())`` per call, in milliseconds.

    Each round runs every call once, so a machine whose load drifts (a shared CPU) biases no
    call against another; CPU time barely moves with the load, wall time does.
    """
    for _ in range(warmup):
        for fn in calls.values():
            mx.eval(fn())
    samples = {name: [] for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            wall, cpu = time.perf_counter(), time.process_time()
            mx.eval(fn())
            samples[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    return {name: (1000 * statistics.median(w for w, _ in s),
                   1000 * statistics.median(c for _, c in s)) for name, s in samples.items()}


def step_calls(shape: tuple, dtype: mx.Dtype) -> dict[str, Callable[[], object]]:
    """The four timed calls for one gradient of ``shape``: both orthogonalizations, our
    Muon step and MLX's Muon step at the same settings."""
    w = (0.02 * mx.random.normal(shape)).astype(dtype)
    g = mx.random.normal(shape).astype(dtype)
    ours = Muon(learning_rate=0.02, ortho_dtype=dtype)
    theirs = mlx_optim.Muon(learning_rate=0.02, weight_decay=0.0)
    if len(shape) == 3:
        mlx_params = {str(i): w[i] for i in range(shape[0])}
        mlx_grads = {str(i): g[i] for i in range(shape[0])}
    else:
        mlx_params, mlx_grads = {"w": w}, {"w": g}
    return {
        "newton_schulz": lambda: orthogonalize(g, "newton_schulz", 5, dtype),
        "polar_express": lambda: orthogonalize(g, "polar_express", 5, dtype),
        "muon_step": lambda: ours.apply_gradients({"w": g}, {"w": w}),
        "mlx_muon_step": lambda: theirs.apply_gradients(mlx_grads, mlx_params),
    }


def orth_rows(shapes: list[str], dtypes: list[str], repeat: int, slow_repeat: int) -> list[dict]:
    """Timings of ``step_calls`` for each shape (``"ROWSxCOLS"`` or ``"NxROWSxCOLS"``)."""
    rows = []
    for shape_name in shapes:
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            # bfloat16 matmuls skip BLAS on the CPU (about 10x slower): fewer rounds there.
            fast = dtype == mx.float32 or device() == "gpu"
            warmup, reps = (1, repeat) if fast else (0, slow_repeat)
            shape = tuple(int(n) for n in shape_name.split("x"))
            times = time_interleaved_ms(step_calls(shape, dtype), warmup, reps)
            # Other processes on a shared CPU make timings noisy: record how busy it was.
            load = round(os.getloadavg()[0], 2)
            mlx_wall, mlx_cpu = times["mlx_muon_step"]
            for what, (wall, cpu) in times.items():
                rows.append({"shape": shape_name, "dtype": dtype_name, "what": what,
                             "ms": round(wall, 2),
                             "ratio_to_mlx_muon_step": round(wall / mlx_wall, 3),
                             "cpu_ms": round(cpu, 2),
                             "cpu_ratio_to_mlx_muon_step": round(cpu / mlx_cpu, 3),
                             "samples": reps, "load_avg_1min": load})
            print(f"  {shape_name} {dtype_name}: " + ", ".join(
                f"{k} {w:.1f} ms (cpu {c:.1f} ms)" for k, (w, c) in times.items()), flush=True)
    return rows


def char_data(seq_len: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Character ids of the train and validation splits of the embedded Shakespeare."""
    corpus = load_corpus()
    train, valid = "\n".join(corpus.train), "\n".join(corpus.valid)
    chars = sorted(set(train) | set(valid))
    table = np.zeros(max(map(ord, chars)) + 1, np.int32)
    table[[ord(c) for c in chars]] = np.arange(len(chars))

    def encode(text: str) -> np.ndarray:
        return table[np.frombuffer(text.encode("utf-32-le"), np.uint32)]

    return encode(train), encode(valid), len(chars)


def tiny_llama(vocab: int, seed: int) -> llama.Model:
    mx.random.seed(seed)
    return llama.Model(llama.ModelArgs(
        model_type="llama", hidden_size=96, num_hidden_layers=3, intermediate_size=256,
        num_attention_heads=4, num_key_value_heads=4, rms_norm_eps=1e-5, vocab_size=vocab,
        tie_word_embeddings=False))


def build_optimizer(run: str, model: nn.Module, adamw_lr: float, muon_lr: float):
    if run == "adamw":
        return make_optimizer("adamw", model, learning_rate=adamw_lr)
    if run == "mlx_muon":
        matrix_paths = {k for k, _ in tree_flatten(split_params(model)[0])}
        adamw = make_optimizer("adamw", model, learning_rate=adamw_lr)
        return mlx_optim.MultiOptimizer(
            [mlx_optim.Muon(learning_rate=muon_lr), *adamw.optimizers],
            [lambda path, _g: path in matrix_paths, *adamw.filters[:-1]])
    kind = "normuon" if run == "normuon" else "muon"
    method = "polar_express" if run == "muon_polar_express" else "newton_schulz"
    return make_optimizer(kind, model, learning_rate=muon_lr, method=method,
                          adamw_learning_rate=adamw_lr)


def loss_fn(model: nn.Module, inputs: mx.array, targets: mx.array) -> mx.array:
    return nn.losses.cross_entropy(model(inputs), targets).mean()


def loss_rows(runs: list[str], steps: int, batch: int, seq_len: int, adamw_lr: float,
              muon_lr: float, eval_every: int, seed: int) -> list[dict]:
    train, valid, vocab = char_data(seq_len)
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(train) - seq_len - 1, size=(steps, batch))
    valid_starts = np.random.default_rng(seed + 1).integers(0, len(valid) - seq_len - 1,
                                                            size=(8, batch))

    def batch_at(ids, rows):
        window = np.stack([ids[s: s + seq_len + 1] for s in rows])
        return mx.array(window[:, :-1]), mx.array(window[:, 1:])

    rows = []
    for run in runs:
        model = tiny_llama(vocab, seed)
        opt = build_optimizer(run, model, adamw_lr, muon_lr)
        grad_fn = nn.value_and_grad(model, loss_fn)
        start = time.perf_counter()
        for step in range(1, steps + 1):
            loss, grads = grad_fn(model, *batch_at(train, starts[step - 1]))
            opt.update(model, grads)
            mx.eval(loss, model.parameters(), opt.state)
            row = {"optimizer": run, "step": step, "tokens": step * batch * seq_len,
                   "train_loss": round(loss.item(), 5), "valid_loss": ""}
            if step % eval_every == 0 or step == steps:
                v = [loss_fn(model, *batch_at(valid, s)).item() for s in valid_starts]
                row["valid_loss"] = round(float(np.mean(v)), 5)
            rows.append(row)
        seconds = time.perf_counter() - start
        print(f"  {run}: final train {rows[-1]['train_loss']:.4f} valid "
              f"{rows[-1]['valid_loss']:.4f} ({seconds:.0f} s)", flush=True)
    return rows


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in dict.fromkeys(r["optimizer"] for r in rows):
        sel = [r for r in rows if r["optimizer"] == run]
        loss = np.array([r["train_loss"] for r in sel])
        window = min(10, len(loss))  # a 10-step moving average (shorter for a short run)
        smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
        line, = ax.plot([r["step"] for r in sel][window - 1:], smooth, label=run)
        val = [(r["step"], r["valid_loss"]) for r in sel if r["valid_loss"] != ""]
        ax.plot(*zip(*val), "o", color=line.get_color(), ms=4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (line: train, 10-step mean; dots: validation)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".png", delete=False) as f:
        fig.savefig(f, dpi=110)
    os.replace(f.name, path)
    plt.close(fig)


def _choices(value: str, valid, flag: str, parser: argparse.ArgumentParser) -> list[str]:
    items = [v for v in value.split(",") if v]
    for item in items:
        if item not in valid:
            parser.error(f"{flag}: unknown value {item!r}; valid: {', '.join(valid)}")
    return items


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="mlx-localnorm bench optim", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/results", help="output directory")
    parser.add_argument("--shapes", default=SHAPES,
                        help="gradient shapes ROWSxCOLS or NxROWSxCOLS, comma separated")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="comma separated")
    parser.add_argument("--repeat", type=int, default=5, help="timing rounds")
    parser.add_argument("--slow-repeat", type=int, default=1,
                        help="timing rounds of bfloat16 on a CPU (seconds per call)")
    parser.add_argument("--runs", default=",".join(DEFAULT_RUNS),
                        help="optimizers of the loss comparison (empty: skip it)")
    parser.add_argument("--steps", type=int, default=200, help="training steps per optimizer")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--adamw-lr", type=float, default=3e-3,
                        help="AdamW learning rate (baseline and non-matrix groups)")
    parser.add_argument("--muon-lr", type=float, default=0.02, help="Muon/NorMuon learning rate")
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    shapes = [s for s in args.shapes.split(",") if s]
    for shape in shapes:
        parts = shape.split("x")
        if len(parts) not in (2, 3) or not all(p.isdigit() and int(p) > 0 for p in parts):
            parser.error(f"--shapes: {shape!r} is not ROWSxCOLS or NxROWSxCOLS")
    dtypes = _choices(args.dtypes, list(DTYPES), "--dtypes", parser)
    runs = _choices(args.runs, list(OPTIMIZER_RUNS), "--runs", parser)
    for flag in ("repeat", "slow_repeat", "steps", "batch", "seq_len", "eval_every"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be a positive int, "
                         f"got {getattr(args, flag)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    context = {"machine": machine(), "device": device(), "mlx": mx.__version__}
    written = []

    if shapes and dtypes:
        print("orthogonalization and optimizer step times:")
        rows = [{**context, **r} for r in orth_rows(shapes, dtypes, args.repeat, args.slow_repeat)]
        written.append(write_csv(rows, out / "optim_orth.csv"))
        print(markdown_table(rows, ["shape", "dtype", "what", "ms", "ratio_to_mlx_muon_step",
                                   "cpu_ms", "cpu_ratio_to_mlx_muon_step"]))

    if runs:
        print(f"loss comparison ({args.steps} steps, batch {args.batch} x {args.seq_len} chars):")
        rows = loss_rows(runs, args.steps, args.batch, args.seq_len, args.adamw_lr,
                         args.muon_lr, args.eval_every, args.seed)
        settings = {"adamw_lr": args.adamw_lr, "muon_lr": args.muon_lr, "batch": args.batch,
                    "seq_len": args.seq_len, "seed": args.seed}
        rows = [{**context, **settings, **r} for r in rows]
        written.append(write_csv(rows, out / "optim_loss.csv"))
        png = out / "optim_loss.png"
        plot(rows, png, f"tiny Llama (3 x 96), char-level Shakespeare, "
                        f"{context['machine']} ({context['device']})")
        written.append(png)
        final = [r for r in rows if r["step"] == args.steps]
        print(markdown_table(final, ["optimizer", "tokens", "train_loss", "valid_loss"]))
    print("\nwrote " + ", ".join(str(p) for p in written))
    return 0
