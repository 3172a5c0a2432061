"""mlx_localnorm: local normalization for MLX (norms, placements, optimizers, Metal kernels)."""

# Must run before anything imports mlx.core: it swaps MLX's CPU BLAS on Linux.
from . import _fast_blas

_fast_blas.enable()

from . import constraints, convert, data, emulate, kernels, optim, quant, rl  # noqa: E402
from ._version import __version__  # noqa: E402
from .models import Model, ModelArgs, save_model, swap_norms  # noqa: E402
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
from .placements import PLACEMENTS  # noqa: E402

__all__ = [
    "NORMS",
    "PLACEMENTS",
    "Model",
    "ModelArgs",
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
    "constraints",
    "convert",
    "data",
    "emulate",
    "kernels",
    "make_norm",
    "optim",
    "quant",
    "rl",
    "save_model",
    "swap_norms",
]
