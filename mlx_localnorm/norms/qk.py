"""QK-norm: a per-head norm of queries and keys over ``head_dim`` (arXiv 2010.04245, 2302.05442)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..ops._checks import check_size
from .registry import make_norm


class QKNorm(nn.Module):
    r"""Normalize queries and keys per head before RoPE (Qwen3, OLMo 2, ViT-22B).

    .. math:: q_h = N(q_h), \quad k_h = N(k_h)

    ``N`` is any registered norm over the last axis (``head_dim``), RMSNorm by default, with
    separate parameters for q (``q_norm``) and k (``k_norm``), named as in mlx-lm's Qwen3.
    Inputs are ``[..., head_dim]`` in any head layout; nGPT uses ``norm="l2norm"``.
    """

    def __init__(self, head_dim: int, norm: str = "rmsnorm", **options):
        super().__init__()
        check_size(head_dim, "head_dim", "QKNorm")
        self.q_norm = make_norm(norm, head_dim, **options)
        self.k_norm = make_norm(norm, head_dim, **options)

    def __call__(self, queries: mx.array, keys: mx.array) -> tuple[mx.array, mx.array]:
        return self.q_norm(queries), self.k_norm(keys)
