"""``from_qwen3_next``: an mlx-lm ``qwen3_next`` model as a LocalNorm hybrid model.

The LocalNorm model then computes the same logits (RMSNorm + Pre-LN, gated attention with
RMSNorm QK-norm and partial RoPE, Gated DeltaNet blocks) and can be fine-tuned, or have its
norms swapped, like any other. Qwen3-Next's sparse MoE blocks (softmax top-k routing plus a
gated shared expert) have no LocalNorm counterpart: only dense-MLP models map.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models import qwen3_next

from .args import ModelArgs
from .localnorm import Model


def qwen3_next_args(args: qwen3_next.ModelArgs) -> ModelArgs:
    """The LocalNorm configuration of a dense Qwen3-Next configuration."""
    interval = args.full_attention_interval
    return ModelArgs(
        vocab_size=args.vocab_size, hidden_size=args.hidden_size,
        num_hidden_layers=args.num_hidden_layers, num_attention_heads=args.num_attention_heads,
        num_key_value_heads=args.num_key_value_heads, head_dim=args.head_dim,
        intermediate_size=args.intermediate_size, rope_theta=args.rope_theta,
        rope_scaling=args.rope_scaling, max_position_embeddings=args.max_position_embeddings,
        partial_rotary_factor=args.partial_rotary_factor,
        tie_word_embeddings=args.tie_word_embeddings, attention_bias=args.attention_bias,
        norm_type="rmsnorm", norm_eps=args.rms_norm_eps, placement="pre", qk_norm="rmsnorm",
        attention_gate=True,
        layer_types=["full_attention" if (i + 1) % interval == 0 else "linear_attention"
                     for i in range(args.num_hidden_layers)],
        linear_num_key_heads=args.linear_num_key_heads,
        linear_num_value_heads=args.linear_num_value_heads,
        linear_key_head_dim=args.linear_key_head_dim,
        linear_value_head_dim=args.linear_value_head_dim,
        linear_conv_kernel_dim=args.linear_conv_kernel_dim)


def _split_gate(name: str, value: mx.array, heads: int) -> dict[str, mx.array]:
    """Qwen3-Next's q_proj holds [query, gate] per head; ours has q_proj and g_proj."""
    parts = value.reshape(heads, 2, -1, *value.shape[1:])
    return {name: parts[:, 0].reshape(-1, *value.shape[1:]),
            name.replace("q_proj", "g_proj"): parts[:, 1].reshape(-1, *value.shape[1:])}


def from_qwen3_next(model: nn.Module) -> Model:
    """A LocalNorm :class:`Model` with the weights of an mlx-lm ``qwen3_next.Model``.

    Raises ValueError for a model with MoE blocks. Quantized models: dequantize first.
    """
    if not isinstance(model, qwen3_next.Model):
        raise TypeError(f"from_qwen3_next: model must be an mlx_lm qwen3_next.Model, got "
                        f"{type(model).__name__}")
    moe = [i for i, layer in enumerate(model.layers)
           if isinstance(layer.mlp, qwen3_next.Qwen3NextSparseMoeBlock)]
    if moe:
        raise ValueError(f"from_qwen3_next: blocks {moe} are sparse MoE (shared expert and "
                         "routing unlike ln.Model's MoE); only dense-MLP Qwen3-Next models map")
    ours = Model(qwen3_next_args(model.args))
    weights = {}
    for name, value in tree_flatten(model.parameters()):
        name = name.replace(".linear_attn.", ".self_attn.")
        if ".self_attn.q_proj." in name:
            weights.update(_split_gate(name, value, model.args.num_attention_heads))
        else:
            weights[name] = value
    ours.load_weights(list(weights.items()), strict=True)
    return ours
