"""Uniform averaging of the parameters over the last updates (SWA, arXiv 1803.05407; for
low-precision training SWALP, arXiv 1904.11943)."""

from __future__ import annotations

import mlx.core as mx
from mlx.optimizers import Optimizer
from mlx.utils import tree_map

from ._wrapper import Wrapper


class Averaged(Wrapper):
    """Wrap ``optimizer`` and keep, beside its updates, the mean of the parameters it
    returns after updates ``start, start + 1, ..., t`` (counted from 1):

        avg_t = avg_{t-1} + (w_t - avg_{t-1}) / max(t - start + 1, 1)

    so before ``start`` the average is the latest parameters themselves. The training run
    uses the wrapped optimizer's parameters; :meth:`averaged` gives the mean to evaluate or
    export. The mean is kept in float32 whatever the parameters' dtype. Its state (the
    update count and the mean) sits beside the wrapped optimizer's, so checkpoints resume
    it exactly, and the update is pure on arrays, so it runs inside ``mx.compile``.
    """

    def __init__(self, optimizer: Optimizer, start: int = 1):
        super().__init__(optimizer)
        if isinstance(start, bool) or not isinstance(start, int) or start < 1:
            raise ValueError(f"Averaged: start must be an int >= 1, got {start!r}")
        self.start = start
        self._averaging = {}

    def init(self, parameters: dict):
        self.optimizer.init(parameters)
        self._averaging.update(
            count=mx.array(0, mx.int32),
            mean=tree_map(lambda p: p.astype(mx.float32), parameters))

    def apply_gradients(self, gradients: dict, parameters: dict):
        if not self._averaging:  # the parameters being trained: those with a gradient
            self.init(tree_map(lambda _, p: p, gradients, parameters))
        updated = self.optimizer.apply_gradients(gradients, parameters)
        count = self._averaging["count"] + 1
        weight = 1.0 / mx.maximum(count - self.start + 1, 1).astype(mx.float32)
        _blend(self._averaging["mean"], updated, weight)
        self._averaging["count"] = count
        return updated

    def averaged(self, parameters: dict) -> dict:
        """The mean of each of ``parameters`` (a tree of trained parameters, e.g.
        ``model.trainable_parameters()``), in that parameter's dtype."""
        if not self._averaging:
            raise ValueError("Averaged: nothing averaged yet; call init or update first")
        # over the mean's tree: a restored one lacks the empty containers (e.g. a RoPE's {})
        return tree_map(lambda mean, p: mean.astype(p.dtype), self._averaging["mean"],
                        parameters)

    @property
    def state(self):
        return {"optimizer": self.optimizer.state, "averaging": self._averaging}

    @state.setter
    def state(self, state: dict):
        if set(state) != {"optimizer", "averaging"}:
            raise ValueError("Averaged: state must have the keys 'optimizer' and 'averaging', "
                             f"got {sorted(state)}")
        self.optimizer.state = state["optimizer"]
        self._averaging.clear()  # in place: a compiled step holds this dict
        self._averaging.update(state["averaging"])


def _blend(mean, updated, weight: mx.array) -> None:
    """``mean <- mean + weight * (updated - mean)`` leaf by leaf, in place: ``mx.compile``
    tracks the state tree's own containers."""
    items = updated.items() if isinstance(updated, dict) else enumerate(updated)
    for key, value in items:
        if isinstance(value, mx.array):
            mean[key] = mean[key] + weight * (value.astype(mx.float32) - mean[key])
        elif value:  # a restored mean lacks the empty containers
            _blend(mean[key], value, weight)
