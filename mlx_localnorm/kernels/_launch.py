"""Backend choice, kernel objects built once per variant, and the launch geometry.

The kernel bodies live in ``metal/*.metal`` beside the package; ``metal/common.h`` is passed as
``header=``. A variant of a body is selected by ``#define`` lines put in front of it (its
inputs and outputs differ), and each variant gets its own kernel name.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import mlx.core as mx

BACKENDS = ("auto", "metal", "ops", "emulate")
BACKEND_ENV = "MLX_LOCALNORM_BACKEND"
# metal/ of a source checkout, or the copy a wheel ships inside the package.
_CHECKOUT_METAL = Path(__file__).resolve().parents[2] / "metal"
METAL_DIR = _CHECKOUT_METAL if _CHECKOUT_METAL.is_dir() else Path(__file__).parents[1] / "metal"
KERNEL_DTYPES = (mx.float32, mx.float16, mx.bfloat16)

N_READS = 4  # elements per thread per iteration of the register tile (MLX's RMS_N_READS)
# A pipeline's own thread limit falls below Metal's 1024 as its registers rise (832 on an M1
# Max, 896 on an M2 Ultra), and MLX only finds out at mx.eval. 256 threads fit every pipeline
# on every Apple GPU, so the register-tiled kernels never ask for more and loop over the row.
TILE_THREADS = 256
MAX_ITERS = 32  # register tile of at most 32 x 4 values per thread: rows up to 32768 wide
# MLX's binding takes each grid component as a C++ int: a larger one is a TypeError at the call.
MAX_GRID = 2**31 - 1


def resolve_backend(backend: str) -> str:
    """``"metal"``, ``"ops"`` or ``"emulate"``: the env var wins; ``"auto"`` is Metal if present."""
    forced = os.environ.get(BACKEND_ENV)
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"{BACKEND_ENV} must be one of {BACKENDS}, got {forced!r}")
        backend = forced
    elif backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "metal" if mx.metal.is_available() else "ops"
    if backend == "metal" and not mx.metal.is_available():
        raise ValueError(
            "backend='metal' needs a Metal GPU but mx.metal.is_available() is False; "
            "use backend='ops' (plain MLX ops) or 'emulate' (the Metal source on the CPU)"
        )
    return backend


_warned: set[str] = set()


def warn_fallback(what: str, reason: str) -> None:
    """Say once per (kernel, reason) that the ops twin runs instead of the kernel."""
    key = f"{what}: {reason}"
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"{what}: {reason}; using the MLX ops twin instead", stacklevel=3)


@functools.cache
def _read(filename: str) -> str:
    path = METAL_DIR / filename
    if not path.is_file():
        raise FileNotFoundError(f"Metal kernel source {path} is missing (metal/ must sit beside "
                                f"the mlx_localnorm package)")
    return path.read_text()


_traffic_logs: list[list] = []


@contextlib.contextmanager
def record_traffic() -> Iterator[list]:
    """Collect the emulator's ``LaunchStats`` (bytes read and written per buffer) of every
    emulated kernel launch inside the block, in launch order."""
    log: list = []
    _traffic_logs.append(log)
    try:
        yield log
    finally:
        _traffic_logs.remove(log)


def _recorded(launch: Callable) -> Callable:
    def call(**kwargs):
        try:
            outputs = launch(**kwargs)
        except ValueError as error:
            if "function transformations" not in str(error):
                raise
            raise ValueError(
                "backend='emulate' runs the kernels eagerly on the CPU, so it cannot be traced "
                "by mx.compile or mx.vmap; use backend='ops' (or Metal on a Mac) inside them"
            ) from error
        for log in _traffic_logs:
            log.append(launch.last_stats)
        return outputs
    return call


@functools.cache
def kernel(name: str, body: str, backend: str, input_names: tuple[str, ...],
           output_names: tuple[str, ...], defines: tuple[tuple[str, int], ...] = ()):
    """The kernel object of one variant, built once: Metal's on a Mac, else the CPU emulator's."""
    prefix = "".join(f"#define {key} {value}\n" for key, value in defines)
    arguments = {"name": f"mlx_localnorm_{name}", "input_names": list(input_names),
                 "output_names": list(output_names), "source": prefix + _read(body),
                 "header": _read("common.h")}
    if backend == "metal":
        return mx.fast.metal_kernel(**arguments)
    from ..emulate import metal_kernel

    return _recorded(metal_kernel(**arguments))


class Launch(NamedTuple):
    """Geometry of a row kernel: register-tile iterations, grid and threadgroup (in threads)."""

    iters: int
    grid: tuple[int, int, int]
    threadgroup: tuple[int, int, int]
    groups: int


def thread_limit(backend: str) -> int:
    """Most threads per threadgroup a row kernel asks for: ``TILE_THREADS``, or the emulated
    pipeline's lower limit (``MLX_LOCALNORM_EMULATE_MAX_THREADS``) under ``"emulate"``."""
    if backend != "emulate":
        return TILE_THREADS
    from ..emulate import pipeline_thread_limit

    return min(TILE_THREADS, pipeline_thread_limit())


def max_dims(backend: str) -> int:
    """The widest row the register tiles cover within ``thread_limit(backend)`` threads."""
    return thread_limit(backend) * N_READS * MAX_ITERS


def row_launch(rows: int, dims: int, backend: str, rows_per_group: int = 1) -> Launch:
    """One threadgroup per ``rows_per_group`` rows, its register tile covering a row once.

    ``ceil(D / (4 t))`` iterations of ``N_READS`` elements per thread, ``t`` the thread limit,
    and the fewest threads (a multiple of the 32-lane simdgroup) that cover the row with them.
    """
    problem = launch_problem(rows, dims, backend, rows_per_group)
    if problem:
        raise ValueError(f"row_launch: {problem}")
    return _geometry(rows, dims, backend, rows_per_group)


def _geometry(rows: int, dims: int, backend: str, rows_per_group: int) -> Launch:
    iters = math.ceil(dims / (thread_limit(backend) * N_READS))
    threads = 32 * math.ceil(math.ceil(dims / (N_READS * iters)) / 32)
    groups = math.ceil(rows / rows_per_group)
    return Launch(iters, (groups * threads, 1, 1), (threads, 1, 1), groups)


def launch_problem(rows: int, dims: int, backend: str, rows_per_group: int = 1) -> str | None:
    """Why ``row_launch`` cannot launch ``rows`` rows of ``dims`` (a row wider than the register
    tiles, or a grid over 2**31 - 1 threads), or None. Arithmetic only: shapes too large to
    allocate can be checked."""
    if dims > max_dims(backend):
        return f"last axis {dims} is wider than {max_dims(backend)}"
    grid = _geometry(rows, dims, backend, rows_per_group).grid[0]
    if grid > MAX_GRID:
        return (f"{rows} rows of {dims} need a grid of {grid} threads, over MLX's limit of "
                f"2**31 - 1 per grid component")
    return None


def consts(*values: float) -> mx.array:
    """Float scalars for a kernel, in one small float32 array (``constant`` address space)."""
    return mx.array(values, dtype=mx.float32)
