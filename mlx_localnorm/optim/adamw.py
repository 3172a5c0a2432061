"""AdamW with float32 moments, for the non-matrix groups of half-precision models."""

from __future__ import annotations

import mlx.core as mx
import mlx.optimizers as optim

from ._cast import as_dtype


class AdamW(optim.AdamW):
    r"""MLX's AdamW (decoupled weight decay, arXiv 1711.05101) computed in float32.

    .. math::
        W = W (1 - \eta\lambda) - \eta \frac{\hat m}{\sqrt{\hat v} + \epsilon}

    MLX keeps ``m``, ``v`` and ``eps`` in the parameter's dtype: in float16, ``eps = 1e-8``
    and small ``g^2`` underflow to 0, so a zero gradient entry gives ``0/0 = NaN``. Here the
    moments are float32 and the weight is rounded to its dtype once per step. Arguments as
    ``mlx.optimizers.AdamW``.
    """

    def init_single(self, parameter: mx.array, state: dict):
        state["m"] = mx.zeros(parameter.shape, mx.float32)
        state["v"] = mx.zeros(parameter.shape, mx.float32)

    def apply_single(self, gradient: mx.array, parameter: mx.array, state: dict):
        w = as_dtype(parameter, mx.float32)
        updated = super().apply_single(as_dtype(gradient, mx.float32), w, state)
        return as_dtype(updated, parameter.dtype)
