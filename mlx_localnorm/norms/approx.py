"""ApproxNorm: anGPT's constant approximate normalization (arXiv 2505.22014)."""

from __future__ import annotations

import math
from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..ops._checks import check_dims, check_input, check_number

_ACTIVATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "silu": lambda z: z / (1 + np.exp(-z)),
    "gelu": lambda z: 0.5 * z * (1 + np.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3))),
    "relu": lambda z: np.maximum(z, 0),
    "tanh": np.tanh,
}


def nu_linear(d_in: int, d_out: int) -> float:
    """``sqrt(d_in / d_out)``: unit-norm rows applied to a unit-norm input of width d_in."""
    return math.sqrt(d_in / d_out)


def nu_lerp(a: float) -> float:
    """``1 / sqrt((1-a)^2 + a^2)``: for ``h + a (b - h)`` with near-orthogonal unit h, b."""
    return 1.0 / math.sqrt((1 - a) ** 2 + a**2)


def nu_activation(phi: str | Callable[[np.ndarray], np.ndarray], points: int = 101) -> float:
    """``1 / sqrt(E[phi(z)^2])`` for ``z ~ N(0, 1)`` by Gauss-Hermite quadrature (SiLU: 1.68)."""
    if isinstance(phi, str):
        if phi not in _ACTIVATIONS:
            raise ValueError(f"nu_activation: phi must be one of {sorted(_ACTIVATIONS)} or a "
                             f"callable, got {phi!r}")
        phi = _ACTIVATIONS[phi]
    z, w = np.polynomial.hermite_e.hermegauss(points)
    return float(1.0 / math.sqrt(np.sum(w * phi(z) ** 2) / math.sqrt(2 * math.pi)))


class ApproxNorm(nn.Module):
    r"""Constant approximate normalization of anGPT (arXiv 2505.22014).

    .. math:: y = \nu x

    ``nu`` is chosen so that the expected norm of the output is 1 instead of computing the
    norm: :func:`nu_linear`, :func:`nu_lerp` and :func:`nu_activation` give it for the layer
    the norm follows. No parameters, no statistics.

    Args:
        dims: size of the last axis (checked on input).
        nu: the constant factor.
    """

    def __init__(self, dims: int, nu: float = 1.0):
        super().__init__()
        self.dims = check_dims(dims, "ApproxNorm")
        self.nu = check_number(nu, "nu", f"ApproxNorm(dims={dims})", "positive")

    def _extra_repr(self) -> str:
        return f"{self.dims}, nu={self.nu:.6g}"

    def __call__(self, x: mx.array) -> mx.array:
        check_input(x, self.dims, f"ApproxNorm(dims={self.dims})")
        return x * self.nu
