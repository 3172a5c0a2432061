"""What each Hugging Face ``model_type`` is as LocalNorm ``ModelArgs``, and its tensor names.

Configs are read through ``transformers.AutoConfig``, which fills each architecture's defaults
and turns the 4.x ``rope_scaling``/``rope_theta`` keys into 5.x ``rope_parameters``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import mlx.core as mx

# Hugging Face activation names -> ModelArgs.mlp_activation ("gelu_new" is GPT-2's tanh GELU).
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh",
                "gelu_new": "gelu_tanh", "gelu": "gelu"}
# rope types whose mlx-lm implementation matches transformers' (llama3, linear, dynamic NTK).
ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
# Buffers some checkpoints carry that are not weights: RoPE tables, GPT-2's causal mask.
_BUFFERS = re.compile(r"rotary_emb\.inv_freq$|(^|\.)attn\.(masked_)?bias$")

TensorMap = Callable[[str, mx.array], dict[str, mx.array]]


def _activation(config) -> str:
    # As transformers: hidden_act (its Gemma config turns a legacy "gelu" into the tanh GELU).
    name = config.hidden_act
    if name not in _ACTIVATIONS:
        raise ValueError(f"from_hf: config.json hidden_act must be one of "
                         f"{sorted(_ACTIVATIONS)}, got {name!r}")
    return _ACTIVATIONS[name]


def _rope(config) -> dict:
    """``rope_theta`` and mlx-lm's ``rope_scaling`` dict from transformers' rope_parameters."""
    params = dict(config.rope_parameters)
    rope_type = params.pop("rope_type", params.pop("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"from_hf: rope_type must be one of {ROPE_TYPES}, got {rope_type!r}")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"from_hf: partial_rotary_factor must be 1.0, got "
                         f"{params['partial_rotary_factor']!r}")
    theta = params.pop("rope_theta")
    scaling = None if rope_type == "default" else {"rope_type": rope_type, **params}
    return {"rope_theta": float(theta), "rope_scaling": scaling}


def _layer_types(config) -> list[str] | None:
    """Mistral slides every layer when it has a window; Qwen2/Qwen3 list theirs."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types is None and window is not None:
        return ["sliding_attention"] * config.num_hidden_layers
    return list(types) if types is not None and window is not None else None


def _llama_args(config) -> dict:
    """Llama and its relatives: RMSNorm Pre-LN, RoPE, SwiGLU (GeGLU for Gemma)."""
    layer_types = _layer_types(config)
    return {
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "intermediate_size": config.intermediate_size,
        "head_dim": getattr(config, "head_dim", None), **_rope(config),
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": bool(config.tie_word_embeddings),
        "attention_bias": bool(getattr(config, "attention_bias", False)),
        "mlp_bias": bool(getattr(config, "mlp_bias", False)),
        "mlp_activation": _activation(config), "norm_type": "rmsnorm",
        "norm_eps": config.rms_norm_eps, "layer_types": layer_types,
        "sliding_window": config.sliding_window if layer_types else None,
    }


def _qwen2_args(config) -> dict:
    # Biases on q, k and v only.
    return {**_llama_args(config), "attention_bias": True, "attention_out_bias": False}


def _qwen3_args(config) -> dict:
    return {**_llama_args(config), "qk_norm": "rmsnorm"}


def _gemma_args(config) -> dict:
    # Norm gains stored as w and used as 1 + w; embeddings scaled by sqrt(D); always tied.
    return {**_llama_args(config), "norm_options": {"zero_centered": True},
            "embed_scale": math.sqrt(config.hidden_size), "tie_word_embeddings": True}


