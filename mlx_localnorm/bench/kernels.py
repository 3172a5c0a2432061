"""``mlx-localnorm bench kernels``: the fused SeeDNorm, PatchNorm, RMSNorm and norm-add-norm
kernels.

On a Mac: forward and forward+backward time of our Metal kernels against ``mx.fast.rms_norm``,
``mx.fast.layer_norm`` and the eager and ``mx.compile``d ops twins, as ms, GB/s of the minimum
traffic and % of the measured copy bandwidth. Everywhere (and alone on Linux, where Metal
timings cannot be taken): the CPU emulator's count of device-memory bytes each kernel moves,
per element, against the minimum (every input read once, every output written once).
"""

from __future__ import annotations

import argparse
import platform
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx

from .._argparse import OneLineParser
from .. import kernels, norms
from .common import device, machine, markdown_table, time_ms, write_csv

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
METAL_NOTE = ("Metal timings need a Mac with Apple silicon: this machine has no Metal device, so "
              "only the ops paths were timed (on the CPU) and the kernels were run in the CPU "
              "emulator to count their memory traffic.")


def _params(dims: int, dtype: mx.Dtype) -> dict[str, mx.array]:
    keys = mx.random.split(mx.random.key(2), 3)
    return {"weight": (1 + 0.1 * mx.random.normal((dims,), key=keys[0])).astype(dtype),
            "alpha": (0.5 + 0.1 * mx.random.normal((dims,), key=keys[1])).astype(dtype),
            "beta": (0.02 * mx.random.normal((dims,), key=keys[2])).astype(dtype),
            "bias": mx.zeros((dims,), dtype)}


def candidates(backend_kernels: str | None) -> dict[str, Callable]:
    """name -> f(x, params) -> y: our kernels (if a backend is given), MLX's fast norms and the
    ops twins."""
    out = {
        "mx.fast.rms_norm": lambda x, p: mx.fast.rms_norm(x, p["weight"], 1e-6),
        "mx.fast.layer_norm": lambda x, p: mx.fast.layer_norm(x, p["weight"], p["bias"], 1e-6),
        "seednorm ops": lambda x, p: norms.seednorm(x, p["weight"], p["alpha"], p["beta"]),
        "patchnorm ops (k=4)": lambda x, p: norms.patchnorm(x, p["weight"], p["bias"],
                                                            patch_size=4),
    }
    if backend_kernels:
        b = backend_kernels
        out.update({
            "seednorm kernel": lambda x, p: kernels.seednorm(
                x, p["weight"], p["alpha"], p["beta"], backend=b),
            "rms_norm kernel": lambda x, p: kernels.rms_norm(x, p["weight"], backend=b),
            "patchnorm kernel (k=4)": lambda x, p: kernels.patchnorm(
                x, p["weight"], p["bias"], patch_size=4, backend=b),
        })
    return out


def timing_rows(shape: tuple[int, ...], dtype_name: str, repeat: int, on_mac: bool) -> list[dict]:
    """ms, GB/s of the minimum traffic and % of copy bandwidth for each candidate and pass."""
    dtype = DTYPES[dtype_name]
    x = mx.random.normal(shape, key=mx.random.key(0)).astype(dtype)
    cotangent = mx.random.normal(shape, key=mx.random.key(1)).astype(dtype)
    params = _params(shape[-1], dtype)
    # A copy reads and writes one tensor: the bandwidth attainable on this device.
    copy_gbps = 2 * x.nbytes / time_ms(lambda: x + 1, repeat=repeat) / 1e6
    rows = []
    for name, f in candidates("metal" if on_mac else None).items():
        def fwd_bwd(x, p, f=f):
            return mx.grad(lambda x, p: (f(x, p) * cotangent).sum(), argnums=(0, 1))(x, p)

        # tensors a fused pass has to move: x, y forward; also g, x again and dx backward
        for pass_name, call, tensors in (("forward", f, 2), ("forward+backward", fwd_bwd, 5)):
            for path, fn in (("eager", call), ("compiled", mx.compile(call))):
                ms = time_ms(lambda fn=fn: fn(x, params), repeat=repeat)
                gbps = tensors * x.nbytes / ms / 1e6
                rows.append({"dtype": dtype_name, "shape": "x".join(map(str, shape)),
                             "method": name, "path": path, "pass": pass_name, "ms": ms,
                             "gbps": gbps, "pct_copy": 100 * gbps / copy_gbps})
    return rows


