"""SeeDNorm: self-rescaled dynamic normalization (arXiv 2510.22777)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..kernels import BACKENDS
from ..kernels import seednorm as fused_seednorm
from ..ops._checks import (
    check_choice,
    check_dims,
    check_eps,
    check_flag,
    check_heads,
    check_input,
    check_number,
)
from ..ops.seed import DOT_SCALES


def frozen(module: nn.Module, names: tuple[str, ...]) -> bool:
    """True when every parameter in ``names`` is frozen (LoRA, QAT): kernels skip their grads."""
    return set(names) <= set(module._no_grad)


class SeeDNorm(nn.Module):
    r"""Self-rescaled dynamic normalization (Cai et al., arXiv 2510.22777).

    .. math:: y = (\gamma + \alpha \tanh(\langle x, \beta \rangle)) \odot x / \mathrm{RMS}(x)

    The scalar ``tanh(<x, beta>)`` is taken from the raw input, so the output keeps
    information about the input norm that RMSNorm discards. Initialised with ``gamma = 1``,
    ``alpha = alpha_init`` (1) and ``beta ~ N(0, beta_init_std^2)`` (0), it equals RMSNorm at
    step 0 while ``beta`` still receives gradient. With ``num_heads = h`` the row is split
    into ``h`` slices, each with its own ``tanh(<x_k, beta_k>)``; the RMS stays over the whole
    row unless ``head_rms=True``.

    Args:
        dims: size of the normalized (last) axis.
        eps: added to the mean square.
        num_heads: number of slices with their own dynamic scale; must divide ``dims``.
        dot_scale: ``"none"`` or ``"rsqrt_d"`` (multiply ``<x, beta>`` by ``1/sqrt(D/h)``).
        head_rms: normalize each head by its own RMS instead of the row's.
        alpha_init: initial value of ``alpha``.
        beta_init_std: standard deviation of the initial ``beta``.
        backend: ``"auto"`` (the fused Metal kernel on a Mac, these ops elsewhere),
            ``"metal"``, ``"ops"`` or ``"emulate"``; see :func:`mlx_localnorm.kernels.seednorm`.
    """

    def __init__(
        self,
        dims: int,
        eps: float = 1e-6,
        num_heads: int = 1,
        dot_scale: str = "none",
        head_rms: bool = False,
        alpha_init: float = 1.0,
        beta_init_std: float = 0.0,
        backend: str = "auto",
    ):
        super().__init__()
        owner = f"SeeDNorm(dims={dims})"
        self.dims = check_dims(dims, "SeeDNorm")
        self.eps = check_eps(eps, owner)
        self.num_heads = check_heads(num_heads, dims, owner)
        self.dot_scale = check_choice(dot_scale, DOT_SCALES, "dot_scale", owner)
        self.head_rms = check_flag(head_rms, "head_rms", owner)
        self.backend = check_choice(backend, BACKENDS, "backend", owner)
        alpha_init = check_number(alpha_init, "alpha_init", owner)
        beta_init_std = check_number(beta_init_std, "beta_init_std", owner, "non_negative")
        self.weight = mx.ones((dims,))
        self.alpha = mx.full((dims,), alpha_init)
        self.beta = (beta_init_std * mx.random.normal((dims,)) if beta_init_std
                     else mx.zeros((dims,)))

    def _extra_repr(self) -> str:
        return f"{self.dims}, eps={self.eps}, num_heads={self.num_heads}"

    def __call__(self, x: mx.array) -> mx.array:
        check_input(x, self.dims, f"SeeDNorm(dims={self.dims})")
        return fused_seednorm(
            x, self.weight, self.alpha, self.beta, self.eps, self.num_heads,
            backend=self.backend, dot_scale=self.dot_scale, head_rms=self.head_rms,
            frozen=frozen(self, ("weight", "alpha", "beta")),
        )
