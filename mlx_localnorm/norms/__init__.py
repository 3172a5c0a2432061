"""The norm zoo: each norm is an ``nn.Module`` plus a pure function (the ops twin).

The pure functions of the norms with fused kernels (RMSNorm, SeeDNorm, PatchNorm) live in
:mod:`mlx_localnorm.ops`, below the kernels, and are re-exported here.

All norms act on the last axis, take any leading shape, keep the input dtype and compute
their statistics in float32.

NaN and inf are not masked or reported (checking would cost a pass over the data). For the
norms with row statistics (RMSNorm, LayerNorm, SeeDNorm, PatchNorm, L2Norm) a NaN anywhere in
a row makes the whole output row NaN. A +-inf makes the whole row NaN for LayerNorm and
SeeDNorm; RMSNorm, PatchNorm and L2Norm give NaN at the inf entry and 0 (``x / inf``) at the
others. DyT works elementwise: +-inf maps to ``+-weight + bias``, NaN stays NaN; ApproxNorm
only scales. Check inputs with ``mx.isfinite`` upstream if they may be non-finite.
"""

from ..ops import patchnorm, rms_norm, seednorm
from .approx import ApproxNorm, nu_activation, nu_lerp, nu_linear
from .dyt import DyT, dyt
from .l2 import L2Norm, l2_norm
from .layer import LayerNorm, layer_norm
from .patch import PatchNorm, PatchNormConv1d, PatchNormConv2d, PatchNormLinear
from .qk import QKNorm
from .registry import NORMS, make_norm, norm_options
from .rms import RMSNorm
from .seed import SeeDNorm

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
    "dyt",
    "l2_norm",
    "layer_norm",
    "make_norm",
    "norm_options",
    "nu_activation",
    "nu_lerp",
    "nu_linear",
    "patchnorm",
    "rms_norm",
    "seednorm",
]