def _launches(fn: Callable, primals: list, cotangents: list) -> tuple[list, list]:
    """The emulator's launch stats of ``fn``'s forward, and of its backward alone."""
    with kernels.record_traffic() as forward:
        mx.eval(fn(*primals))
    with kernels.record_traffic() as both:
        mx.eval(mx.vjp(fn, primals, cotangents))
    return forward, both[len(forward):]


def traffic_rows(rows: int, dims: int, dtype_name: str) -> list[dict]:
    """Bytes each emulated kernel moves per element of x, against the minimum."""
    dtype = DTYPES[dtype_name]
    x = mx.random.normal((rows, dims), key=mx.random.key(0)).astype(dtype)
    g = mx.random.normal((rows, dims), key=mx.random.key(1)).astype(dtype)
    p = _params(dims, dtype)
    w, a, b = p["weight"], p["alpha"], p["beta"]
    t, vec = x.nbytes, w.nbytes
    f32 = x.size * 4  # PatchNorm's fused part works on the float32 copy of x and on W x in float32
    cases = {
        # name: (function, primals, cotangents, forward minimum, backward minimum)
        "seednorm": (lambda x, w, a, b: kernels.seednorm(x, w, a, b, backend="emulate"),
                     [x, w, a, b], [g], 2 * t + 3 * vec, 3 * t + 6 * vec),
        "seednorm, 8 heads": (
            lambda x, w, a, b: kernels.seednorm(x, w, a, b, num_heads=8, backend="emulate"),
            [x, w, a, b], [g], 2 * t + 3 * vec, 3 * t + 6 * vec),
        "seednorm, frozen": (
            lambda x, w, a, b: kernels.seednorm(x, w, a, b, frozen=True, backend="emulate"),
            [x, w, a, b], [g], 2 * t + 3 * vec, 3 * t + 3 * vec),
        "seednorm + residual": (
            lambda x, r, w, a, b: kernels.seednorm(x, w, a, b, residual=r, backend="emulate"),
            [x, g, w, a, b], [g, g], 4 * t + 3 * vec, 4 * t + 6 * vec),
        "rms_norm": (lambda x, w: kernels.rms_norm(x, w, backend="emulate"), [x, w], [g],
                     2 * t + vec, 3 * t + 2 * vec),
        "patchnorm k=4 (fused division)": (
            lambda x: kernels.patchnorm(x, w, patch_size=4, backend="emulate"), [x], [g],
            3 * f32, 5 * f32),
    }
    out = []
    for name, (fn, primals, cotangents, fwd_min, bwd_min) in cases.items():
        forward, backward = _launches(fn, primals, cotangents)
        for pass_name, launches, minimum in (("forward", forward, fwd_min),
                                             ("backward", backward, bwd_min)):
            moved = sum(s.bytes_moved for s in launches)
            out.append({"dtype": dtype_name, "shape": f"{rows}x{dims}", "kernel": name,
                        "pass": pass_name, "launches": len(launches),
                        "bytes_per_element": moved / x.size,
                        "min_bytes_per_element": minimum / x.size, "ratio": moved / minimum})
    return out


