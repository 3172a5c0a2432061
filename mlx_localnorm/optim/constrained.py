"""Weight constraints applied after every optimizer update (nGPT arXiv 2410.01131, anGPT
arXiv 2505.22014)."""

from __future__ import annotations

from mlx.optimizers import Optimizer

from ..constraints import CONSTRAINT_MODES, project_tree
from ._wrapper import Wrapper


class Constrained(Wrapper):
    """Wrap ``optimizer`` so every update is followed by the residual-axis projection of
    :mod:`mlx_localnorm.constraints`:

        W <- P(W - step),  P(w) = w / max(||w||, eps) ("normalize") or w / max(1, ||w||)
        ("constrain"), along each weight's residual-stream axis.

    State, learning rate and initialization are the wrapped optimizer's, so checkpoints and
    schedules work unchanged. Projection is pure on arrays, so it runs inside ``mx.compile``.
    """

    def __init__(self, optimizer: Optimizer, mode: str = "normalize", eps: float = 1e-6):
        super().__init__(optimizer)
        if mode not in CONSTRAINT_MODES:
            raise ValueError(f"Constrained: mode must be one of {CONSTRAINT_MODES}, got {mode!r}")
        self.mode = mode
        self.eps = eps

    def init(self, parameters: dict):
        self.optimizer.init(parameters)

    def apply_gradients(self, gradients: dict, parameters: dict):
        updated = self.optimizer.apply_gradients(gradients, parameters)
        return project_tree(updated, self.mode, self.eps)

    @property
    def state(self):
        return self.optimizer.state

    @state.setter
    def state(self, state: dict):
        self.optimizer.state = state
