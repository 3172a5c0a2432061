"""Attention, MLP and mixture-of-experts modules of the LocalNorm transformer.

Names follow mlx-lm (``q_proj``/``k_proj``/``v_proj``/``o_proj``, ``q_norm``/``k_norm``,
``gate_proj``/``up_proj``/``down_proj``, MoE ``gate`` + ``switch_mlp``) so LoRA, quantization
and weight loading treat them like mlx-lm's own.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import shard_inplace, shard_linear, sum_gradients
from mlx_lm.models.activations import swiglu
from mlx_lm.models.base import scaled_dot_product_attention
from mlx_lm.models.rope_utils import initialize_rope
from mlx_lm.models.switch_layers import SwitchGLU

from ..placements import scaled_vector
from .args import ModelArgs


def _shard_vector(vector: mx.array, group: mx.distributed.Group) -> mx.array:
    """This rank's part of a per-feature scale, split like its projection's outputs."""
    return mx.split(vector, group.size())[group.rank()]


class Attention(nn.Module):
    r"""Causal multi-head attention with GQA, RoPE and the LocalNorm options.

    .. math:: o = \mathrm{softmax}(s\, q k^T + \mathrm{mask})\, v \;[\odot \sigma(W_g x)]

    ``qk_norm`` normalizes q and k per head before RoPE (arXiv 2302.05442); the sigmoid gate
    is Qwen3-Next's gated attention (arXiv 2505.06708). nGPT/anGPT: q, k are L2-normalized
    per head and scaled by ``s_q``/``s_k`` (**Decision**: one vector each, so GQA works; nGPT
    shares one ``s_qk``), softmax scale ``s = sqrt(head_dim)`` instead of ``1/sqrt(head_dim)``.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        dims, self.head_dim = args.hidden_size, args.head_dim
        self.n_heads, self.n_kv_heads = args.num_attention_heads, args.num_key_value_heads
        bias = args.attention_bias
        self.q_proj = nn.Linear(dims, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(dims, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(dims, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, dims, bias=args.attention_out_bias)
        if args.new_qk_norm() is not None:
            self.q_norm, self.k_norm = args.new_qk_norm(), args.new_qk_norm()
        if args.hypersphere:
            # SPEC: s_qk stored at 1/sqrt(D), used as p * 1 / (1/sqrt(D)).
            self.s_q, self.s_factor = scaled_vector(self.head_dim * self.n_heads, 1.0,
                                                    dims**-0.5)
            self.s_k, _ = scaled_vector(self.head_dim * self.n_kv_heads, 1.0, dims**-0.5)
        self.scale = self.head_dim**0.5 if args.hypersphere else self.head_dim**-0.5
        if args.attention_gate:
            self.g_proj = nn.Linear(dims, self.n_heads * self.head_dim, bias=bias)
        if args.position_embedding == "rope":
            self.rope = initialize_rope(int(self.head_dim * args.partial_rotary_factor),
                                        args.rope_theta, args.rope_traditional,
                                        args.rope_scaling, args.max_position_embeddings)

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, self.n_heads, self.head_dim)
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, self.head_dim)
        if "q_norm" in self:
            q, k = self.q_norm(q), self.k_norm(k)
        if "s_q" in self:
            q = q * (self.s_q * self.s_factor).reshape(self.n_heads, self.head_dim)
            k = k * (self.s_k * self.s_factor).reshape(self.n_kv_heads, self.head_dim)
        q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
        if "rope" in self:
            offset = 0 if cache is None else cache.offset
            q, k = self.rope(q, offset=offset), self.rope(k, offset=offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        out = scaled_dot_product_attention(q, k, v, cache=cache, scale=self.scale, mask=mask)
        out = out.transpose(0, 2, 1, 3).reshape(B, L, -1)
        if "g_proj" in self:
            out = out * mx.sigmoid(self.g_proj(x))
        return self.o_proj(out)

    def shard(self, group: mx.distributed.Group) -> None:
        """Tensor parallelism: each rank keeps 1/N of the heads; o_proj sums the ranks."""
        for name in ("q_proj", "k_proj", "v_proj", "g_proj"):
            if name in self:
                setattr(self, name, shard_linear(self[name], "all-to-sharded", group=group))
        self.o_proj = shard_linear(self.o_proj, "sharded-to-all", group=group)
        if "s_q" in self:
            self.s_q, self.s_k = _shard_vector(self.s_q, group), _shard_vector(self.s_k, group)
        self.n_heads //= group.size()
        self.n_kv_heads //= group.size()


ACTIVATIONS = {"silu": nn.silu, "gelu_tanh": nn.gelu_approx, "gelu": nn.gelu}


class MLP(nn.Module):
    r"""Gated MLP :math:`W_{down}(\phi(W_{gate} x) \odot W_{up} x)` (SwiGLU with
    :math:`\phi = \mathrm{silu}`, GeGLU with tanh GELU; arXiv 2002.05202), or with
    ``gated=False`` the plain :math:`W_{down}\, \phi(W_{up} x)` of GPT-2.

    nGPT/anGPT (``scaled=True``): ``u = s_u * W_up x`` and ``v = s_v * sqrt(D) * W_gate x``,
    with ``s_u``, ``s_v`` stored at 1 and used as is (SPEC: init value 1, scaling 1).
    """

    def __init__(self, dims: int, hidden_dims: int, bias: bool = False, scaled: bool = False,
                 activation: str = "silu", gated: bool = True):
        super().__init__()
        if gated:
            self.gate_proj = nn.Linear(dims, hidden_dims, bias=bias)
        self.up_proj = nn.Linear(dims, hidden_dims, bias=bias)
        self.down_proj = nn.Linear(hidden_dims, dims, bias=bias)
        self.activation = activation
        if scaled:
            self.s_u, _ = scaled_vector(hidden_dims, 1.0, 1.0)
            self.s_v, _ = scaled_vector(hidden_dims, 1.0, 1.0)
            self.gate_factor = dims**0.5

    def __call__(self, x: mx.array) -> mx.array:
        up = self.up_proj(x)
        if "gate_proj" not in self:
            return self.down_proj(ACTIVATIONS[self.activation](up))
        gate = self.gate_proj(x)
        if "s_u" in self:
            up, gate = up * self.s_u, gate * (self.s_v * self.gate_factor)
        if self.activation == "silu":  # mlx-lm's fused SwiGLU
            return self.down_proj(swiglu(gate, up))
        return self.down_proj(ACTIVATIONS[self.activation](gate) * up)

    def shard(self, group: mx.distributed.Group) -> None:
        """Tensor parallelism: each rank keeps 1/N of the hidden width; down_proj sums them."""
        if "gate_proj" in self:
            self.gate_proj = shard_linear(self.gate_proj, "all-to-sharded", group=group)
        self.up_proj = shard_linear(self.up_proj, "all-to-sharded", group=group)
        self.down_proj = shard_linear(self.down_proj, "sharded-to-all", group=group)
        if "s_u" in self:
            self.s_u, self.s_v = _shard_vector(self.s_u, group), _shard_vector(self.s_v, group)


class MoE(nn.Module):
    r"""Top-k mixture of SwiGLU experts with a load-balance loss (arXiv 2101.03961).

    .. math:: p = \mathrm{softmax}(x W_r), \quad y = \sum_{e \in \mathrm{top}k} g_e
              \mathrm{MLP}_e(x), \quad g = p_{\mathrm{top}k} / \sum p_{\mathrm{top}k}

    Load-balance loss ``a * E * sum_e f_e P_e``: ``f_e`` the share of top-k slots routed to
    ``e``, ``P_e`` the mean router probability; 1 * a when routing is uniform. Only the routed
    experts run (mlx-lm ``SwitchGLU``), so only they get gradient.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.num_experts, self.top_k = args.num_experts, args.num_experts_per_tok
        self.aux_loss_coef = args.router_aux_loss_coef
        self.gate = nn.Linear(args.hidden_size, self.num_experts, bias=False)
        self.switch_mlp = SwitchGLU(args.hidden_size, args.moe_intermediate_size,
                                    self.num_experts, bias=args.mlp_bias)
        self.sharding_group = None

    def __call__(self, x: mx.array) -> mx.array:
        if self.sharding_group is not None:
            x = sum_gradients(self.sharding_group)(x)
        probs = mx.softmax(self.gate(x).astype(mx.float32), axis=-1)
        top = mx.stop_gradient(mx.argpartition(probs, kth=-self.top_k, axis=-1)[..., -self.top_k:])
        gates = mx.take_along_axis(probs, top, axis=-1)
        gates = gates / gates.sum(axis=-1, keepdims=True)
        y = (self.switch_mlp(x, top) * gates[..., None].astype(x.dtype)).sum(axis=-2)
        if self.sharding_group is not None:
            y = mx.distributed.all_sum(y, group=self.sharding_group)

        routed = (top[..., None] == mx.arange(self.num_experts)).sum(axis=-2)
        f = routed.reshape(-1, self.num_experts).mean(axis=0) / self.top_k
        p = probs.reshape(-1, self.num_experts).mean(axis=0)
        # Underscore: kept out of parameters(); read by Model.aux_loss() in the same trace.
        self._aux_loss = self.aux_loss_coef * self.num_experts * (f * p).sum()
        return y.astype(x.dtype)

    def shard(self, group: mx.distributed.Group) -> None:
        """Tensor parallelism as mlx-lm's MoE models: every rank keeps 1/N of each expert's
        width and the whole (replicated) router; the expert outputs are summed across ranks."""
        self.sharding_group = group
        mlp = self.switch_mlp
        shard_inplace(mlp.gate_proj, "all-to-sharded", group=group)
        shard_inplace(mlp.up_proj, "all-to-sharded", group=group)
        shard_inplace(mlp.down_proj, "sharded-to-all", group=group)
        if "bias" in mlp.down_proj:  # every rank adds it before the sum
            mlp.down_proj.bias = mlp.down_proj.bias / group.size()
