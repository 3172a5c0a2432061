"""`metal_kernel`: a CPU twin of `mx.fast.metal_kernel` that runs the same Metal body text."""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from . import _build
from ._translate import (
    InputSpec,
    KernelSpec,
    cpp_source,
    file_names,
    metal_source,
    type_string,
)

MAX_THREADS_PER_THREADGROUP = 1024
MAX_THREADS_ENV = "MLX_LOCALNORM_EMULATE_MAX_THREADS"
SEED_ENV = "MLX_LOCALNORM_EMULATE_SEED"
SCHEDULES_ENV = "MLX_LOCALNORM_EMULATE_SCHEDULES"
TIMEOUT_ENV = "MLX_LOCALNORM_EMULATE_TIMEOUT"
ORDER_ENV = "MLX_LOCALNORM_EMULATE_ORDER"
# Order of a threadgroup's threads between synchronisation points (mlxe::Order): "mixed" draws
# forward, reverse or shuffled per threadgroup from the seed.
ORDERS = ("forward", "reverse", "shuffle", "mixed")
# MLX's Python binding takes grid and threadgroup as C++ ints.
MAX_INT32 = 2**31 - 1
_ALIGNMENT = 64
_INT_POISON = 0xA5
_launch_lock = threading.Lock()

_NUMPY_STORAGE = {
    mx.float32: np.float32,
    mx.float16: np.float16,
    mx.bfloat16: np.uint16,  # bfloat16 travels as its bits
    mx.float64: np.float64,
    mx.bool_: np.bool_,
    mx.int8: np.int8,
    mx.int16: np.int16,
    mx.int32: np.int32,
    mx.int64: np.int64,
    mx.uint8: np.uint8,
    mx.uint16: np.uint16,
    mx.uint32: np.uint32,
    mx.uint64: np.uint64,
}
_FLOATING = (mx.float32, mx.float16, mx.bfloat16, mx.float64)


class EmulatorError(RuntimeError):
    """A kernel fault found while running it: out-of-bounds access, missed barrier, ..."""


@dataclass(frozen=True)
class BufferTraffic:
    """Device-memory bytes one kernel argument moved during a launch."""

    name: str
    role: str
    nbytes: int
    bytes_read: int
    bytes_written: int
    scalar: bool = False  # a 0-d input, bound as `constant T&`: its reads are not counted


@dataclass(frozen=True)
class LaunchStats:
    """What a launch did: its geometry and the bytes read and written per buffer."""

    kernel: str
    grid: tuple[int, int, int]
    threadgroup: tuple[int, int, int]
    threadgroups: int
    buffers: tuple[BufferTraffic, ...]

    @property
    def bytes_read(self) -> int:
        return sum(b.bytes_read for b in self.buffers)

    @property
    def bytes_written(self) -> int:
        return sum(b.bytes_written for b in self.buffers)

    @property
    def bytes_moved(self) -> int:
        return self.bytes_read + self.bytes_written

    @property
    def minimum_bytes(self) -> int:
        """The least traffic possible: every array input read once, every output written once."""
        return sum(b.nbytes for b in self.buffers if not b.scalar)

    @property
    def traffic_ratio(self) -> float:
        """`bytes_moved / minimum_bytes`: 1.0 for a kernel that touches every byte once."""
        return self.bytes_moved / self.minimum_bytes if self.minimum_bytes else float("nan")

    def __getitem__(self, name: str) -> BufferTraffic:
        for buffer in self.buffers:
            if buffer.name == name:
                return buffer
        raise KeyError(f"no buffer named {name!r}; buffers: {[b.name for b in self.buffers]}")


def _aligned_empty(shape: tuple[int, ...], dtype: type) -> np.ndarray:
    # Metal buffers are page aligned; aligned host buffers keep float4 loads checkable.
    itemsize = np.dtype(dtype).itemsize
    nbytes = int(np.prod(shape, dtype=np.int64)) * itemsize
    raw = np.empty(nbytes + _ALIGNMENT, dtype=np.uint8)
    start = -raw.ctypes.data % _ALIGNMENT
    return raw[start : start + nbytes].view(dtype).reshape(shape)