def _gpt2_args(config) -> dict:
    """GPT-2: LayerNorm with bias, learned positions, plain tanh-GELU MLP, biases everywhere."""
    if config.scale_attn_by_inverse_layer_idx or not config.scale_attn_weights:
        raise ValueError("from_hf: GPT-2 attention must be scaled by 1/sqrt(head_dim) only "
                         "(scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False), "
                         f"got {config.scale_attn_weights} and "
                         f"{config.scale_attn_by_inverse_layer_idx}")
    activation = config.activation_function
    if activation not in _ACTIVATIONS:
        raise ValueError(f"from_hf: config.json activation_function must be one of "
                         f"{sorted(_ACTIVATIONS)}, got {activation!r}")
    return {
        "vocab_size": config.vocab_size, "hidden_size": config.n_embd,
        "num_hidden_layers": config.n_layer, "num_attention_heads": config.n_head,
        "intermediate_size": config.n_inner or 4 * config.n_embd,
        "max_position_embeddings": config.n_positions, "position_embedding": "learned",
        "tie_word_embeddings": bool(config.tie_word_embeddings),
        "attention_bias": True, "mlp_bias": True, "mlp_gated": False,
        "mlp_activation": _ACTIVATIONS[activation], "norm_type": "layernorm",
        "norm_eps": config.layer_norm_epsilon,
    }


def _same_names(name: str, value: mx.array) -> dict[str, mx.array]:
    """Llama-family checkpoints use mlx-lm's (and so our) parameter names."""
    return {name: value}


_GPT2_NAMES = {"wte": "model.embed_tokens", "wpe": "model.embed_positions", "ln_f": "model.norm",
               "ln_1": "input_layernorm", "ln_2": "post_attention_layernorm",
               "attn.c_proj": "self_attn.o_proj", "mlp.c_fc": "mlp.up_proj",
               "mlp.c_proj": "mlp.down_proj"}


def _gpt2_names(name: str, value: mx.array) -> dict[str, mx.array]:
    """GPT-2 names -> ours. Hugging Face's ``Conv1D`` stores ``x @ W`` weights, (in, out):
    transposed to ``nn.Linear``'s (out, in). mlx-lm's names start with ``model.`` and its
    weights (packed when quantized, with ``scales`` and ``biases``) are (out, in) already."""
    mlx_layout = name.startswith("model.")
    short = name.removeprefix("transformer.").removeprefix("model.")
    layer = re.match(r"h\.(\d+)\.(.+)\.(weight|bias|scales|biases)$", short)
    if layer is None:
        module, _, kind = short.rpartition(".")
        return {f"{_GPT2_NAMES.get(module, module)}.{kind}": value}
    index, module, kind = layer.groups()
    prefix = f"model.layers.{index}"
    transpose = not mlx_layout and kind == "weight" and module.startswith(("attn.", "mlp."))
    if module == "attn.c_attn":  # fused q, k, v along the output axis
        parts = _split3(name, value, axis=-1 if transpose or value.ndim == 1 else 0)
        return {f"{prefix}.self_attn.{p}.{kind}": part.T if transpose else part
                for p, part in zip(("q_proj", "k_proj", "v_proj"), parts)}
    target = f"{prefix}.{_GPT2_NAMES.get(module, module)}.{kind}"
    return {target: value.T if transpose else value}


def _split3(name: str, value: mx.array, axis: int) -> list[mx.array]:
    if value.ndim == 0 or value.shape[axis] % 3:
        raise ValueError(f"from_hf: tensor {name!r} must hold q, k and v (an output axis that "
                         f"is a multiple of 3), got shape {tuple(value.shape)}")
    return mx.split(value, 3, axis=axis)


# model_type -> (ModelArgs fields from the transformers config, tensor name map)
ARCHITECTURES: dict[str, tuple[Callable[[object], dict], TensorMap]] = {
    "llama": (_llama_args, _same_names),
    "mistral": (_llama_args, _same_names),
    "qwen2": (_qwen2_args, _same_names),
    "qwen3": (_qwen3_args, _same_names),
    "gemma": (_gemma_args, _same_names),
    "gpt2": (_gpt2_args, _gpt2_names),
}
SUPPORTED_MODEL_TYPES = tuple(ARCHITECTURES)


def is_buffer(name: str) -> bool:
    """A checkpoint entry that is not a weight (recomputed by the model)."""
    return _BUFFERS.search(name) is not None
