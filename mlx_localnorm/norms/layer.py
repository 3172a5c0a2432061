"""LayerNorm (arXiv 1607.06450)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..ops._checks import check_dims, check_eps, check_flag, check_input, check_param


def layer_norm(
    x: mx.array, weight: mx.array | None = None, bias: mx.array | None = None, eps: float = 1e-5
) -> mx.array:
    """``y = weight * (x - mean(x)) / sqrt(var(x) + eps) + bias`` via ``mx.fast.layer_norm``."""
    check_input(x, None, "layer_norm")
    check_param(weight, (x.shape[-1],), "weight", "layer_norm")
    check_param(bias, (x.shape[-1],), "bias", "layer_norm")
    check_eps(eps, "layer_norm")
    return mx.fast.layer_norm(x, weight, bias, eps).astype(x.dtype)


class LayerNorm(nn.Module):
    r"""Layer normalization (Ba, Kiros & Hinton, arXiv 1607.06450).

    .. math:: y = \gamma \odot (x - \mu) / \sqrt{\sigma^2 + \epsilon} + \beta

    Args:
        dims: size of the normalized (last) axis.
        eps: added to the variance.
        affine: learn the gain ``weight`` (init 1).
        bias: learn the shift ``bias`` (init 0); only with ``affine``.
    """

    def __init__(self, dims: int, eps: float = 1e-5, affine: bool = True, bias: bool = True):
        super().__init__()
        self.dims = check_dims(dims, "LayerNorm")
        owner = f"LayerNorm(dims={dims})"
        self.eps = check_eps(eps, owner)
        check_flag(bias, "bias", owner)
        if check_flag(affine, "affine", owner):
            self.weight = mx.ones((dims,))
            if bias:
                self.bias = mx.zeros((dims,))

    def _extra_repr(self) -> str:
        return f"{self.dims}, eps={self.eps}, affine={'weight' in self}, bias={'bias' in self}"

    def __call__(self, x: mx.array) -> mx.array:
        check_input(x, self.dims, f"LayerNorm(dims={self.dims})")
        return layer_norm(x, self.get("weight"), self.get("bias"), self.eps)
