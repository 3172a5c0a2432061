"""``mlx-localnorm <command>``: a thin argparse layer over the package."""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__

# bench name -> module whose main(argv) runs it; imported only when asked for.
BENCHES = {
    "data": "mlx_localnorm.bench.data",
    "norms": "mlx_localnorm.bench.norms",
}


def _inventory() -> list[tuple[str, str, str]]:
    """(kind, name, one-line description) for every norm, placement and optimizer."""
    from .norms import NORMS

    rows = [("norm", name, (cls.__doc__ or "").strip().splitlines()[0])
            for name, cls in sorted(NORMS.items())]
    for kind, module, attr in (("placement", "mlx_localnorm.placements", "PLACEMENTS"),
                               ("optimizer", "mlx_localnorm.optim", "OPTIMIZERS")):
        try:
            registry = getattr(importlib.import_module(module), attr)
        except ModuleNotFoundError:
            continue
        rows += [(kind, name, str(desc)) for name, desc in sorted(registry.items())]
    return rows


def _cmd_list(args: argparse.Namespace) -> int:
    for kind, name, desc in _inventory():
        print(f"{kind:<10} {name:<12} {desc}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import main as demo_main

    return demo_main(args.rest)


def _cmd_bench(args: argparse.Namespace) -> int:
    module = importlib.import_module(BENCHES[args.what])
    return module.main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlx-localnorm", description=__doc__)
    parser.add_argument("--version", action="version", version=f"mlx-localnorm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="command")
    p = sub.add_parser("list", help="every norm, placement and optimizer, one line each")
    p.set_defaults(func=_cmd_list)
    p = sub.add_parser("demo", help="a short showcase (what `make demo` runs)")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="options for the demo (see --help)")
    p.set_defaults(func=_cmd_demo)
    p = sub.add_parser("bench", help="benchmarks that write CSV (and PNG) files")
    p.add_argument("what", choices=sorted(BENCHES), help="which benchmark")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="options for that benchmark")
    p.set_defaults(func=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