def _to_numpy(array: mx.array) -> np.ndarray:
    if array.dtype == mx.bfloat16:
        array = array.view(mx.uint16)
    return np.asarray(array)


def _from_numpy(data: np.ndarray, dtype: mx.Dtype) -> mx.array:
    out = mx.array(data)
    return out.view(mx.bfloat16) if dtype == mx.bfloat16 else out


def _env_number(name: str, default: str, kind: type) -> int | float:
    text = os.environ.get(name, default)
    try:
        return kind(text)
    except ValueError:
        raise ValueError(
            f"environment variable {name} must be a {kind.__name__}, got {text!r}"
        ) from None


def pipeline_thread_limit() -> int:
    """The emulated pipeline's `maxTotalThreadsPerThreadgroup`, read at every launch from
    MLX_LOCALNORM_EMULATE_MAX_THREADS (default 1024): a multiple of the 32-lane simdgroup from
    32 to 1024, as real pipelines report (896 on an M2 Ultra, 832 on an M1 Max)."""
    limit = _env_number(MAX_THREADS_ENV, str(MAX_THREADS_PER_THREADGROUP), int)
    if not 32 <= limit <= MAX_THREADS_PER_THREADGROUP or limit % 32:
        raise ValueError(f"environment variable {MAX_THREADS_ENV} must be a multiple of 32 from "
                         f"32 to {MAX_THREADS_PER_THREADGROUP}, got {limit}")
    return limit


def thread_order() -> str:
    """The thread order of every launch, from MLX_LOCALNORM_EMULATE_ORDER (default "mixed")."""
    order = os.environ.get(ORDER_ENV, "mixed")
    if order not in ORDERS:
        raise ValueError(f"environment variable {ORDER_ENV} must be one of {ORDERS}, "
                         f"got {order!r}")
    return order


def _check_triple(value: object, what: str, minimum: int) -> tuple[int, int, int]:
    if (
        not isinstance(value, Sequence)
        or len(value) != 3
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in value)
    ):
        raise ValueError(f"[metal_kernel] `{what}` must be 3 integers >= {minimum}, got {value!r}")
    if max(value) > MAX_INT32:
        # What MLX's nanobind binding raises for a component that does not fit a C++ int.
        raise TypeError(
            f"__call__(): incompatible function arguments: `{what}` is tuple[int, int, int] of "
            f"C++ ints, at most 2**31 - 1 = {MAX_INT32} each; got {tuple(value)}"
        )
    return (int(value[0]), int(value[1]), int(value[2]))