def norm_add_norm_rows(rows: int, dims: int, dtype_name: str) -> list[dict]:
    """Peri-LN's ``h = x + N_out(b)``, ``y = N_in(h)``: the fused kernel and the unfused
    sequence (two norm kernels and MLX's add, counted as its minimum: two tensors read, one
    written; backward: the add of h's two cotangents), both against the fused minimum."""
    dtype = DTYPES[dtype_name]
    keys = mx.random.split(mx.random.key(3), 4)
    b, x, g_h, g_y = (mx.random.normal((rows, dims), key=k).astype(dtype) for k in keys)
    p = _params(dims, dtype)
    t, vec = b.nbytes, p["weight"].nbytes
    norms_of = {
        "seednorm": ([p["weight"], p["alpha"], p["beta"]],
                     lambda v, q: kernels.seednorm(v, *q, backend="emulate")),
        "rms_norm": ([p["weight"]], lambda v, q: kernels.rms_norm(v, q[0], backend="emulate")),
    }
    out = []
    for kind, (params, norm) in norms_of.items():
        n = len(params)

        def fused(b, x, *q, n=n):
            return kernels.norm_add_norm(b, x, q[:n], q[n:], backend="emulate")

        def unfused(b, x, *q, n=n, norm=norm):
            h = x + norm(b, q[:n])
            return h, norm(h, q[n:])

        minimum = {"forward": 4 * t + 2 * n * vec, "backward": 6 * t + 4 * n * vec}
        for label, fn, add_bytes in (("fused", fused, 0), ("unfused", unfused, 3 * t)):
            forward, backward = _launches(fn, [b, x, *params, *params], [g_h, g_y])
            for pass_name, launches in (("forward", forward), ("backward", backward)):
                moved = sum(s.bytes_moved for s in launches) + add_bytes
                out.append({"dtype": dtype_name, "shape": f"{rows}x{dims}",
                            "kernel": f"{kind} add norm ({label})", "pass": pass_name,
                            "launches": len(launches), "bytes_per_element": moved / b.size,
                            "min_bytes_per_element": minimum[pass_name] / b.size,
                            "ratio": moved / minimum[pass_name]})
    return out


