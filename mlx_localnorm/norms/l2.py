"""L2Norm: projection onto the unit hypersphere, as in nGPT (arXiv 2410.01131)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..ops._checks import check_dims, check_eps, check_flag, check_input, check_param


def l2_norm(x: mx.array, weight: mx.array | None = None, eps: float = 1e-6) -> mx.array:
    """``y = weight * x / max(||x||, eps)`` over the last axis, in float32."""
    check_input(x, None, "l2_norm")
    check_param(weight, (x.shape[-1],), "weight", "l2_norm")
    check_eps(eps, "l2_norm")
    xf = x.astype(mx.float32)
    norm = mx.sqrt(mx.sum(xf * xf, axis=-1, keepdims=True))
    y = xf / mx.maximum(norm, eps)
    if weight is not None:
        y = weight * y
    return y.astype(x.dtype)


class L2Norm(nn.Module):
    r"""Unit-norm projection of nGPT (Loshchilov et al., arXiv 2410.01131).

    .. math:: y = s \odot x / \max(\lVert x \rVert_2, \epsilon)

    Args:
        dims: size of the normalized (last) axis.
        eps: lower bound on the norm (zero rows stay zero).
        scale: learn a scale vector ``weight`` (init 1); off by default, so outputs are unit norm.
    """

    def __init__(self, dims: int, eps: float = 1e-6, scale: bool = False):
        super().__init__()
        self.dims = check_dims(dims, "L2Norm")
        self.eps = check_eps(eps, f"L2Norm(dims={dims})")
        if check_flag(scale, "scale", f"L2Norm(dims={dims})"):
            self.weight = mx.ones((dims,))

    def _extra_repr(self) -> str:
        return f"{self.dims}, eps={self.eps}, scale={'weight' in self}"

    def __call__(self, x: mx.array) -> mx.array:
        check_input(x, self.dims, f"L2Norm(dims={self.dims})")
        return l2_norm(x, self.get("weight"), self.eps)
