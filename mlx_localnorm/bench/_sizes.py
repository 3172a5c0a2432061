"""Model-size flags shared by the benchmarks that build the demo-size model."""

from __future__ import annotations

import argparse

from ..train.config import PretrainConfig


def add_model_size_flags(parser: argparse.ArgumentParser) -> None:
    """``--vocab --hidden --layers --heads``, the demo model's size by default."""
    demo = PretrainConfig()
    parser.add_argument("--vocab", type=int, default=demo.vocab_size, help="vocabulary size")
    parser.add_argument("--hidden", type=int, default=demo.hidden_size, help="hidden size")
    parser.add_argument("--layers", type=int, default=demo.num_layers, help="number of blocks")
    parser.add_argument("--heads", type=int, default=demo.num_heads, help="attention heads")


def parse_bench_args(parser: argparse.ArgumentParser, argv: list[str] | None,
                     counts: tuple[str, ...]) -> tuple[argparse.Namespace, PretrainConfig]:
    """Parsed flags and the model config of the size flags; a count below 1 or a model size
    the config rejects is a usage error."""
    args = parser.parse_args(argv)
    for name in counts:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    try:
        config = PretrainConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                                num_layers=args.layers, num_heads=args.heads)
    except (ValueError, TypeError) as err:
        parser.error(str(err))
    return args, config
