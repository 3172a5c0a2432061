"""``mlx-localnorm showcase``: what each norm does to real-looking activations, and its cost.

Rows of the input have very different scales (log-normal, as hidden states of a deep model
do). For each norm the table shows the parameters it adds, the spread of the output row RMS
(0 for a norm that forgets the input scale), how far ``f(2x)`` is from ``f(x)`` (0 = scale
invariant), and forward / forward+backward time next to ``mx.fast.rms_norm`` on this machine.
"""

from __future__ import annotations

import argparse

import mlx.core as mx
from mlx.utils import tree_flatten

from .bench.common import device, machine, time_ms
from .bench.norms import NORM_OPTIONS, fast_rms_function, norm_function, passes
from .norms import NORMS, make_norm


def activations(rows: int, dims: int) -> mx.array:
    """Gaussian rows whose scales spread over two orders of magnitude."""
    scale = mx.exp(1.2 * mx.random.normal((rows, 1), key=mx.random.key(1)))
    return scale * mx.random.normal((rows, dims), key=mx.random.key(2))


def describe(name: str, module, x: mx.array, timings: dict, base: dict) -> dict:
    y = module(x)
    out_rms = mx.sqrt(mx.mean(y * y, axis=-1))
    return {
        "norm": name,
        "params": sum(v.size for _, v in tree_flatten(module.parameters())),
        "out RMS": f"{mx.mean(out_rms).item():.3f} +- {mx.std(out_rms).item():.3f}",
        "|f(2x)-f(x)|": f"{mx.max(mx.abs(module(2 * x) - y)).item():.2e}",
        "fwd ms": f"{timings['forward']:.2f}",
        "fwd+bwd ms": f"{timings['forward+backward']:.2f}",
        "vs rms_norm": f"{timings['forward'] / base['forward']:.2f}x / "
                       f"{timings['forward+backward'] / base['forward+backward']:.2f}x",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mlx-localnorm showcase", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--dims", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=10, help="timing samples per norm")
    args = parser.parse_args(argv)
    for name in ("rows", "dims", "repeat"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")

    x = activations(args.rows, args.dims)
    cotangent = mx.random.normal(x.shape, key=mx.random.key(3))
    print(__doc__.splitlines()[0].split(": ", 1)[1])
    in_rms = mx.sqrt(mx.mean(x * x, axis=-1))
    print(f"input {args.rows} x {args.dims} float32, row RMS {mx.mean(in_rms).item():.2f} +- "
          f"{mx.std(in_rms).item():.2f}; {machine()} ({device()}), MLX {mx.__version__}\n")

    def eager_times(f, params):
        calls = passes(f, x, params, cotangent)
        return {kind: time_ms(calls[(kind, "eager")], repeat=args.repeat)
                for kind in ("forward", "forward+backward")}

    base = eager_times(*fast_rms_function(args.dims))
    rows = []
    for name in NORMS:
        module = make_norm(name, args.dims, **NORM_OPTIONS.get(name, {}))
        timings = eager_times(norm_function(module), module.trainable_parameters())
        rows.append(describe(name, module, x, timings, base))

    columns = list(rows[0])
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(str(r[c]).ljust(w) for c, w in zip(columns, widths)))
    print(f"\nmx.fast.rms_norm: forward {base['forward']:.2f} ms, forward+backward "
          f"{base['forward+backward']:.2f} ms (eager).")
    print("Next: `mlx-localnorm list` for everything the package has; "
          "`mlx-localnorm bench norms` writes the full comparison as CSV + PNG.")
    return 0
