"""``mlx-localnorm bench model``: training-step throughput of the LocalNorm transformer.

Times one compiled AdamW training step (forward, backward, update; nGPT/anGPT also project
their weights) in tokens/s for ``mlx_lm.models.llama.Model`` and for our model with every
norm x placement at the same size, in the same run. ``vs_llama`` is tokens/s relative to
mlx-lm's Llama (our RMSNorm + Pre-LN is the like-for-like row: the flexibility should cost
nothing, target >= 0.97); ``vs_pre_rmsnorm`` is relative to our RMSNorm + Pre-LN.
All configurations are timed in turn for several rounds (alternating direction) and each
keeps its fastest round (``ms_per_step``; ``ms_median`` shows how noisy the machine was);
the headline Llama / Pre-LN RMSNorm ratio is the median over adjacent, alternating pairs of
steps (``model_pairs.csv``), which a slowly changing machine load cannot bias.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten
from mlx_lm.models import llama

from .._argparse import OneLineParser
from ..models import Model, ModelArgs
from ..norms import NORMS
from ..placements import HYPERSPHERE_NORMS, PLACEMENTS
from .common import device, machine, markdown_table, write_csv

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16}
# ApproxNorm is anGPT's own constant; it is benchmarked as the angpt placement.
BENCH_NORMS = [n for n in NORMS if n != "angpt"]


def training_step(model: nn.Module, tokens: mx.array) -> Callable[[], list]:
    """A compiled AdamW step on next-token cross-entropy: a call returning [loss, state]."""
    optimizer = optim.AdamW(learning_rate=1e-4)
    project = getattr(model, "project_weights", lambda: None)

    def loss_fn(model, tokens):
        logits = model(tokens[:, :-1])
        return nn.losses.cross_entropy(logits, tokens[:, 1:], reduction="mean")

    loss_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, optimizer.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(tokens):
        loss, grads = loss_and_grad(model, tokens)
        optimizer.update(model, grads)
        project()
        return loss

    return lambda: [step(tokens), state]


def llama_model(size: dict) -> nn.Module:
    return llama.Model(llama.ModelArgs(
        model_type="llama", hidden_size=size["hidden_size"],
        num_hidden_layers=size["num_hidden_layers"],
        intermediate_size=size["intermediate_size"],
        num_attention_heads=size["num_attention_heads"],
        num_key_value_heads=size["num_key_value_heads"], rms_norm_eps=1e-6,
        vocab_size=size["vocab_size"], tie_word_embeddings=True))


def configurations(norms: list[str], placements: list[str]) -> list[tuple[str, str]]:
    """(norm, placement) pairs; nGPT and anGPT have their one fixed norm."""
    pairs = [("rmsnorm", "pre")]
    for placement in placements:
        for norm in ([HYPERSPHERE_NORMS[placement]] if placement in HYPERSPHERE_NORMS
                     else norms):
            if (norm, placement) not in pairs:
                pairs.append((norm, placement))
    return pairs


def run(size: dict, batch: int, seq_len: int, dtype_name: str, norms: list[str],
        placements: list[str], rounds: int, repeat: int,
        pair_rounds: int) -> tuple[list[dict], list[dict]]:
    """Rows of the norm x placement grid, and the timed Llama / Pre-LN RMSNorm pairs."""
    dtype = DTYPES[dtype_name]
    tokens = mx.random.randint(0, size["vocab_size"], (batch, seq_len + 1), key=mx.random.key(0))
    n_tokens = batch * seq_len
    candidates = [("mlx_lm.llama", "rmsnorm", "pre", partial(llama_model, size))] + [
        ("localnorm", norm, placement,
         partial(lambda n, p: Model(ModelArgs(**size, norm_type=n, placement=p)), norm, placement))
        for norm, placement in configurations(norms, placements)]

    steps, params = [], []
    for name, norm, placement, build in candidates:
        mx.random.seed(0)
        model = build()
        model.set_dtype(dtype)
        params.append(sum(v.size for _, v in tree_flatten(model.parameters())))
        step = training_step(model, tokens)
        for _ in range(2):  # compile and warm up
            mx.eval(step())
        steps.append(step)

    # Every configuration is timed once per round, in reverse order every other round, so load
    # from other processes and position effects spread over all of them; the fastest round is
    # the one least disturbed (as timeit advises).
    def timed(step: Callable[[], list]) -> float:
        start = time.perf_counter()
        for _ in range(repeat):
            mx.eval(step())
        return 1000 * (time.perf_counter() - start) / repeat

    samples = [[] for _ in steps]
    for r in range(rounds):
        print(f"  round {r + 1}/{rounds}", flush=True)
        for i in range(len(steps)) if r % 2 == 0 else reversed(range(len(steps))):
            samples[i].append(timed(steps[i]))
    # The headline pair (Llama, our Pre-LN RMSNorm): adjacent A B / B A timings, whose ratio
    # is immune to load that changes over seconds to minutes.
    print(f"  Llama vs Pre-LN RMSNorm: {pair_rounds} pairs", flush=True)
    pairs = []
    for r in range(pair_rounds):
        first, second = (0, 1) if r % 2 == 0 else (1, 0)
        a, b = timed(steps[first]), timed(steps[second])
        llama_ms, ours_ms = (a, b) if first == 0 else (b, a)
        pairs.append({"pair": r, "llama_ms": round(llama_ms, 2), "localnorm_ms": round(ours_ms, 2),
                      "vs_llama": round(llama_ms / ours_ms, 4)})

    llama_ms, pre_ms = min(samples[0]), min(samples[1])
    rows = []
    for (model, norm, placement, _), n_params, times in zip(candidates, params, samples):
        ms = min(times)
        rows.append({
            "machine": machine(), "device": device(), "mlx": mx.__version__,
            "dtype": dtype_name, "model": model, "norm": norm, "placement": placement,
            "params": n_params, "tokens_per_step": n_tokens, "ms_per_step": round(ms, 2),
            "ms_median": round(statistics.median(times), 2),
            "tokens_per_s": round(1000 * n_tokens / ms), "vs_llama": round(llama_ms / ms, 3),
            "vs_pre_rmsnorm": round(pre_ms / ms, 3)})
    return rows, pairs


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="mlx-localnorm bench model", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/results", help="output directory")
    parser.add_argument("--hidden", type=int, default=128, help="hidden size")
    parser.add_argument("--layers", type=int, default=4, help="number of blocks")
    parser.add_argument("--heads", type=int, default=4, help="attention heads")
    parser.add_argument("--kv-heads", type=int, default=2, help="key/value heads")
    parser.add_argument("--mlp", type=int, default=352, help="MLP width")
    parser.add_argument("--vocab", type=int, default=2048, help="vocabulary size")
    parser.add_argument("--batch", type=int, default=4, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per sequence")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    parser.add_argument("--norms", default=",".join(BENCH_NORMS),
                        help="comma separated norm names")
    parser.add_argument("--placements", default=",".join(PLACEMENTS),
                        help="comma separated placement names")
    parser.add_argument("--rounds", type=int, default=10,
                        help="rounds over all configurations (each keeps its fastest round)")
    parser.add_argument("--repeat", type=int, default=1, help="timed steps per round")
    parser.add_argument("--pair-rounds", type=int, default=40,
                        help="extra alternating rounds for Llama vs our Pre-LN RMSNorm")
    args = parser.parse_args(argv)
    norms, placements = args.norms.split(","), args.placements.split(",")
    for n in norms:
        if n not in BENCH_NORMS:
            parser.error(f"--norms: unknown norm {n!r}; valid: {', '.join(BENCH_NORMS)}")
    for p in placements:
        if p not in PLACEMENTS:
            parser.error(f"--placements: unknown placement {p!r}; valid: {', '.join(PLACEMENTS)}")
    if args.pair_rounds < 0:
        parser.error(f"--pair-rounds must be >= 0, got {args.pair_rounds}")
    for name in ("rounds", "repeat", "batch", "seq_len"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    try:
        size = ModelArgs(vocab_size=args.vocab, hidden_size=args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, intermediate_size=args.mlp)
    except ValueError as err:
        parser.error(str(err))
    size = {k: getattr(size, k) for k in ("vocab_size", "hidden_size", "num_hidden_layers",
                                          "num_attention_heads", "num_key_value_heads",
                                          "intermediate_size")}

    rows, pairs = run(size, args.batch, args.seq_len, args.dtype, norms, placements,
                      args.rounds, args.repeat, args.pair_rounds)
    path = write_csv(rows, Path(args.out) / "model.csv")
    print(markdown_table(rows, ["model", "norm", "placement", "ms_per_step", "tokens_per_s",
                                "vs_llama", "vs_pre_rmsnorm", "ms_median"]))
    if pairs:
        ratios = [p["vs_llama"] for p in pairs]
        q1, median, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
        pair_path = write_csv(pairs, Path(args.out) / "model_pairs.csv")
        print(f"\nlocalnorm RMSNorm+Pre-LN / mlx_lm llama tokens/s, median of {len(pairs)} "
              f"adjacent pairs: {median:.3f} (quartiles {q1:.3f}-{q3:.3f}; target >= 0.97)\n"
              f"wrote {pair_path}")
    print(f"wrote {path}")
    return 0
