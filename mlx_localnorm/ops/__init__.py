"""The ops twins: the norms that have fused kernels, as pure functions of plain MLX ops.

They sit below both :mod:`mlx_localnorm.kernels` (which falls back to them and differentiates
them for second derivatives) and :mod:`mlx_localnorm.norms` (whose modules call the kernels),
so imports run one way: ops -> kernels -> norms. ``ln.norms`` re-exports them.
"""

from .norm_add_norm import norm_add_norm
from .patch import patch_divisor, patch_sum_squares, patchnorm, window_sum
from .rms import rms_norm
from .seed import DOT_SCALES, seednorm

__all__ = [
    "DOT_SCALES",
    "norm_add_norm",
    "patch_divisor",
    "patch_sum_squares",
    "patchnorm",
    "rms_norm",
    "seednorm",
    "window_sum",
]
