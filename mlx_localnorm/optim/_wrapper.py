"""The base of the optimizers that wrap another (:class:`Constrained`, :class:`Averaged`)."""

from __future__ import annotations

import mlx.core as mx
from mlx.optimizers import Optimizer


class Wrapper(Optimizer):
    """An optimizer around ``optimizer``, whose learning rate (and schedule) it shares."""

    # The base __init__ is not called: the learning rate lives in the wrapped optimizer.
    def __init__(self, optimizer: Optimizer):
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"{type(self).__name__}: optimizer must be an "
                            f"mlx.optimizers.Optimizer, got {type(optimizer).__name__}")
        self.optimizer = optimizer

    @property
    def learning_rate(self):
        return self.optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate: float | mx.array):
        self.optimizer.learning_rate = learning_rate