class EmulatedKernel:
    """A custom Metal kernel run on the CPU. Call it like the object `mx.fast.metal_kernel`
    returns; `last_stats` holds the traffic of the latest launch."""

    def __init__(
        self,
        name: str,
        input_names: Sequence[str],
        output_names: Sequence[str],
        source: str,
        header: str = "",
        ensure_row_contiguous: bool = True,
        atomic_outputs: bool = False,
        *,
        seed: int | None = None,
        schedules: int | None = None,
        timeout: float | None = None,
    ) -> None:
        for what, names in (("input_names", input_names), ("output_names", output_names)):
            if isinstance(names, str) or not all(isinstance(n, str) and n for n in names):
                raise TypeError(f"[metal_kernel] `{what}` must be a list of names, got {names!r}")
        if not output_names:
            raise ValueError("[metal_kernel] Must specify at least one output.")
        if not isinstance(source, str) or not isinstance(header, str):
            raise TypeError("[metal_kernel] `source` and `header` must be strings")
        self.name = name
        self.input_names = tuple(input_names)
        self.output_names = tuple(output_names)
        self.source = source
        self.header = header
        self.ensure_row_contiguous = ensure_row_contiguous
        self.atomic_outputs = atomic_outputs
        # Threadgroup and thread order are a seeded shuffle: runs are reproducible; with
        # schedules > 1 every launch runs that many times and the outputs must agree bitwise.
        self.seed = _env_number(SEED_ENV, "0", int) if seed is None else int(seed)
        self.schedules = _env_number(SCHEDULES_ENV, "1", int) if schedules is None else schedules
        self.timeout = _env_number(TIMEOUT_ENV, "300", float) if timeout is None else timeout
        if not isinstance(self.schedules, int) or self.schedules < 1:
            raise ValueError(f"schedules must be an integer >= 1, got {self.schedules!r}")
        if self.timeout < 0:
            raise ValueError(f"timeout must be >= 0 seconds (0: no limit), got {self.timeout!r}")
        self.last_stats: LaunchStats | None = None

    def spec(
        self,
        inputs: Sequence[mx.array],
        output_dtypes: Sequence[mx.Dtype],
        template: Sequence[tuple[str, bool | int | mx.Dtype]] | None = None,
    ) -> KernelSpec:
        """The generated-source description of a call with these inputs."""
        template_args = []
        for item in template or ():
            if not (
                isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str)
            ):
                raise TypeError(f"[metal_kernel] template entries are (name, value), got {item!r}")
            if not isinstance(item[1], (bool, int, mx.Dtype)):
                raise TypeError(
                    "[metal_kernel] Invalid template argument. Must be `mlx.core.Dtype`, `int` "
                    f"or `bool`, got {item[0]}={item[1]!r}"
                )
            template_args.append((item[0], item[1]))
        return KernelSpec(
            name=self.name,
            inputs=tuple(
                InputSpec(n, a.dtype, a.ndim, a.size) for n, a in zip(self.input_names, inputs)
            ),
            output_names=self.output_names,
            output_dtypes=tuple(output_dtypes),
            template=tuple(template_args),
            source=self.source,
            header=self.header,
            atomic_outputs=self.atomic_outputs,
        )

    def __call__(
        self,
        *,
        inputs: Sequence[mx.array | float | int | bool],
        output_shapes: Sequence[Sequence[int]],
        output_dtypes: Sequence[mx.Dtype],
        grid: tuple[int, int, int],
        threadgroup: tuple[int, int, int],
        template: Sequence[tuple[str, bool | int | mx.Dtype]] | None = None,
        init_value: float | None = None,
        verbose: bool = False,
        stream: object = None,
    ) -> list[mx.array]:
        del stream  # the emulator always runs on the host
        for what, given, expected in (
            ("inputs", len(inputs), len(self.input_names)),
            ("output_shapes", len(output_shapes), len(self.output_names)),
            ("output_dtypes", len(output_dtypes), len(self.output_names)),
        ):
            if given != expected:
                raise ValueError(
                    f"[metal_kernel] Expected `{what}` to have size {expected} but got size {given}."
                )
        grid = _check_triple(grid, "grid", 0)
        threadgroup = _check_triple(threadgroup, "threadgroup", 1)
        threads = threadgroup[0] * threadgroup[1] * threadgroup[2]
        limit = pipeline_thread_limit()
        # MLX compares the requested threadgroup (before clipping it to the grid) at launch.
        if threads > limit:
            raise ValueError(
                f"[metal_kernel] Thread group size ({threads}) is greater than the maximum "
                f"allowed threads per threadgroup ({limit}); got threadgroup={threadgroup}"
            )
        arrays = [a if isinstance(a, mx.array) else mx.array(a) for a in inputs]
        mx.eval(arrays)
        spec = self.spec(arrays, output_dtypes, template)
        if verbose:
            print(f"Generated source code for `{self.name}`:\n```\n{metal_source(spec)}\n```")
        source_file, header_file = file_names(spec)
        library = _build.load(
            cpp_source(spec), self.name, {source_file: self.source, header_file: self.header}
        )
        hosts = [self._input_layout(a) for a in arrays]
        shapes = [tuple(int(s) for s in shape) for shape in output_shapes]

        first = None
        for schedule in range(self.schedules):
            outputs = [
                self._output(shape, dtype, init_value)
                for shape, dtype in zip(shapes, output_dtypes)
            ]
            buffers = self._launch(
                library, hosts, outputs, output_dtypes, grid, threadgroup, self.seed + schedule
            )
            if first is None:
                first = outputs
                self.last_stats = self._stats(spec, grid, threadgroup, buffers)
                continue
            for name, a, b in zip(self.output_names, first, outputs):
                differ = a.reshape(-1).view(np.uint8) != b.reshape(-1).view(np.uint8)
                index = np.unique(np.flatnonzero(differ) // a.itemsize)
                if index.size:
                    raise EmulatorError(
                        f"[metal_kernel] kernel '{self.name}': output '{name}' depends on the "
                        f"thread schedule (a race, or float atomics in a varying order): "
                        f"{index.size} elements differ between schedule 0 and {schedule}, "
                        f"first at flat index {index[0]}"
                    )
        return [_from_numpy(host, dtype) for host, dtype in zip(first, output_dtypes)]

    def _input_layout(self, array: mx.array) -> tuple[np.ndarray, tuple[int, ...], list[int], str]:
        """(buffer, shape, element strides, type) as a Metal launch would see them."""
        view = _to_numpy(array)
        type_name = type_string(array.dtype, "input")
        storage = _NUMPY_STORAGE[array.dtype]
        itemsize = view.itemsize
        keep_layout = (
            not self.ensure_row_contiguous
            and not view.flags.c_contiguous
            and view.size > 0
            and all(s >= 0 for s in view.strides)
        )
        if not keep_layout:
            host = _aligned_empty(view.shape, storage)
            host[...] = view
            return host, host.shape, [s // itemsize for s in host.strides], type_name
        # ensure_row_contiguous=False: MLX binds the array's own memory with its strides
        # (transposes, broadcasts); the buffer spans exactly the elements the view can reach.
        strides = [s // itemsize for s in view.strides]
        span = 1 + sum((n - 1) * s for n, s in zip(view.shape, strides))
        flat = _aligned_empty((span,), storage)
        flat.view(np.uint8).fill(0xFF)
        np.lib.stride_tricks.as_strided(flat, view.shape, view.strides)[...] = view
        return flat, view.shape, strides, type_name

    @staticmethod
    def _output(shape: tuple[int, ...], dtype: mx.Dtype, init_value: float | None) -> np.ndarray:
        host = _aligned_empty(shape, _NUMPY_STORAGE[dtype])
        if init_value is not None:
            host[...] = _to_numpy(mx.full(shape, init_value, dtype=dtype))
        elif dtype in _FLOATING:
            host.view(np.uint8).fill(0xFF)  # NaN: an element the kernel never writes shows
        elif dtype == mx.bool_:
            host.fill(True)
        else:
            host.view(np.uint8).fill(_INT_POISON)
        return host

    def _launch(
        self,
        library: ctypes.CDLL,
        hosts: list[tuple[np.ndarray, tuple[int, ...], list[int], str]],
        outputs: list[np.ndarray],
        output_dtypes: Sequence[mx.Dtype],
        grid: tuple[int, int, int],
        threadgroup: tuple[int, int, int],
        seed: int,
    ) -> ctypes.Array:
        keep_alive = []
        buffers = (_build.Buffer * (len(hosts) + len(outputs)))()
        for slot, (name, (data, shape, strides, type_name)) in enumerate(
            zip(self.input_names, hosts)
        ):
            _describe(buffers[slot], name, type_name, data, shape, strides, False, keep_alive)
        for offset, (name, host, dtype) in enumerate(
            zip(self.output_names, outputs, output_dtypes)
        ):
            strides = [s // host.itemsize for s in host.strides]
            _describe(
                buffers[len(hosts) + offset],
                name,
                type_string(dtype, name),
                host,
                host.shape,
                strides,
                True,
                keep_alive,
            )
        err = ctypes.create_string_buffer(4096)
        grid_c = (ctypes.c_int64 * 3)(*grid)
        # dispatchThreads(grid, group) with group = min(threadgroup, grid) per axis, as MLX.
        group_c = (ctypes.c_int64 * 3)(*(max(1, min(t, g)) for t, g in zip(threadgroup, grid)))
        with _launch_lock:
            status = library.mlxe_launch(
                buffers, grid_c, group_c, seed, ORDERS.index(thread_order()), self.timeout,
                err, len(err)
            )
        if status != 0:
            raise EmulatorError(f"[metal_kernel] kernel '{self.name}': {err.value.decode()}")
        return buffers

    @staticmethod
    def _stats(
        spec: KernelSpec,
        grid: tuple[int, int, int],
        threadgroup: tuple[int, int, int],
        buffers: ctypes.Array,
    ) -> LaunchStats:
        group = [min(t, g) for t, g in zip(threadgroup, grid)]
        return LaunchStats(
            kernel=spec.kernel_name(),
            grid=grid,
            threadgroup=threadgroup,
            threadgroups=int(np.prod([-(-g // t) if t else 0 for g, t in zip(grid, group)])),
            buffers=tuple(
                BufferTraffic(
                    name=b.name.decode(),
                    role="output" if b.is_output else "input",
                    nbytes=b.nbytes,
                    bytes_read=b.bytes_read,
                    bytes_written=b.bytes_written,
                    scalar=b.ndim == 0 and not b.is_output,
                )
                for b in buffers
            ),
        )


def _describe(
    buffer: _build.Buffer,
    name: str,
    type_name: str,
    data: np.ndarray,
    shape: Sequence[int],
    strides: Sequence[int],
    is_output: bool,
    keep_alive: list,
) -> None:
    shape_c = np.ascontiguousarray(shape, dtype=np.int32)
    strides_c = np.ascontiguousarray(strides, dtype=np.int64)
    name_b = name.encode()
    dtype_b = type_name.encode()
    keep_alive.extend([shape_c, strides_c, name_b, dtype_b])
    buffer.data = data.ctypes.data
    buffer.nbytes = data.nbytes
    buffer.itemsize = data.itemsize
    buffer.name = name_b
    buffer.dtype = dtype_b
    buffer.is_output = int(is_output)
    buffer.ndim = len(shape)
    buffer.shape = shape_c.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
    buffer.strides = strides_c.ctypes.data_as(ctypes.POINTER(ctypes.c_int64))


def metal_kernel(
    name: str,
    input_names: Sequence[str],
    output_names: Sequence[str],
    source: str,
    header: str = "",
    ensure_row_contiguous: bool = True,
    atomic_outputs: bool = False,
    compile_options: dict | None = None,
    *,
    seed: int | None = None,
    schedules: int | None = None,
    timeout: float | None = None,
) -> EmulatedKernel:
    """Drop-in twin of `mx.fast.metal_kernel` that runs the kernel on the CPU.

    The Metal body is compiled as C++ against a shim of Metal's types and functions, with the
    signature MLX generates, and every GPU thread runs as a fiber with real threadgroup-barrier
    and simdgroup semantics. `compile_options` (Metal math mode) is accepted and ignored.
    Emulator-only options (defaults from the environment): `seed` of the thread and
    threadgroup order (MLX_LOCALNORM_EMULATE_SEED, 0); `schedules`, how many differently
    ordered runs must give bitwise-equal outputs (MLX_LOCALNORM_EMULATE_SCHEDULES, 1);
    `timeout` in seconds per launch, 0 for none (MLX_LOCALNORM_EMULATE_TIMEOUT, 300).
    """
    del compile_options
    return EmulatedKernel(
        name,
        input_names,
        output_names,
        source,
        header,
        ensure_row_contiguous,
        atomic_outputs,
        seed=seed,
        schedules=schedules,
        timeout=timeout,
    )
