"""DyT: dynamic tanh, a statistics-free replacement for normalization (arXiv 2503.10622)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..ops._checks import check_dims, check_flag, check_input, check_number, check_param


def dyt(
    x: mx.array, alpha: mx.array, weight: mx.array | None = None, bias: mx.array | None = None
) -> mx.array:
    """``y = weight * tanh(alpha * x) + bias``, computed in float32, returned in x's dtype."""
    check_input(x, None, "dyt")
    check_param(alpha, None, "alpha", "dyt", optional=False)
    check_param(weight, (x.shape[-1],), "weight", "dyt")
    check_param(bias, (x.shape[-1],), "bias", "dyt")
    y = mx.tanh(alpha.astype(mx.float32) * x.astype(mx.float32))
    if weight is not None:
        y = weight * y
    if bias is not None:
        y = y + bias
    return y.astype(x.dtype)


class DyT(nn.Module):
    r"""Dynamic tanh (Zhu et al., "Transformers without Normalization", arXiv 2503.10622).

    .. math:: y = \gamma \odot \tanh(\alpha x) + \beta

    ``alpha`` is one learnable scalar per layer (shape ``(1,)``); ``gamma`` (``weight``) starts
    at 1 and ``beta`` (``bias``) at 0. The paper's LLM setting wants a larger ``alpha_init``
    for the norm before attention than for the others (width 4096: 0.8 vs 0.2).

    Args:
        dims: size of the last axis.
        alpha_init: initial ``alpha`` (0.5 in the paper's non-LLM default).
        bias: learn the shift ``bias``.
    """

    def __init__(self, dims: int, alpha_init: float = 0.5, bias: bool = True):
        super().__init__()
        self.dims = check_dims(dims, "DyT")
        owner = f"DyT(dims={dims})"
        self.alpha = mx.array([check_number(alpha_init, "alpha_init", owner)])
        self.weight = mx.ones((dims,))
        if check_flag(bias, "bias", owner):
            self.bias = mx.zeros((dims,))

    def _extra_repr(self) -> str:
        return f"{self.dims}, bias={'bias' in self}"

    def __call__(self, x: mx.array) -> mx.array:
        check_input(x, self.dims, f"DyT(dims={self.dims})")
        return dyt(x, self.alpha, self.weight, self.get("bias"))
