"""Weight constraints of nGPT (arXiv 2410.01131) and anGPT (arXiv 2505.22014).

Both keep every weight that reads from or writes to the residual stream on (or inside) the
unit sphere along its residual-stream axis ``D``, projected after every optimizer step:

    "normalize" (nGPT):  w <- w / max(||w||, eps)
    "constrain" (anGPT): w <- w / max(1, ||w||)

The norm is taken along ``residual_axis(path, shape)``, found from mlx-lm parameter names:

    embed_tokens, lm_head                       (vocab, D)     each row      -> axis -1
    q_proj, k_proj, v_proj, gate_proj, up_proj  (out, in=D)    over in       -> axis -1
    o_proj, down_proj                           (out=D, in)    over out      -> axis -2
    anything else (norm gains, biases, scalars, routers)                     -> None

Axes are negative so stacked expert weights ``(experts, out, in)`` (mlx-lm ``SwitchLinear``)
are projected per matrix with the same rule. Only mlx is imported.
"""

from __future__ import annotations

import mlx.core as mx
from mlx import nn
from mlx.utils import tree_flatten, tree_unflatten

CONSTRAINT_MODES = ("normalize", "constrain")

# Name of the module owning the weight -> the weight's residual-stream axis.
_RESIDUAL_AXIS = {
    "embed_tokens": -1,
    "lm_head": -1,
    "q_proj": -1,
    "k_proj": -1,
    "v_proj": -1,
    "gate_proj": -1,
    "up_proj": -1,
    "o_proj": -2,
    "down_proj": -2,
}


def residual_axis(path: str, shape: tuple) -> int | None:
    """The axis of weight ``path`` (an mlx-lm dotted name) that spans the residual stream.

    Returns -1 (each row is a unit vector: embeddings, head, input projections), -2 (each
    column: output projections ``o_proj``, ``down_proj``) or None (not constrained). Only
    ``<module>.weight`` with 2 or 3 axes (3: stacked experts) can have an axis.
    """
    if not isinstance(path, str):
        raise TypeError(f"residual_axis: path must be a str, got {type(path).__name__}")
    parts = path.split(".")
    if len(parts) < 2 or parts[-1] != "weight" or len(shape) not in (2, 3):
        return None
    return _RESIDUAL_AXIS.get(parts[-2])


def project(w: mx.array, axis: int, mode: str = "normalize", eps: float = 1e-6) -> mx.array:
    """Project ``w`` along ``axis``: ``w / max(||w||, eps)`` ("normalize") or
    ``w / max(1, ||w||)`` ("constrain"); float32 math, ``w.dtype`` kept."""
    _check_mode(mode, "project")
    _check_eps(eps, "project")
    if not mx.issubdtype(w.dtype, mx.floating):
        raise TypeError(f"project: w must be a floating array, got dtype {w.dtype}")
    wf = w.astype(mx.float32)
    norm = mx.sqrt(mx.sum(wf * wf, axis=axis, keepdims=True))
    floor = eps if mode == "normalize" else 1.0
    return (wf / mx.maximum(norm, floor)).astype(w.dtype)


def project_tree(params: dict, mode: str = "normalize", eps: float = 1e-6) -> dict:
    """Functional form for compiled steps: the tree with every residual weight projected.

    Entries without a residual axis are returned unchanged (the same arrays).
    """
    _check_mode(mode, "project_tree")
    _check_eps(eps, "project_tree")
    flat = []
    for path, w in tree_flatten(params):
        axis = residual_axis(path, w.shape)
        flat.append((path, w if axis is None else project(w, axis, mode, eps)))
    return tree_unflatten(flat)


def project_weights(model: nn.Module, mode: str = "normalize", eps: float = 1e-6) -> None:
    """In place: project every trainable residual weight of ``model`` (see ``project``)."""
    _check_mode(mode, "project_weights")
    _check_eps(eps, "project_weights")
    projected = [
        (path, project(w, axis, mode, eps))
        for path, w in tree_flatten(model.trainable_parameters())
        if (axis := residual_axis(path, w.shape)) is not None
    ]
    if projected:
        model.update(tree_unflatten(projected))


def _check_mode(mode, owner: str) -> None:
    if mode not in CONSTRAINT_MODES:
        raise ValueError(f"{owner}: mode must be one of {CONSTRAINT_MODES}, got {mode!r}")


def _check_eps(eps, owner: str) -> None:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"{owner}: eps must be a positive number, got {eps!r}")
