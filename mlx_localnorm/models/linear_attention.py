r"""Qwen3-Next's Gated DeltaNet block, trainable: the ``linear_attention`` layer type.

Parameter names and layouts are mlx-lm's ``qwen3_next.Qwen3NextGatedDeltaNet``
(``in_proj_qkvz``, ``in_proj_ba``, ``conv1d``, ``A_log``, ``dt_bias``, ``norm``, ``out_proj``),
so its weights map in by name. Per token, for each value head:

.. math:: [q, k, v] = \mathrm{silu}(\mathrm{conv}([q, k, v])), \quad
          \hat q = q / (\lVert q \rVert \sqrt{d_k}), \quad \hat k = k / \lVert k \rVert

.. math:: \log g = -e^{A_{log}} \mathrm{softplus}(a + dt_{bias}), \quad \beta = \sigma(b)

then the gated delta rule (arXiv 2412.06464, :mod:`.gated_delta`) and
:math:`y = W_{out}(N(o) \odot \mathrm{silu}(z))` with ``N`` the model's ``norm_type`` per value
head (Qwen3-Next: RMSNorm). Training and prefill run the chunked form; one-token decode
with a cache runs mlx-lm's ``gated_delta_update`` (its Metal kernel on a Mac).
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.activations import precise_swiglu
from mlx_lm.models.gated_delta import gated_delta_update, normalize_qk

from .args import ModelArgs
from .gated_delta import chunk_gated_delta

# flash-linear-attention's GatedDeltaNet init: softplus(dt_bias) log-uniform in this range.
DT_RANGE = (1e-3, 0.1)


class GatedDeltaNet(nn.Module):
    """Gated DeltaNet with a short causal conv, L2-normalized q/k and a gated output norm.

    Called like attention, ``(x, mask, cache)``; its cache is mlx-lm's ``ArraysCache(2)``
    holding the last ``conv - 1`` conv inputs and the (B, Hv, Dv, Dk) float32 state.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.num_k_heads, self.num_v_heads = args.linear_num_key_heads, args.linear_num_value_heads
        self.head_k_dim, self.head_v_dim = args.linear_key_head_dim, args.linear_value_head_dim
        self.key_dim = self.num_k_heads * self.head_k_dim
        self.value_dim = self.num_v_heads * self.head_v_dim
        self.conv_kernel_size = args.linear_conv_kernel_dim
        self.chunk_size = args.linear_chunk_size
        self.conv_dim = 2 * self.key_dim + self.value_dim
        dims = args.hidden_size
        self.in_proj_qkvz = nn.Linear(dims, 2 * self.key_dim + 2 * self.value_dim, bias=False)
        self.in_proj_ba = nn.Linear(dims, 2 * self.num_v_heads, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.conv_kernel_size,
                                groups=self.conv_dim, bias=False)
        # A in [1, 16] as Mamba-2; dt_bias = softplus^{-1}(dt), dt log-uniform in DT_RANGE.
        self.A_log = mx.log(mx.random.uniform(1.0, 16.0, (self.num_v_heads,)))
        low, high = math.log(DT_RANGE[0]), math.log(DT_RANGE[1])
        dt = mx.exp(mx.random.uniform(low, high, (self.num_v_heads,)))
        self.dt_bias = dt + mx.log(-mx.expm1(-dt))
        self.norm = args.new_norm(self.head_v_dim)
        self.out_proj = nn.Linear(self.value_dim, dims, bias=False)

    def _split(self, qkvz: mx.array, ba: mx.array) -> tuple[mx.array, ...]:
        """mlx-lm's layout: per key head, [q, k, v..., z...] and [b..., a...] (r = Hv/Hk)."""
        B, S = qkvz.shape[:2]
        r, dk, dv = self.num_v_heads // self.num_k_heads, self.head_k_dim, self.head_v_dim
        qkvz = qkvz.reshape(B, S, self.num_k_heads, -1)
        q, k, v, z = mx.split(qkvz, [dk, 2 * dk, 2 * dk + r * dv], axis=-1)
        b, a = mx.split(ba.reshape(B, S, self.num_k_heads, 2 * r), [r], axis=-1)
        flat = (t.reshape(B, S, -1) for t in (q, k, v))
        return (*flat, z.reshape(B, S, self.num_v_heads, dv),
                b.reshape(B, S, self.num_v_heads), a.reshape(B, S, self.num_v_heads))

    def _conv(self, qkv: mx.array, mask, cache) -> mx.array:
        """Causal depthwise conv with SiLU; the cache keeps the last ``conv - 1`` inputs."""
        B, S, _ = qkv.shape
        keep = self.conv_kernel_size - 1
        if cache is not None and cache[0] is not None:
            past = cache[0]
        else:
            past = mx.zeros((B, keep, self.conv_dim), dtype=qkv.dtype)
        if mask is not None:
            qkv = mx.where(mask[..., None], qkv, 0)
        window = mx.concatenate([past, qkv], axis=1)
        if cache is not None:
            if cache.lengths is not None:  # batched prompts of different lengths (mlx-lm)
                ends = mx.clip(cache.lengths, 0, S)
                cache[0] = mx.take_along_axis(window, (ends[:, None] + mx.arange(keep))[..., None],
                                              axis=1)
            else:
                cache[0] = mx.contiguous(window[:, S:, :])
        return nn.silu(self.conv1d(window))

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        B, S, _ = x.shape
        q, k, v, z, b, a = self._split(self.in_proj_qkvz(x), self.in_proj_ba(x))
        q, k, v = mx.split(self._conv(mx.concatenate([q, k, v], axis=-1), mask, cache),
                           [self.key_dim, 2 * self.key_dim], axis=-1)
        q = q.reshape(B, S, self.num_k_heads, self.head_k_dim)
        k = k.reshape(B, S, self.num_k_heads, self.head_k_dim)
        v = v.reshape(B, S, self.num_v_heads, self.head_v_dim)
        q, k = normalize_qk(q, k, inv_scale=self.head_k_dim**-0.5, eps=1e-6)
        state = cache[1] if cache is not None else None
        if S == 1 and cache is not None and not self.training:
            out, state = gated_delta_update(q, k, v, a, b, self.A_log, self.dt_bias, state, mask)
        else:
            log_g = -mx.exp(self.A_log.astype(mx.float32)) * nn.softplus(
                (a + self.dt_bias).astype(mx.float32))
            out, state = chunk_gated_delta(q, k, v, log_g, mx.sigmoid(b), state, mask,
                                           self.chunk_size)
        if cache is not None:
            cache[1] = state
            cache.advance(S)
        out = precise_swiglu(out, z, self.norm(out))
        return self.out_proj(out.reshape(B, S, -1))
