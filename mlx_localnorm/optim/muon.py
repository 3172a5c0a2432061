"""Muon (KellerJordan/Muon) and NorMuon (arXiv 2510.05491): orthogonalized momentum for
hidden-layer matrices."""

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
    check_non_negative,
    check_positive,
    check_steps,
    check_unit_interval,
)
from .orth import ORTH_METHODS, orthogonalize

LR_SCALES = ("spectral", "adamw_rms")


def lr_scale_factor(lr_scale: str, shape: tuple) -> float:
    """``sqrt(max(1, m/n))`` ("spectral") or ``0.2 sqrt(max(m, n))`` ("adamw_rms", arXiv
    2502.16982: the update RMS of AdamW) for a matrix of ``(m, n) = shape[-2:]``."""
    m, n = shape[-2], shape[-1]
    if lr_scale == "spectral":
        return max(1.0, m / n) ** 0.5
    return 0.2 * max(m, n) ** 0.5


class Muon(Optimizer):
    r"""Muon: momentum, then orthogonalization (KellerJordan/Muon; Polar Express arXiv
    2505.16932).

    .. math::
        M = \beta M + (1-\beta) G,\quad U = (1-\beta) G + \beta M \text{ (Nesterov) or } M,\\
        W = W (1 - \eta\lambda) - \eta\, s(m, n)\, \mathrm{orth}(U)

    Momentum is kept in float32; ``orth`` iterates in ``ortho_dtype`` over the last two axes,
    so 3-D stacks (experts, heads) are orthogonalized per matrix. Weight decay is decoupled;
    ``cautious=True`` decays only where the update actually applied agrees in sign with the
    weight, ``O * W >= 0`` with ``O = s(m, n) orth(U)`` (cautious weight decay, arXiv
    2510.12402, as modded-nanogpt; NorMuon: its normalized ``O``).

    Args:
        learning_rate: ``eta`` (number or schedule). Default 0.02.
        momentum: ``beta`` in [0, 1). Default 0.95.
        nesterov: use the Nesterov direction. Default True.
        ns_steps: orthogonalization steps. Default 5.
        method: "newton_schulz" or "polar_express".
        ortho_dtype: dtype of the iteration (float32 or bfloat16). Default float32, the
            fast one on a CPU; bfloat16 is the reference choice on a GPU.
        weight_decay: ``lambda``, decoupled. Default 0.
        cautious: cautious weight decay (mask ``O * W >= 0``). Default False.
        lr_scale: "spectral" ``sqrt(max(1, m/n))`` or "adamw_rms" ``0.2 sqrt(max(m, n))``.
    """

    def __init__(
        self,
        learning_rate: float | Callable[[mx.array], mx.array] = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        method: str = "newton_schulz",
        ortho_dtype: mx.Dtype = mx.float32,
        weight_decay: float = 0.0,
        cautious: bool = False,
        lr_scale: str = "spectral",
    ):
        super().__init__()
        name = type(self).__name__
        self._maybe_schedule("learning_rate", check_learning_rate(learning_rate, name))
        self.momentum = check_unit_interval(momentum, "momentum", name)
        self.nesterov = bool(nesterov)
        self.ns_steps = check_steps(ns_steps, name)
        self.method = check_choice(method, ORTH_METHODS, "method", name)
        self.ortho_dtype = check_float_dtype(ortho_dtype, "ortho_dtype", name)
        self.weight_decay = check_non_negative(weight_decay, "weight_decay", name)
        self.cautious = bool(cautious)
        self.lr_scale = check_choice(lr_scale, LR_SCALES, "lr_scale", name)

    def init_single(self, parameter: mx.array, state: dict):
        check_matrix(parameter, type(self).__name__)
        state["m"] = mx.zeros(parameter.shape, mx.float32)

    def direction(self, u: mx.array, state: dict) -> mx.array:
        """The step direction from the momentum direction ``u`` (float32)."""
        return orthogonalize(u, self.method, self.ns_steps, self.ortho_dtype)

    def apply_single(self, gradient: mx.array, parameter: mx.array, state: dict):
        b = self.momentum
        g = as_dtype(gradient, mx.float32)
        m = b * state["m"] + (1 - b) * g
        state["m"] = m
        u = (1 - b) * g + b * m if self.nesterov else m
        step = lr_scale_factor(self.lr_scale, parameter.shape) * self.direction(u, state)
        lr = as_dtype(self.learning_rate, mx.float32)
        w = as_dtype(parameter, mx.float32)
        if self.weight_decay:
            decay = lr * self.weight_decay
            if self.cautious:
                decay = decay * (step * w >= 0)
            w = w * (1 - decay)
        return as_dtype(w - lr * step, parameter.dtype)


class NorMuon(Muon):
    r"""NorMuon: Muon with a per-neuron second moment after orthogonalization (arXiv
    2510.05491).

    .. math::
        O = \mathrm{orth}(U),\quad v = \beta_2 v + (1-\beta_2)\,\mathrm{mean}_{cols}(O^2),\quad
        \hat O = \frac{O}{\sqrt{v} + \epsilon}\cdot\frac{\lVert O\rVert_F}{\lVert O/(\sqrt{v}+\epsilon)\rVert_F}

    ``v`` has one entry per output neuron (row); the rescaling keeps ``||O||_F``, so the
    learning-rate scales of Muon carry over. Other arguments as :class:`Muon`.

    Args:
        beta2: decay of ``v`` in [0, 1). Default 0.95.
        eps: added to ``sqrt(v)``. Default 1e-8.
    """

    def __init__(
        self,
        learning_rate: float | Callable[[mx.array], mx.array] = 0.02,
        momentum: float = 0.95,
        beta2: float = 0.95,
        eps: float = 1e-8,
        **muon_options,
    ):
        super().__init__(learning_rate, momentum, **muon_options)
        self.beta2 = check_unit_interval(beta2, "beta2", "NorMuon")
        self.eps = check_positive(eps, "eps", "NorMuon")

    def init_single(self, parameter: mx.array, state: dict):
        super().init_single(parameter, state)
        state["v"] = mx.zeros((*parameter.shape[:-1], 1), mx.float32)

    def direction(self, u: mx.array, state: dict) -> mx.array:
        o = super().direction(u, state)
        v = self.beta2 * state["v"] + (1 - self.beta2) * mx.mean(o * o, axis=-1, keepdims=True)
        state["v"] = v
        normed = o / (mx.sqrt(v) + self.eps)
        fro = mx.sqrt(mx.sum(o * o, axis=(-2, -1), keepdims=True))
        fro_normed = mx.sqrt(mx.sum(normed * normed, axis=(-2, -1), keepdims=True))
        return normed * (fro / (fro_normed + self.eps))
