"""``mlx-localnorm <command>``: a thin argparse layer over the package.

User errors end a command with one line on stderr and a non-zero exit status, never a
traceback: 2 for an invalid command line or config, 1 for an input that does not fit or a
file that cannot be read or written (``OSError``), 130 for Ctrl-C outside training (which
checkpoints and stops by itself). A benchmark's ``ValueError``/``TypeError`` comes from the
sizes it was given and exits with 2. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__

# bench name -> module whose main(argv) runs it; imported only when asked for.
BENCHES = {
    "convert": "mlx_localnorm.bench.convert",
    "data": "mlx_localnorm.bench.data",
    "emulate": "mlx_localnorm.bench.emulate",
    "finetune": "mlx_localnorm.bench.finetune",
    "grpo": "mlx_localnorm.bench.grpo",
    "kernels": "mlx_localnorm.bench.kernels",
    "linear": "mlx_localnorm.bench.linear",
    "model": "mlx_localnorm.bench.model",
    "norms": "mlx_localnorm.bench.norms",
    "optim": "mlx_localnorm.bench.optim",
    "train": "mlx_localnorm.bench.train",
}
# Commands whose own parser takes the rest of the command line: name -> (module, help).
FORWARDED = {
    "convert": ("mlx_localnorm.convert.command", "convert a Hugging Face checkpoint directory "
                "to a LocalNorm model that mlx-lm loads (see --help)"),
    "export-hf": ("mlx_localnorm.convert.export_command", "write a LocalNorm model with "
                  "RMSNorm/LayerNorm Pre-LN as a Hugging Face checkpoint (see --help)"),
    "demo": ("mlx_localnorm.demo", "pre-train a ~10M LocalNorm LM on Shakespeare in about 5 "
             "minutes on a CPU (what `make demo` runs)"),
    "finetune": ("mlx_localnorm.train.finetune_command", "fine-tune (lora/dora/norms/full)"),
    "fuse": ("mlx_localnorm.train.fuse", "fuse a fine-tuning adapter into its model"),
    "grpo": ("mlx_localnorm.rl.command", "GRPO-family RL of any mlx-lm model on a task or your "
             "prompts and reward function (see --help)"),
    "pretrain": ("mlx_localnorm.train.command",
                 "pre-train a LocalNorm LM; every config field is a flag (see --help)"),
    "qat": ("mlx_localnorm.quant.command", "quantization-aware fine-tuning to a real mlx-lm "
            "quantized model, with a PTQ/DWQ/QAT perplexity table (see --help)"),
    "showcase": ("mlx_localnorm.showcase", "what each norm does to activations, and its cost"),
    "study": ("mlx_localnorm.study.command", "run a grid of pre-training runs (norm x "
              "placement x optimizer), resumably: results.csv and plots"),
    "diagnose": ("mlx_localnorm.study.diagnose", "per-layer hidden-state RMS, token "
                 "clustering, speed, gradient and update sizes of a run, as CSV + PNG"),
}


def _inventory() -> list[tuple[str, str, str]]:
    """(kind, name, one-line description) for every norm, placement and optimizer."""
    from .norms import NORMS
    from .optim import OPTIMIZERS
    from .placements import PLACEMENTS

    rows = [("norm", name, (cls.__doc__ or "").strip().splitlines()[0])
            for name, cls in sorted(NORMS.items())]
    rows += [("placement", name, desc) for name, desc in sorted(PLACEMENTS.items())]
    rows += [("optimizer", name, desc) for name, desc in sorted(OPTIMIZERS.items())]
    return rows


def _cmd_list(args: argparse.Namespace, rest: list[str]) -> int:
    for kind, name, desc in _inventory():
        print(f"{kind:<10} {name:<12} {desc}")
    return 0


def _cmd_bench(args: argparse.Namespace, rest: list[str]) -> int:
    try:
        return importlib.import_module(BENCHES[args.what]).main(rest)
    except (TypeError, ValueError) as err:  # the package's checks of the sizes asked for
        print(f"mlx-localnorm bench {args.what}: error: {err}", file=sys.stderr)
        return 2


def _forward(module: str):
    return lambda args, rest: importlib.import_module(module).main(rest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlx-localnorm", description=__doc__)
    parser.add_argument("--version", action="version", version=f"mlx-localnorm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="command")
    p = sub.add_parser("list", help="every norm, placement and optimizer, one line each")
    p.set_defaults(func=_cmd_list, forwards=False)
    for name, (module, help_text) in FORWARDED.items():
        p = sub.add_parser(name, help=help_text, add_help=False)
        p.set_defaults(func=_forward(module), forwards=True)
    p = sub.add_parser("bench", help="benchmarks that write CSV (and PNG) files; "
                       "`bench NAME --help` for options", add_help=False)
    p.add_argument("what", choices=sorted(BENCHES), help="which benchmark")
    p.set_defaults(func=_cmd_bench, forwards=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    if rest and not args.forwards:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    prog = f"{parser.prog} {args.command}"
    try:
        return args.func(args, rest)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except OSError as err:  # a path that is missing, not writable, or a full disk
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
