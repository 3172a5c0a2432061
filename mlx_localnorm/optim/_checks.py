"""Hyperparameter checks shared by the optimizers: each error names the argument, the
expected and the given value."""

from __future__ import annotations

import math

import mlx.core as mx

from ..ops._checks import check_choice, check_flag  # noqa: F401  (re-exported for the optimizers)


def _is_number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def check_learning_rate(value, owner: str, name: str = "learning_rate"):
    """A non-negative number or a schedule (a callable of the step)."""
    if callable(value):
        return value
    if not _is_number(value) or value < 0:
        raise ValueError(
            f"{owner}: {name} must be a non-negative number or a schedule, got {value!r}"
        )
    return value


def check_unit_interval(value, name: str, owner: str) -> float:
    """A number in [0, 1): momenta and moment decays."""
    if not _is_number(value) or not 0 <= value < 1:
        raise ValueError(f"{owner}: {name} must be in [0, 1), got {value!r}")
    return float(value)


def check_betas(value, name: str, owner: str) -> tuple[float, float]:
    """A pair of moment decays ``(b1, b2)``, each in [0, 1)."""
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"{owner}: {name} must be a pair (b1, b2), got {value!r}")
    return tuple(check_unit_interval(b, name, owner) for b in value)


def check_non_negative(value, name: str, owner: str) -> float:
    if not _is_number(value) or value < 0:
        raise ValueError(f"{owner}: {name} must be a non-negative number, got {value!r}")
    return float(value)


def check_positive(value, name: str, owner: str) -> float:
    if not _is_number(value) or value <= 0:
        raise ValueError(f"{owner}: {name} must be a positive number, got {value!r}")
    return float(value)


def check_steps(value, owner: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}: ns_steps must be a positive int, got {value!r}")
    return value


def check_float_dtype(value, name: str, owner: str) -> mx.Dtype:
    if not isinstance(value, mx.Dtype) or not mx.issubdtype(value, mx.floating):
        raise TypeError(f"{owner}: {name} must be a floating mx dtype, got {value!r}")
    return value


def check_matrix(parameter: mx.array, owner: str) -> None:
    """Orthogonalizing optimizers take matrices (2-D) or stacks of matrices (3-D and up)."""
    if parameter.ndim < 2:
        raise ValueError(
            f"{owner} takes matrices (2-D) or stacks of matrices (3-D), got a parameter of "
            f"shape {tuple(parameter.shape)}; put vectors and scalars in an AdamW group "
            f"(see mlx_localnorm.optim.split_params)"
        )
