"""``mlx-localnorm bench norms``: every norm's ops path against ``mx.fast.rms_norm``.

Forward and forward+backward times of each norm in the zoo, eager and ``mx.compile``d, for
one shape and several dtypes, as ratios to ``mx.fast.rms_norm`` measured in the same run; on
Linux also a float32 N^3 matmul (``--matmul-size``, default 1024) with and without the
OpenBLAS shim. This is the baseline the fused Metal kernels have to beat.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from .._argparse import OneLineParser
from .. import _fast_blas
from ..norms import NORMS, make_norm
from .common import device, machine, markdown_table, time_ms, write_csv

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
# Options that make a norm do its full work (SeeDNorm's beta = 0 would be a special case).
NORM_OPTIONS = {"seednorm": {"beta_init_std": 0.02}, "l2norm": {"scale": True}}
MATMUL_CODE = (
    "import sys, mlx_localnorm, mlx.core as mx; from mlx_localnorm.bench.common import time_ms; "
    "n = int(sys.argv[1]); a = mx.random.normal((n, n)); b = mx.random.normal((n, n)); "
    "print(time_ms(lambda: a @ b, warmup=2, repeat=5))"
)


def norm_function(module: nn.Module) -> Callable:
    """``f(x, params)``: the module as a pure function of its input and parameters."""
    def f(x, params):
        module.update(params)
        return module(x)
    return f


def fast_rms_function(dims: int, dtype: mx.Dtype = mx.float32) -> tuple[Callable, dict]:
    """``mx.fast.rms_norm`` with its gain in ``dtype`` (the dtype the norms are cast to)."""
    return (lambda x, params: mx.fast.rms_norm(x, params["weight"], 1e-6)), {
        "weight": mx.ones((dims,), dtype=dtype)}


def passes(f: Callable, x: mx.array, params: dict, cotangent: mx.array) -> dict[str, Callable]:
    """The forward and forward+backward calls of ``f``, eager and compiled."""
    def fwd_bwd(x, params):
        return mx.grad(lambda x, p: (f(x, p) * cotangent).sum(), argnums=(0, 1))(x, params)

    return {
        ("forward", "eager"): lambda: f(x, params),
        ("forward", "compiled"): (lambda c: lambda: c(x, params))(mx.compile(f)),
        ("forward+backward", "eager"): lambda: fwd_bwd(x, params),
        ("forward+backward", "compiled"): (lambda c: lambda: c(x, params))(mx.compile(fwd_bwd)),
    }


def matmul_rows(size: int = 1024) -> list[dict]:
    """Float32 ``size``^3 matmul in fresh interpreters with and without the BLAS shim (Linux)."""
    rows = []
    for label, flag in (("openblas-shim", "1"), ("reference-blas", "0")):
        run = subprocess.run([sys.executable, "-c", MATMUL_CODE, str(size)], capture_output=True,
                             text=True, env={**os.environ, "MLX_LOCALNORM_FAST_BLAS": flag})
        if run.returncode != 0:
            raise RuntimeError(f"matmul timing failed: {run.stderr.strip()}")
        rows.append({"pass": "forward", "norm": "matmul", "path": label, "dtype": "float32",
                     "shape": f"{size}x{size}x{size}", "ms": float(run.stdout.split()[-1])})
    for r in rows:  # the reference BLAS relative to the shim
        r["ratio"] = r["ms"] / rows[0]["ms"]
    return rows


def run(shape: tuple[int, ...], dtypes: list[str], norms: list[str], repeat: int) -> list[dict]:
    dims = shape[-1]
    rows = []
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        x = mx.random.normal(shape, key=mx.random.key(0)).astype(dtype)
        cotangent = mx.random.normal(shape, key=mx.random.key(1)).astype(dtype)
        f, params = fast_rms_function(dims, dtype)
        candidates = [("mx.fast.rms_norm", f, params)]
        for name in norms:
            module = make_norm(name, dims, **NORM_OPTIONS.get(name, {}))
            module.set_dtype(dtype)
            candidates.append((name, norm_function(module), module.trainable_parameters()))
        for name, f, params in candidates:
            for (kind, path), call in passes(f, x, params, cotangent).items():
                rows.append({"pass": kind, "norm": name, "path": path, "dtype": dtype_name,
                             "shape": "x".join(map(str, shape)),
                             "ms": time_ms(call, repeat=repeat)})
    baseline = {(r["pass"], r["dtype"], r["path"]): r["ms"] for r in rows
                if r["norm"] == "mx.fast.rms_norm"}
    for r in rows:
        r["ratio"] = r["ms"] / baseline[(r["pass"], r["dtype"], r["path"])]
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    norm_rows = [r for r in rows if r["norm"] != "matmul"]
    kinds = sorted({(r["pass"], r["dtype"]) for r in norm_rows})
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.5 * len(kinds), 4.5), squeeze=False)
    for ax, (kind, dtype) in zip(axes[0], kinds):
        sel = [r for r in norm_rows if r["pass"] == kind and r["dtype"] == dtype]
        names = list(dict.fromkeys(r["norm"] for r in sel))
        for offset, path_name in ((-0.2, "eager"), (0.2, "compiled")):
            vals = [next(r["ratio"] for r in sel if r["norm"] == n and r["path"] == path_name)
                    for n in names]
            ax.barh([i + offset for i in range(len(names))], vals, height=0.4, label=path_name)
        ax.set_yticks(range(len(names)), names)
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_title(f"{kind}, {dtype}")
        ax.set_xlabel("time / mx.fast.rms_norm (same path)")
        ax.invert_yaxis()
    axes[0][0].legend()
    fig.suptitle(f"norm ops paths, {norm_rows[0]['shape']}, {machine()} ({device()})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="mlx-localnorm bench norms", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/results", help="output directory")
    parser.add_argument("--shape", default="4096,1024", help="input shape, comma separated")
    parser.add_argument("--dtypes", default="float32,bfloat16",
                        help=f"comma separated, from {', '.join(DTYPES)}")
    parser.add_argument("--norms", default=",".join(NORMS), help="comma separated norm names")
    parser.add_argument("--repeat", type=int, default=10, help="timing samples per row")
    parser.add_argument("--matmul-size", type=int, default=1024,
                        help="N of the N^3 matmul timed with and without the BLAS shim (Linux)")
    args = parser.parse_args(argv)
    for name in ("repeat", "matmul_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    shape = tuple(int(s) for s in args.shape.split(","))
    dtypes = args.dtypes.split(",")
    for d in dtypes:
        if d not in DTYPES:
            parser.error(f"--dtypes: unknown dtype {d!r}; valid: {', '.join(DTYPES)}")
    norms = args.norms.split(",")
    for n in norms:
        if n not in NORMS:
            parser.error(f"--norms: unknown norm {n!r}; valid: {', '.join(sorted(NORMS))}")

    rows = run(shape, dtypes, norms, args.repeat)
    if sys.platform.startswith("linux") and _fast_blas.status == "loaded":
        rows += matmul_rows(args.matmul_size)
    for r in rows:
        r.update(machine=machine(), device=device(), mlx=mx.__version__)
        r["ms"] = round(r["ms"], 4)
        r["ratio"] = round(r["ratio"], 3)
    columns = ["machine", "device", "mlx", "dtype", "shape", "norm", "path", "pass", "ms",
               "ratio"]
    rows = [{c: r[c] for c in columns} for r in rows]
    out = Path(args.out)
    csv_path = write_csv(rows, out / "norms.csv")
    plot(rows, out / "norms.png")
    print(markdown_table(rows, ["dtype", "norm", "path", "pass", "ms", "ratio"]))
    print(f"\nwrote {csv_path} and {out / 'norms.png'}")
    return 0
