"""Argument checks shared by the ops twins, norms, kernels and optimizers.

Each error names the argument, the expected and the given value.
"""

from __future__ import annotations

import math

import mlx.core as mx


def check_dims(dims, owner: str) -> int:
    if isinstance(dims, bool) or not isinstance(dims, int) or dims < 1:
        raise ValueError(f"{owner}: dims must be a positive int, got {dims!r}")
    return dims


def check_eps(eps, owner: str) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (
        math.isfinite(eps) and eps > 0
    ):
        raise ValueError(f"{owner}: eps must be a positive finite number, got {eps!r}")
    return float(eps)


def check_heads(num_heads, dims: int, owner: str) -> int:
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"{owner}: num_heads must be a positive int, got {num_heads!r}")
    if dims % num_heads:
        raise ValueError(f"{owner}: num_heads={num_heads} must divide dims={dims}")
    return num_heads


def check_choice(value, choices: tuple, name: str, owner: str):
    if value not in choices:
        raise ValueError(f"{owner}: {name} must be one of {choices}, got {value!r}")
    return value


def check_input(x, dims: int | None, owner: str, min_ndim: int = 1) -> None:
    """A floating mx.array with at least `min_ndim` axes whose last axis has `dims` entries.

    ``dims=None`` accepts any last-axis size.
    """
    if not isinstance(x, mx.array):
        raise TypeError(f"{owner} expects an mx.array input, got {type(x).__name__}")
    if not mx.issubdtype(x.dtype, mx.floating):
        raise TypeError(
            f"{owner} expects a floating input (float32, float16 or bfloat16), got {x.dtype}"
        )
    if x.ndim < min_ndim:
        raise ValueError(f"{owner} expects an input with at least {min_ndim} axes, got {x.shape}")
    if dims is not None and x.shape[-1] != dims:
        raise ValueError(f"{owner} got input with last axis {x.shape[-1]}, expected {dims}")


def check_param(p, shape: tuple, name: str, owner: str) -> None:
    if p is not None and tuple(p.shape) != tuple(shape):
        raise ValueError(f"{owner}: {name} must have shape {tuple(shape)}, got {tuple(p.shape)}")
