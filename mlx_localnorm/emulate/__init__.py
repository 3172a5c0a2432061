"""Run custom Metal kernels on the CPU: a drop-in twin of `mx.fast.metal_kernel`.

kernel = mlx_localnorm.emulate.metal_kernel(name, input_names, output_names, source)
(out,) = kernel(inputs=[x], output_shapes=[x.shape], output_dtypes=[x.dtype],
                grid=(x.size, 1, 1), threadgroup=(256, 1, 1))
kernel.last_stats.bytes_read, kernel.last_stats.bytes_written
"""

from ._build import KernelCompileError
from .kernel import (
    BufferTraffic,
    EmulatedKernel,
    EmulatorError,
    LaunchStats,
    metal_kernel,
    pipeline_thread_limit,
)

__all__ = [
    "BufferTraffic",
    "EmulatedKernel",
    "EmulatorError",
    "KernelCompileError",
    "LaunchStats",
    "metal_kernel",
    "pipeline_thread_limit",
]
