"""``mlx-localnorm bench grpo``: rollout throughput of G completions of one prompt.

Generated tokens/s of ``ln.rl.rollout`` (one batched generation: the prompt is prefilled once
and its G completions decode together) against generating the same G completions one after
another with ``mlx_lm.stream_generate`` (what ``mlx_lm.generate`` runs), on the same model
(the demo's size and norms, random weights) in the same run. Neither stops early: the
rollout has no stop tokens and the tokenizer has no end-of-sequence token, so every
completion is ``max_tokens`` long; the tokens are counted all the same. The two methods are
timed in adjacent pairs, in alternating order, and each keeps its median round;
``vs_sequential`` is tokens/s relative to the sequential method (target >= 3, issue 14).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import mlx.core as mx
from mlx_lm import stream_generate
from mlx_lm.sample_utils import make_sampler
from mlx_lm.tokenizer_utils import TokenizerWrapper
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from .. import rl
from .._argparse import OneLineParser
from ..models import Model
from ..train import PretrainConfig
from ._sizes import add_model_size_flags, parse_bench_args
from .common import device, machine, markdown_table, write_csv

METHODS = ("sequential", "batched")


def word_tokenizer(vocab_size: int) -> TokenizerWrapper:
    """A word-level tokenizer over ``vocab_size`` ids with no end-of-sequence token."""
    vocab = {f"w{i}": i for i in range(vocab_size)}
    hf = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab,
                                                                            unk_token="w0")))
    return TokenizerWrapper(hf)


def sequential(model, tokenizer, prompt: list[int], group_size: int, max_tokens: int) -> int:
    """G completions, one ``mlx_lm.stream_generate`` after another; the tokens generated."""
    tokens = 0
    for _ in range(group_size):
        for response in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens,
                                        sampler=make_sampler(temp=1.0)):
            pass
        tokens += response.generation_tokens
    return tokens


def batched(model, prompt: list[int], group_size: int, max_tokens: int) -> int:
    """G completions in one ``rl.rollout``; the tokens generated."""
    out = rl.rollout(model, [prompt], group_size, max_tokens=max_tokens)
    return sum(len(c) for c in out.completions)


def run(config: PretrainConfig, group_sizes: list[int], max_tokens: int, prompt_len: int,
        repeat: int) -> list[dict]:
    """One row per (G, method): median seconds over ``repeat`` alternating pairs."""
    mx.random.seed(0)
    model = Model(config.model_args())
    mx.eval(model.parameters())
    tokenizer = word_tokenizer(config.vocab_size)
    prompt = mx.random.randint(0, config.vocab_size, (prompt_len,),
                               key=mx.random.key(1)).tolist()
    calls = {"sequential": lambda g: sequential(model, tokenizer, prompt, g, max_tokens),
             "batched": lambda g: batched(model, prompt, g, max_tokens)}
    size = f"{config.num_layers}x{config.hidden_size}, vocab {config.vocab_size}"
    rows = []
    for g in group_sizes:
        for method in METHODS:  # warm up
            calls[method](g)
        seconds = {m: [] for m in METHODS}
        tokens = {}
        # Adjacent pairs in alternating order: slow changes in machine load hit both alike.
        for r in range(repeat):
            print(f"  G={g}: round {r + 1}/{repeat}", flush=True)
            for method in METHODS if r % 2 == 0 else reversed(METHODS):
                start = time.perf_counter()
                tokens[method] = calls[method](g)
                seconds[method].append(time.perf_counter() - start)
        if tokens["batched"] != tokens["sequential"]:
            raise RuntimeError(f"bench grpo: G={g}: the methods generated {tokens} tokens")
        rates = {m: tokens[m] / statistics.median(seconds[m]) for m in METHODS}
        for m in METHODS:
            rows.append({
                "machine": machine(), "device": device(), "mlx": mx.__version__,
                "model": size, "prompt_tokens": len(prompt), "group_size": g,
                "max_tokens": max_tokens, "method": m,
                "tokens": tokens[m], "seconds": round(statistics.median(seconds[m]), 6),
                "tokens_per_s": round(rates[m], 1),
                "vs_sequential": round(rates[m] / rates["sequential"], 3)})
    return rows


def group_sizes(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma separated integers, got {text!r}")
    if any(v < 2 for v in values):
        raise argparse.ArgumentTypeError(f"expected group sizes >= 2, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="mlx-localnorm bench grpo", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/results", help="output directory")
    add_model_size_flags(parser)
    parser.add_argument("--group-sizes", type=group_sizes, default=[4, 8, 16],
                        help="comma separated completions per prompt (G)")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per completion")
    parser.add_argument("--prompt-len", type=int, default=16, help="prompt tokens")
    parser.add_argument("--repeat", type=int, default=5,
                        help="timed pairs per G (each method keeps its median)")
    args, config = parse_bench_args(parser, argv, ("max_tokens", "prompt_len", "repeat"))

    rows = run(config, args.group_sizes, args.max_tokens, args.prompt_len, args.repeat)
    path = write_csv(rows, Path(args.out) / "grpo.csv")
    print(markdown_table(rows, ["group_size", "method", "tokens", "seconds", "tokens_per_s",
                                "vs_sequential"]))
    print(f"wrote {path}")
    return 0
