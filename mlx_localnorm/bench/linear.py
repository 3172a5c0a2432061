"""``mlx-localnorm bench linear``: Gated DeltaNet (``linear_attention``) cost and quality.

1. The gated delta rule, forward + backward, at each ``--lengths`` T (one sequence, the demo
   model's heads and head width): our chunked form (``chunk_gated_delta``) against autodiff
   through mlx-lm's step-by-step ``gated_delta_ops``, side by side, with the peak memory of
   each (target: chunked >= 10x faster, memory linear in T).
2. Training tokens/s of the demo-size hybrid (``--layer-pattern``, LLLF = 3 linear : 1 full)
   against the all-attention model of the same size at ``--seq-len`` (target: >= 1x), one
   compiled AdamW step each, timed in alternating rounds (each keeps its fastest).
3. Validation loss of both after the same tokens (``--train-steps`` of the trainer on
   Shakespeare, same seed and data order).

Writes ``linear.csv`` (one row per measurement: ``measure``, ``configuration``, ``seq_len``,
``value`` in ``unit``, ``ratio`` to the baseline, ``peak_memory_mb``) and ``linear.png``.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import matplotlib
import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.models.gated_delta import gated_delta_ops

from .._argparse import OneLineParser
from ..data import prepare_data
from ..models import Model
from ..models.gated_delta import chunk_gated_delta
from ..train import PretrainConfig, Pretrainer
from ._sizes import add_model_size_flags, parse_bench_args
from .common import device, machine, markdown_table, time_ms, write_csv
from .train import training_step

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the Agg backend)


def _row(measure: str, configuration: str, seq_len: int, value: float, unit: str,
         ratio: float | None = None, peak: float | None = None,
         tokens: int | None = None) -> dict:
    return {"machine": machine(), "device": device(), "mlx": mx.__version__, "measure": measure,
            "configuration": configuration, "seq_len": seq_len, "value": round(value, 4),
            "unit": unit, "ratio": None if ratio is None else round(ratio, 2),
            "peak_memory_mb": None if peak is None else round(peak / 2**20, 1),
            "tokens": tokens}


def _peak_bytes(fn) -> float:
    """Peak memory of one evaluated call above what was allocated before it."""
    mx.eval(fn())
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    mx.eval(fn())
    return mx.get_peak_memory() - before


def recurrence_rows(T: int, heads: int, head_dim: int, chunk: int, repeat: int) -> list[dict]:
    """Forward + backward of the gated delta rule at length T, chunked vs gated_delta_ops."""
    keys = mx.random.split(mx.random.key(T), 5)
    shape = (1, T, heads, head_dim)
    q, k = (x / mx.linalg.norm(x, axis=-1, keepdims=True)
            for x in (mx.random.normal(shape, key=keys[0]), mx.random.normal(shape, key=keys[1])))
    v = mx.random.normal(shape, key=keys[2])
    log_g = -mx.random.uniform(0.0, 1.0, (1, T, heads), key=keys[3])
    beta = mx.random.uniform(0.0, 1.0, (1, T, heads), key=keys[4])
    forms = {"chunked (ours)": lambda *a: chunk_gated_delta(*a, chunk_size=chunk)[0].sum(),
             "gated_delta_ops autodiff": lambda q, k, v, g, b: gated_delta_ops(
                 q, k, v, mx.exp(g), b)[0].sum()}
    rows = []
    for name, loss in forms.items():
        grad = mx.value_and_grad(loss, argnums=(0, 1, 2, 3, 4))

        def step(grad=grad):
            return grad(q, k, v, log_g, beta)

        ms = time_ms(step, warmup=1, repeat=repeat, sample_seconds=0.0)
        rows.append(_row("recurrence fwd+bwd", name, T, ms, "ms", peak=_peak_bytes(step)))
        print(f"  T={T} {name}: {ms:.1f} ms", flush=True)
    rows[0]["ratio"] = round(rows[1]["value"] / rows[0]["value"], 2)  # speed-up over ops
    return rows


def throughput_rows(configs: dict[str, PretrainConfig], batch: int, seq_len: int,
                    rounds: int) -> list[dict]:
    """Training tokens/s of each model, one compiled AdamW step, fastest of ``rounds``."""
    tokens = mx.random.randint(0, next(iter(configs.values())).vocab_size,
                               (batch, seq_len + 1), key=mx.random.key(0))
    steps, peaks = {}, {}
    for name, config in configs.items():
        mx.random.seed(0)
        step = training_step(Model(config.model_args()), "adamw", tokens)
        for _ in range(2):  # compile and warm up
            mx.eval(step())
        state = sum(a.nbytes for _, a in tree_flatten(step()[1]) if isinstance(a, mx.array))
        peaks[name], steps[name] = state + _peak_bytes(step), step
    best = dict.fromkeys(steps, float("inf"))
    for r in range(rounds):
        for name in (list(steps) if r % 2 == 0 else list(steps)[::-1]):
            start = time.perf_counter()
            mx.eval(steps[name]())
            best[name] = min(best[name], time.perf_counter() - start)
        print(f"  training round {r + 1}/{rounds}", flush=True)
    baseline = batch * seq_len / best["all attention"]
    return [_row("training tokens/s", name, seq_len, batch * seq_len / s, "tokens/s",
                 batch * seq_len / s / baseline, peaks[name]) for name, s in best.items()]


def loss_rows(configs: dict[str, PretrainConfig], work: Path) -> list[dict]:
    """Validation loss of each model after the same steps on the same data."""
    first = next(iter(configs.values()))
    prepare_data(first.corpus, work / "data", vocab_size=first.vocab_size)
    rows = []
    for name, config in configs.items():
        out = work / name.replace(" ", "-")
        shutil.copytree(work / "data", out)  # same tokenizer and token files for both
        config.out_dir = str(out)
        summary = Pretrainer(config).run()
        tokens = config.total_steps * config.batch_size * config.seq_len
        rows.append(_row("validation loss", name, config.seq_len, summary["val_loss"], "nats",
                         tokens=tokens))
        print(f"  {name}: validation loss {summary['val_loss']:.4f}", flush=True)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r["configuration"] for r in rows):
        points = [(r["seq_len"], r["value"]) for r in rows if r["configuration"] == name]
        ax.plot(*zip(*points), marker="o", label=name)
    ax.set(xscale="log", yscale="log", xlabel="sequence length T", ylabel="ms (forward+backward)",
           title=f"gated delta rule on {device()} ({machine()})")
    ax.legend()
    fig.tight_layout()
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".png", delete=False) as f:
        fig.savefig(f.name, dpi=120)
    plt.close(fig)
    Path(f.name).replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="mlx-localnorm bench linear", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/results", help="output directory")
    add_model_size_flags(parser)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096],
                        help="sequence lengths of the recurrence timing")
    parser.add_argument("--chunk", type=int, default=64, help="chunk size (a power of two)")
    parser.add_argument("--repeat", type=int, default=3, help="timed calls per recurrence")
    parser.add_argument("--layer-pattern", default="LLLF", help="the hybrid's block pattern")
    parser.add_argument("--batch", type=int, default=2, help="sequences per training step")
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence")
    parser.add_argument("--rounds", type=int, default=3, help="training timing rounds")
    parser.add_argument("--train-steps", type=int, default=40,
                        help="steps of each model for the validation loss (0 = skip)")
    args, base = parse_bench_args(parser, argv, ("chunk", "repeat", "batch", "seq_len",
                                                 "rounds"))
    if min(args.lengths) < 1 or args.chunk & (args.chunk - 1):
        parser.error(f"--lengths must be >= 1 and --chunk a power of two, got "
                     f"{args.lengths} and {args.chunk}")
    run = dict(vocab_size=base.vocab_size, hidden_size=base.hidden_size,
               num_layers=base.num_layers, num_heads=base.num_heads, seq_len=args.seq_len, context_length=max(args.seq_len, 1024),
               batch_size=args.batch, steps=max(args.train_steps, 1), warmup_steps=0,
               eval_every=0, eval_batches=4, save_every=0, sample_tokens=0, progress=True)
    try:
        configs = {"hybrid " + args.layer_pattern: PretrainConfig(
                       layer_pattern=args.layer_pattern, **run),
                   "all attention": PretrainConfig(**run)}
    except (ValueError, TypeError) as err:
        parser.error(str(err))
    hybrid = configs["hybrid " + args.layer_pattern].model_args()
    heads = hybrid.linear_num_value_heads or hybrid.num_attention_heads
    head_dim = hybrid.linear_key_head_dim or hybrid.head_dim
    rows = [r for T in args.lengths
            for r in recurrence_rows(T, heads, head_dim, args.chunk, args.repeat)]
    recurrence = list(rows)
    rows += throughput_rows(configs, args.batch, args.seq_len, args.rounds)
    if args.train_steps:
        with tempfile.TemporaryDirectory() as work:
            rows += loss_rows(configs, Path(work))
    out = Path(args.out)
    path = write_csv(rows, out / "linear.csv")
    plot(recurrence, out / "linear.png")
    print(markdown_table(rows, ["measure", "configuration", "seq_len", "value", "unit", "ratio",
                                "peak_memory_mb"]))
    print(f"\nwrote {path} and {out / 'linear.png'}")
    return 0

