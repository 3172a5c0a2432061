"""Argument checks shared by the ops twins, norms, kernels and optimizers.

Each error names the argument, the expected and the given value.
"""

from __future__ import annotations

import math

import mlx.core as mx

MAX_SIZE = 2**31 - 1  # MLX array shapes are int32


def check_size(value, name: str, owner: str) -> int:
    """A positive int that fits an axis of an MLX array."""
    expected = f"{name} must be a positive int (at most {MAX_SIZE})"
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{owner}: {expected}, got {value!r}")
    if not 1 <= value <= MAX_SIZE:
        raise ValueError(f"{owner}: {expected}, got {value!r}")
    return value


def check_dims(dims, owner: str) -> int:
    return check_size(dims, "dims", owner)


_BOUNDS = {"any": "a finite number", "non_negative": "a finite number >= 0",
           "positive": "a positive finite number"}


def check_number(value, name: str, owner: str, bound: str = "any") -> float:
    """A finite real number; ``bound`` is "any", "non_negative" or "positive"."""
    expected = f"{name} must be {_BOUNDS[bound]}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{owner}: {expected}, got {value!r}")
    if not math.isfinite(value) or (bound == "non_negative" and value < 0) or (
            bound == "positive" and value <= 0):
        raise ValueError(f"{owner}: {expected}, got {value!r}")
    return float(value)


def check_eps(eps, owner: str) -> float:
    return check_number(eps, "eps", owner, "positive")


def check_flag(value, name: str, owner: str) -> bool:
    """A bool: a string such as "no" would otherwise count as True."""
    if not isinstance(value, bool):
        raise TypeError(f"{owner}: {name} must be True or False, got {value!r}")
    return value


def check_heads(num_heads, dims: int, owner: str) -> int:
    check_size(num_heads, "num_heads", owner)
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


def check_param(p, shape: tuple | None, name: str, owner: str, optional: bool = True) -> None:
    """An mx.array parameter (or None if ``optional``) of the given shape (None: any)."""
    if p is None and optional:
        return
    if not isinstance(p, mx.array):
        expected = "an mx.array or None" if optional else "an mx.array"
        raise TypeError(f"{owner}: {name} must be {expected}, got {type(p).__name__}")
    if shape is not None and tuple(p.shape) != tuple(shape):
        raise ValueError(f"{owner}: {name} must have shape {tuple(shape)}, got {tuple(p.shape)}")
