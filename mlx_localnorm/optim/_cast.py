"""Dtype casts that skip the copy when the array already has the dtype."""

from __future__ import annotations

import mlx.core as mx


def as_dtype(x: mx.array, dtype: mx.Dtype) -> mx.array:
    # astype makes a new graph node even to the same dtype; skip it on the hot path.
    return x if x.dtype == dtype else x.astype(dtype)
