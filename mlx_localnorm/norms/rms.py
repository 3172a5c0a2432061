"""RMSNorm (arXiv 1910.07467), with the zero-centred gain of Gemma / Qwen3-Next as an option."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..ops._checks import check_dims, check_eps, check_flag, check_input
from ..ops.rms import rms_norm


class RMSNorm(nn.Module):
    r"""Root-mean-square normalization (Zhang & Sennrich, arXiv 1910.07467).

    .. math:: y = \gamma \odot x / \sqrt{\mathrm{mean}(x^2) + \epsilon}

    With ``zero_centered=True`` the stored gain is ``gamma - 1`` (init 0), so the layer
    computes ``(1 + weight) * x / RMS(x)`` and weight decay pulls the gain to 1 (Gemma).

    Args:
        dims: size of the normalized (last) axis.
        eps: added to the mean square.
        zero_centered: store the gain as an offset from 1.
    """

    def __init__(self, dims: int, eps: float = 1e-6, zero_centered: bool = False):
        super().__init__()
        self.dims = check_dims(dims, "RMSNorm")
        self.eps = check_eps(eps, f"RMSNorm(dims={dims})")
        self.zero_centered = check_flag(zero_centered, "zero_centered", f"RMSNorm(dims={dims})")
        self.weight = mx.zeros((dims,)) if zero_centered else mx.ones((dims,))

    def _extra_repr(self) -> str:
        return f"{self.dims}, eps={self.eps}, zero_centered={self.zero_centered}"

    def __call__(self, x: mx.array) -> mx.array:
        check_input(x, self.dims, f"RMSNorm(dims={self.dims})")
        weight = 1 + self.weight if self.zero_centered else self.weight
        return rms_norm(x, weight, self.eps)
