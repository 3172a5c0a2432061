"""The Peri-LN norm-add-norm ops twin (arXiv 2502.02732): the unfused sequence in plain MLX ops.

``y1 = N_out(branch)``, ``h = stream + y1``, ``y = N_in(h)``: the output norm of one sub-layer,
the residual add and the input norm of the next, with RMSNorm (``params = (weight,)``) or
SeeDNorm (``params = (weight, alpha, beta)``, one head) for both norms.
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx

from ._checks import check_choice, check_eps, check_input, check_param
from .rms import rms_norm
from .seed import DOT_SCALES, seednorm

OWNER = "norm_add_norm"


def check_norm_add_norm(branch: mx.array, stream: mx.array, out_params: Sequence[mx.array],
                        in_params: Sequence[mx.array], out_eps: float, in_eps: float,
                        dot_scale: str, owner: str = OWNER) -> None:
    """ValueError/TypeError naming the argument unless the call is well formed."""
    check_input(branch, None, f"{owner} (branch)")
    dims = branch.shape[-1]
    check_input(stream, dims, f"{owner} (stream)")
    if stream.shape != branch.shape or stream.dtype != branch.dtype:
        raise ValueError(f"{owner}: stream must match branch (shape {branch.shape}, "
                         f"{branch.dtype}), got {stream.shape}, {stream.dtype}")
    for name, params in (("out_params", out_params), ("in_params", in_params)):
        if not isinstance(params, (tuple, list)) or len(params) not in (1, 3):
            raise TypeError(f"{owner}: {name} must be (weight,) for RMSNorm or (weight, alpha, "
                            f"beta) for SeeDNorm, got {params!r}")
        for label, p in zip(("weight", "alpha", "beta"), params):
            check_param(p, (dims,), f"{name} {label}", owner, optional=False)
    if len(out_params) != len(in_params):
        raise ValueError(f"{owner}: both norms must be of one type, got {len(out_params)} "
                         f"and {len(in_params)} parameters (out_params, in_params)")
    check_eps(out_eps, owner)
    check_eps(in_eps, owner)
    check_choice(dot_scale, DOT_SCALES, "dot_scale", owner)


def normalize(x: mx.array, params: Sequence[mx.array], eps: float, dot_scale: str) -> mx.array:
    """RMSNorm for one parameter, single-head SeeDNorm for three."""
    if len(params) == 1:
        return rms_norm(x, params[0], eps)
    return seednorm(x, *params, eps, 1, dot_scale)


def norm_add_norm(branch: mx.array, stream: mx.array, out_params: Sequence[mx.array],
                  in_params: Sequence[mx.array], out_eps: float = 1e-6, in_eps: float = 1e-6,
                  dot_scale: str = "none") -> tuple[mx.array, mx.array]:
    """``h = stream + N_out(branch)``, ``y = N_in(h)``; returns ``(h, y)`` in the input dtype.

    Both norms are RMSNorm (``params = (weight,)``) or both SeeDNorm
    (``params = (weight, alpha, beta)``, ``dot_scale`` as in :func:`seednorm`).
    """
    check_norm_add_norm(branch, stream, out_params, in_params, out_eps, in_eps, dot_scale)
    h = stream + normalize(branch, out_params, out_eps, dot_scale)
    return h, normalize(h, in_params, in_eps, dot_scale)
