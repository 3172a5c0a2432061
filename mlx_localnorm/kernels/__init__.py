"""Fused Metal kernels for SeeDNorm, PatchNorm, RMSNorm and Peri-LN norm-add-norm, with custom
VJPs.

Each function takes ``backend="auto" | "metal" | "ops" | "emulate"``: Metal on a Mac, the plain
MLX ops twin elsewhere, or the same Metal source run on the CPU by :mod:`mlx_localnorm.emulate`.
``MLX_LOCALNORM_BACKEND`` overrides the choice for a whole run.
"""

from ._launch import BACKEND_ENV, BACKENDS, record_traffic, resolve_backend
from .norm_add_norm import norm_add_norm
from .patchnorm import patchnorm
from .seednorm import rms_norm, seednorm

__all__ = [
    "BACKENDS",
    "BACKEND_ENV",
    "norm_add_norm",
    "patchnorm",
    "record_traffic",
    "resolve_backend",
    "rms_norm",
    "seednorm",
]
