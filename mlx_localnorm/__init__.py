"""mlx_localnorm: local normalization for MLX (norms, placements, optimizers, Metal kernels)."""

# Must run before anything imports mlx.core: it swaps MLX's CPU BLAS on Linux.
from . import _fast_blas

_fast_blas.enable()

from ._version import __version__  # noqa: E402
from .norms import (  # noqa: E402
    NORMS,
    ApproxNorm,
    DyT,
    L2Norm,
    LayerNorm,
    PatchNorm,
    PatchNormConv1d,
    PatchNormConv2d,
    PatchNormLinear,
    QKNorm,
    RMSNorm,
    SeeDNorm,
    make_norm,
)

__all__ = [
    "NORMS",
    "ApproxNorm",
    "DyT",
    "L2Norm",
    "LayerNorm",
    "PatchNorm",
    "PatchNormConv1d",
    "PatchNormConv2d",
    "PatchNormLinear",
    "QKNorm",
    "RMSNorm",
    "SeeDNorm",
    "__version__",
    "make_norm",
]
