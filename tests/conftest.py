"""Shared pytest set-up: import order and the Metal marker."""

import mlx_localnorm  # noqa: F401  (first: it swaps MLX's CPU BLAS before mlx.core loads)
import mlx.core as mx
import pytest


def pytest_collection_modifyitems(config, items):
    if mx.metal.is_available():
        return
    skip = pytest.mark.skip(reason="needs a real Metal device (Apple silicon); none here")
    for item in items:
        if "metal" in item.keywords:
            item.add_marker(skip)
