"""The RMSNorm ops twin (arXiv 1910.07467): ``mx.fast.rms_norm`` with the package's checks."""

from __future__ import annotations

import mlx.core as mx

from ._checks import check_eps, check_input, check_param


def rms_norm(x: mx.array, weight: mx.array | None = None, eps: float = 1e-6) -> mx.array:
    """``y = weight * x / sqrt(mean(x^2) + eps)`` over the last axis, via ``mx.fast.rms_norm``."""
    check_input(x, None, "rms_norm")
    check_param(weight, (x.shape[-1],), "weight", "rms_norm")
    check_eps(eps, "rms_norm")
    # mx.fast.rms_norm promotes to the wider of x and weight; the output keeps x's dtype.
    return mx.fast.rms_norm(x, weight, eps).astype(x.dtype)