def plot(timing: list[dict], traffic: list[dict], path: Path) -> None:
    """Traffic ratio per kernel and shape (worst dtype), forward and backward; times of the
    last timed shape in the first dtype, eager and compiled, forward and forward+backward."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 * bool(traffic) + 2 * bool(timing)
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.8), squeeze=False)
    if traffic:
        for ax, pass_name, target in zip(axes[0], ("forward", "backward"), (1.05, 1.15)):
            _plot_traffic(ax, [r for r in traffic if r["pass"] == pass_name], target)
            ax.set_title(f"{pass_name} traffic (SeeDNorm target {target}x at full blocks)",
                         fontsize=9)
    if timing:
        shape, dtype = timing[-1]["shape"], timing[0]["dtype"]
        sel = [r for r in timing if r["shape"] == shape and r["dtype"] == dtype]
        methods = list(dict.fromkeys(r["method"] for r in sel))
        for ax, pass_name in zip(axes[0][-2:], ("forward", "forward+backward")):
            for offset, path_name in ((-0.2, "eager"), (0.2, "compiled")):
                ms = [next(r["ms"] for r in sel if r["method"] == m and r["path"] == path_name
                           and r["pass"] == pass_name) for m in methods]
                ax.barh([i + offset for i in range(len(methods))], ms, height=0.4,
                        label=path_name)
            ax.set_yticks(range(len(methods)), methods, fontsize=8)
            ax.set_xlabel("ms (median)")
            ax.set_title(f"{pass_name}, {dtype} {shape}, {device()}", fontsize=9)
            ax.legend(fontsize=7)
            ax.invert_yaxis()
    fig.suptitle(f"mlx_localnorm kernels, {machine()} ({device()}), MLX {mx.__version__}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_traffic(ax, traffic: list[dict], target: float) -> None:
    """Bars of bytes moved / minimum per kernel, one per shape (the worst dtype)."""
    names = list(dict.fromkeys(r["kernel"] for r in traffic))
    shapes = list(dict.fromkeys(r["shape"] for r in traffic))
    height = 0.8 / len(shapes)
    for j, shape in enumerate(shapes):
        worst = [max(r["ratio"] for r in traffic if r["kernel"] == n and r["shape"] == shape)
                 for n in names]
        bars = ax.barh([i - 0.4 + (j + 0.5) * height for i in range(len(names))], worst,
                       height=height, label=f"{shape} rows x D")
        ax.bar_label(bars, fmt="%.2f", fontsize=6)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.axvline(1.0, color="k", lw=0.8)
    ax.axvline(target, color="r", lw=0.8, ls="--")
    ax.set_xlim(left=0.8)
    ax.set_xlabel("bytes moved / minimum (emulator count)")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=len(shapes))
    ax.invert_yaxis()


def _shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for item in text.split(","):
        parts = item.lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise argparse.ArgumentTypeError(f"shapes are ROWSxDIMS separated by commas, "
                                             f"got {item!r}")
        shapes.append((int(parts[0]), int(parts[1])))
    return shapes


def main(argv: list[str] | None = None) -> int:
    on_mac = mx.metal.is_available()
    parser = OneLineParser(prog="mlx-localnorm bench kernels", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/results", help="output directory")
    parser.add_argument("--shapes", type=_shapes,
                        default="8192x1024,8192x4096" if on_mac else "1024x1024,256x4096",
                        help="timed shapes, ROWSxDIMS, comma separated")
    parser.add_argument("--traffic-shapes", type=_shapes, default="8192x1024,8192x2048,256x4096",
                        help="shapes run in the emulator to count bytes")
    parser.add_argument("--dtypes", default="float32,float16,bfloat16",
                        help=f"comma separated, from {', '.join(DTYPES)}")
    parser.add_argument("--repeat", type=int, default=10, help="timing samples per row")
    parser.add_argument("--no-timing", action="store_true", help="only count traffic")
    parser.add_argument("--no-traffic", action="store_true", help="only time")
    args = parser.parse_args(argv)
    dtypes = args.dtypes.split(",")
    for d in dtypes:
        if d not in DTYPES:
            parser.error(f"--dtypes: unknown dtype {d!r}; valid: {', '.join(DTYPES)}")
    if args.repeat < 1:
        parser.error(f"--repeat must be >= 1, got {args.repeat}")
    if args.no_timing and args.no_traffic:
        parser.error("--no-timing and --no-traffic leave nothing to do")

    info = {"machine": machine(), "os": f"{platform.system()} {platform.release()}",
            "device": device(), "mlx": mx.__version__}
    out = Path(args.out)
    written = []
    timing = [] if args.no_timing else [
        r for shape in args.shapes for d in dtypes
        for r in timing_rows(shape, d, args.repeat, on_mac)]
    if timing:
        for r in timing:
            r.update(ms=round(r["ms"], 4), gbps=round(r["gbps"], 2),
                     pct_copy=round(r["pct_copy"], 1))
        written.append(write_csv([{**info, **r} for r in timing], out / "kernels_timing.csv"))
        print(markdown_table(timing, ["method", "path", "pass", "dtype", "shape", "ms", "gbps",
                                      "pct_copy"]))
    traffic = []
    if not args.no_traffic:
        try:
            traffic = [r for shape in args.traffic_shapes for d in dtypes
                       for r in traffic_rows(*shape, d) + norm_add_norm_rows(*shape, d)]
        except (RuntimeError, OSError) as error:  # no C++ compiler, or no emulator on this OS
            print(f"\ntraffic not counted: the CPU emulator failed ({error})")
    if traffic:
        for r in traffic:
            for key in ("bytes_per_element", "min_bytes_per_element", "ratio"):
                r[key] = round(r[key], 3)
        written.append(write_csv([{**info, **r} for r in traffic], out / "kernels_traffic.csv"))
        print()
        print(markdown_table(traffic, ["kernel", "pass", "dtype", "shape", "bytes_per_element",
                                       "min_bytes_per_element", "ratio"]))
    if timing or traffic:
        plot(timing, traffic, out / "kernels.png")
        written.append(out / "kernels.png")
    if not on_mac:
        print(f"\n{METAL_NOTE}")
    print(f"\nwrote {', '.join(map(str, written))}")
    return 0
