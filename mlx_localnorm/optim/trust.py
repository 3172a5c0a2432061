"""Layer-wise trust-ratio optimizers: LARS (arXiv 1708.03888) and LAMB (arXiv 1904.00962).

Norms are over the whole parameter (one ratio per parameter, any shape); a ratio whose
numerator or denominator norm is 0 is taken as 1.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
from mlx.optimizers import Optimizer

from ._cast import as_dtype
from ._checks import (
    check_betas,
    check_learning_rate,
    check_non_negative,
    check_positive,
    check_unit_interval,
)


def _norm(x: mx.array) -> mx.array:
    return mx.sqrt(mx.sum(x * x))


def _safe_ratio(num: mx.array, den: mx.array) -> mx.array:
    ok = (num > 0) & (den > 0)
    return mx.where(ok, num / mx.where(ok, den, 1), 1)


class LARS(Optimizer):
    r"""LARS: momentum SGD with a layer-wise trust ratio (You et al., arXiv 1708.03888).

    .. math::
        \tau = \eta_t \frac{\lVert w\rVert}{\lVert g\rVert + \lambda\lVert w\rVert},\quad
        v = \mu v + \gamma\,\tau\,(g + \lambda w),\quad w = w - v

    Args:
        learning_rate: global ``gamma`` (number or schedule). Default 1.0.
        momentum: ``mu`` in [0, 1). Default 0.9.
        weight_decay: ``lambda``. Default 0.
        trust_coefficient: ``eta_t``. Default 0.001.
    """

    def __init__(
        self,
        learning_rate: float | Callable[[mx.array], mx.array] = 1.0,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
    ):
        super().__init__()
        self._maybe_schedule("learning_rate", check_learning_rate(learning_rate, "LARS"))
        self.momentum = check_unit_interval(momentum, "momentum", "LARS")
        self.weight_decay = check_non_negative(weight_decay, "weight_decay", "LARS")
        self.trust_coefficient = check_positive(trust_coefficient, "trust_coefficient", "LARS")

    def init_single(self, parameter: mx.array, state: dict):
        state["v"] = mx.zeros(parameter.shape, mx.float32)

    def apply_single(self, gradient: mx.array, parameter: mx.array, state: dict):
        g = as_dtype(gradient, mx.float32)
        w = as_dtype(parameter, mx.float32)
        w_norm = _norm(w)
        trust = self.trust_coefficient * _safe_ratio(w_norm, _norm(g) + self.weight_decay * w_norm)
        lr = as_dtype(self.learning_rate, mx.float32)
        v = self.momentum * state["v"] + lr * trust * (g + self.weight_decay * w)
        state["v"] = v
        return as_dtype(w - v, parameter.dtype)


class LAMB(Optimizer):
    r"""LAMB: Adam direction with a layer-wise trust ratio (You et al., arXiv 1904.00962).

    .. math::
        r = \frac{\hat m}{\sqrt{\hat v} + \epsilon},\quad u = r + \lambda w,\quad
        w = w - \gamma \frac{\lVert w\rVert}{\lVert u\rVert} u

    with bias-corrected moments ``m_hat = m / (1 - b1^t)``, ``v_hat = v / (1 - b2^t)``.

    Args:
        learning_rate: ``gamma`` (number or schedule). Default 1e-3.
        betas: ``(b1, b2)``, each in [0, 1). Default (0.9, 0.999).
        eps: Default 1e-6.
        weight_decay: ``lambda``. Default 0.01.
    """

    def __init__(
        self,
        learning_rate: float | Callable[[mx.array], mx.array] = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
    ):
        super().__init__()
        self._maybe_schedule("learning_rate", check_learning_rate(learning_rate, "LAMB"))
        self.betas = check_betas(betas, "betas", "LAMB")
        self.eps = check_positive(eps, "eps", "LAMB")
        self.weight_decay = check_non_negative(weight_decay, "weight_decay", "LAMB")

    def init_single(self, parameter: mx.array, state: dict):
        state["m"] = mx.zeros(parameter.shape, mx.float32)
        state["v"] = mx.zeros(parameter.shape, mx.float32)

    def apply_single(self, gradient: mx.array, parameter: mx.array, state: dict):
        b1, b2 = self.betas
        g = as_dtype(gradient, mx.float32)
        w = as_dtype(parameter, mx.float32)
        m = b1 * state["m"] + (1 - b1) * g
        v = b2 * state["v"] + (1 - b2) * g * g
        state["m"], state["v"] = m, v
        t = as_dtype(self.step, mx.float32)
        r = (m / (1 - b1**t)) / (mx.sqrt(v / (1 - b2**t)) + self.eps)
        u = r + self.weight_decay * w
        lr = as_dtype(self.learning_rate, mx.float32)
        return as_dtype(w - lr * _safe_ratio(_norm(w), _norm(u)) * u, parameter.dtype)
