"""``mlx-localnorm bench emulate``: how fast the CPU Metal emulator runs MLX-style kernels.

For each shape and dtype, the RMSNorm kernel in MLX's style and a float4 copy run through
:func:`mlx_localnorm.emulate.metal_kernel`; a row has the first call (which compiles, unless
cached), the median of the next calls, GPU threads per second, and the traffic the emulator
counted against the minimum. These are CPU emulation times, not Metal timings.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import mlx.core as mx

from .._argparse import OneLineParser
from ..emulate import metal_kernel
from ..emulate.examples import (
    COPY_FLOAT4_SOURCE,
    RMS_NORM_INPUTS,
    RMS_NORM_OUTPUTS,
    RMS_NORM_SOURCE,
    rms_norm_geometry,
)
from .common import machine, markdown_table, write_csv

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def _shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for item in text.split(","):
        rows, _, dims = item.partition("x")
        if not (rows.isdigit() and dims.isdigit() and int(rows) > 0 and int(dims) > 0):
            raise argparse.ArgumentTypeError(f"shapes are ROWSxDIMS, comma separated; got {item!r}")
        shapes.append((int(rows), int(dims)))
    return shapes


def _launches(rows: int, dims: int, dtype: mx.Dtype) -> dict[str, tuple]:
    """kernel name -> (kernel, call arguments) for one shape."""
    key = mx.random.key(0)
    x = mx.random.normal((rows, dims), key=key).astype(dtype)
    grid, threadgroup = rms_norm_geometry(rows, dims)
    launches = {
        "rms_norm": (
            metal_kernel("bench_rms_norm", RMS_NORM_INPUTS, RMS_NORM_OUTPUTS, RMS_NORM_SOURCE),
            {
                "inputs": [x, mx.ones((dims,), dtype), 1e-6],
                "template": [("T", dtype)],
                "grid": grid,
                "threadgroup": threadgroup,
                "output_shapes": [x.shape],
                "output_dtypes": [dtype],
            },
        )
    }
    if dtype == mx.float32 and dims % 4 == 0:
        launches["copy_float4"] = (
            metal_kernel("bench_copy4", ["x"], ["out"], COPY_FLOAT4_SOURCE),
            {
                "inputs": [x],
                "grid": (x.size // 4, 1, 1),
                "threadgroup": (256, 1, 1),
                "output_shapes": [x.shape],
                "output_dtypes": [dtype],
            },
        )
    return launches


def measure(shapes: list[tuple[int, int]], dtypes: list[str], repeat: int) -> list[dict]:
    rows_out = []
    for rows, dims in shapes:
        for dtype_name in dtypes:
            for name, (kernel, kwargs) in _launches(rows, dims, DTYPES[dtype_name]).items():
                start = time.perf_counter()
                kernel(**kwargs)
                first = time.perf_counter() - start
                samples = []
                for _ in range(repeat):
                    start = time.perf_counter()
                    kernel(**kwargs)
                    samples.append(time.perf_counter() - start)
                seconds = statistics.median(samples)
                stats = kernel.last_stats
                threads = kwargs["grid"][0] * kwargs["grid"][1] * kwargs["grid"][2]
                rows_out.append(
                    {
                        "machine": machine(),
                        "kernel": name,
                        "dtype": dtype_name,
                        "rows": rows,
                        "dims": dims,
                        "threads": threads,
                        "threadgroups": stats.threadgroups,
                        "first_call_s": round(first, 3),
                        "seconds": round(seconds, 4),
                        "mthreads_per_s": round(threads / seconds / 1e6, 2),
                        "bytes_moved": stats.bytes_moved,
                        "minimum_bytes": stats.minimum_bytes,
                        "traffic_ratio": round(stats.traffic_ratio, 3),
                    }
                )
    return rows_out


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(
        prog="mlx-localnorm bench emulate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", default="bench/results", help="output directory")
    parser.add_argument(
        "--shapes",
        type=_shapes,
        default="1000x4096,1000x1024,3x8192",
        help="ROWSxDIMS, comma separated",
    )
    parser.add_argument(
        "--dtypes", default="float32,bfloat16", help=f"comma separated, from {', '.join(DTYPES)}"
    )
    parser.add_argument("--repeat", type=int, default=3, help="timed calls per row")
    args = parser.parse_args(argv)
    dtypes = args.dtypes.split(",")
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown:
        parser.error(f"--dtypes: unknown {unknown}; choose from {list(DTYPES)}")
    if args.repeat < 1:
        parser.error(f"--repeat must be >= 1, got {args.repeat}")
    rows = measure(args.shapes, dtypes, args.repeat)
    path = write_csv(rows, Path(args.out) / "emulate.csv")
    columns = [
        "kernel",
        "dtype",
        "rows",
        "dims",
        "threads",
        "seconds",
        "mthreads_per_s",
        "traffic_ratio",
    ]
    print(markdown_table(rows, columns))
    print(f"\nwrote {path} (CPU emulation of Metal kernels; Metal timings need a Mac)")
    return 0
