"""Scion: steepest descent under a per-layer norm via its linear minimization oracle (arXiv
2502.07529)."""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
from mlx.optimizers import Optimizer

from ._cast import as_dtype
from ._checks import (
    check_choice,
    check_float_dtype,
    check_learning_rate,
    check_matrix,
    check_positive,
    check_steps,
    check_unit_interval,
)
from .orth import ORTH_METHODS, orthogonalize

SCION_NORMS = ("spectral", "colnorm", "sign")


class Scion(Optimizer):
    r"""Scion (Pethick et al., arXiv 2502.07529), one norm per instance (one instance per
    parameter group inside a ``MultiOptimizer``, see ``make_optimizer("scion", ...)``).

    .. math::
        d = \beta d + (1-\beta) g,\qquad
        W = (1-\eta) W + \eta\,\mathrm{lmo}(d) \text{ (constrained) or } W + \eta\,\mathrm{lmo}(d)

    The paper's averaging weight is ``a = 1 - beta``. Oracles for a weight of shape
    ``(m, n) = shape[-2:]``:

    - "spectral" (hidden matrices): ``-rho sqrt(m/n) orth(d)``;
    - "colnorm" (embeddings): ``-rho sqrt(D) d_j / ||d_j||`` for each token vector ``d_j``.
      The paper's column of the map vocab -> D is a stored row of an MLX ``Embedding`` weight
      ``(vocab, D)``, so the norm runs over the last axis (``D = n``);
    - "sign" (output head): ``-(rho / n) sign(d)``.

    Args:
        learning_rate: ``eta`` (number or schedule). Default 0.02 (**Decision**, untuned).
        norm: one of "spectral", "colnorm", "sign".
        rho: radius of the norm ball. Default 1.
        momentum: ``beta`` in [0, 1). Default 0.9 (the paper's ``a = 0.1``).
        constrained: the constrained form ``(1-eta) W + eta lmo(d)``. Default False.
        ns_steps, method, ortho_dtype: orthogonalization of "spectral", as in ``Muon``.
    """

    def __init__(
        self,
        learning_rate: float | Callable[[mx.array], mx.array] = 0.02,
        norm: str = "spectral",
        rho: float = 1.0,
        momentum: float = 0.9,
        constrained: bool = False,
        ns_steps: int = 5,
        method: str = "newton_schulz",
        ortho_dtype: mx.Dtype = mx.float32,
    ):
        super().__init__()
        self._maybe_schedule("learning_rate", check_learning_rate(learning_rate, "Scion"))
        self.norm = check_choice(norm, SCION_NORMS, "norm", "Scion")
        self.rho = check_positive(rho, "rho", "Scion")
        self.momentum = check_unit_interval(momentum, "momentum", "Scion")
        self.constrained = bool(constrained)
        self.ns_steps = check_steps(ns_steps, "Scion")
        self.method = check_choice(method, ORTH_METHODS, "method", "Scion")
        self.ortho_dtype = check_float_dtype(ortho_dtype, "ortho_dtype", "Scion")

    def init_single(self, parameter: mx.array, state: dict):
        check_matrix(parameter, f"Scion(norm={self.norm!r})")
        state["d"] = mx.zeros(parameter.shape, mx.float32)

    def lmo(self, d: mx.array) -> mx.array:
        """The linear minimization oracle of the ``rho``-ball of this instance's norm."""
        m, n = d.shape[-2], d.shape[-1]
        if self.norm == "spectral":
            o = orthogonalize(d, self.method, self.ns_steps, self.ortho_dtype)
            return -self.rho * (m / n) ** 0.5 * o
        if self.norm == "colnorm":
            norm = mx.sqrt(mx.sum(d * d, axis=-1, keepdims=True))
            return -self.rho * n**0.5 * d / (norm + 1e-8)
        return -(self.rho / n) * mx.sign(d)

    def apply_single(self, gradient: mx.array, parameter: mx.array, state: dict):
        d = self.momentum * state["d"] + (1 - self.momentum) * as_dtype(gradient, mx.float32)
        state["d"] = d
        lr = as_dtype(self.learning_rate, mx.float32)
        w = as_dtype(parameter, mx.float32)
        if self.constrained:
            w = (1 - lr) * w
        return as_dtype(w + lr * self.lmo(d), parameter.dtype)
