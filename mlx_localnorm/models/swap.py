"""``swap_norms``: give an mlx-lm Llama/Mistral/Qwen2/Qwen3 model another norm and placement."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..norms import make_norm
from ..placements import HYPERSPHERE_NORMS, check_placement, has_final_norm, make_block
from .args import ModelArgs, check_mix_ratio
from .localnorm import Model
from .quantized import quantized_layers

SWAPPABLE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
# Placements whose norms sit where mlx-lm's Pre-LN norms sit, so their gains carry over.
_SAME_POSITIONS = ("pre", "lnscaling")


@dataclass(frozen=True)
class SwapSettings:
    """What ``swap_norms`` did to a model (kept on it as ``model.swapped_norms``)."""

    norm: str
    placement: str
    mix_ratio: float
    options: dict[str, Any]  # make_norm options, eps included


def _copy_gain(old: nn.Module, new: nn.Module) -> None:
    """Give ``new`` the learned gain of ``old`` when both have one of the same shape."""
    if "weight" not in old or "weight" not in new or old.weight.shape != new.weight.shape:
        return
    gain = old.weight - 1 if getattr(new, "zero_centered", False) else old.weight
    new.weight = gain.astype(new.weight.dtype)


def swap_norms(model: nn.Module, norm: str = "seednorm", placement: str = "pre",
               mix_ratio: float = 0.25, **norm_options) -> nn.Module:
    """Replace the blocks and norms of an mlx-lm model in place (``update_modules``).

    Each block becomes ``placement``'s block around the model's own ``self_attn`` and
    ``mlp``, with fresh ``norm`` layers (``eps`` from the model's norms unless given). For
    ``pre``/``lnscaling`` the checkpoint's gains are copied into the new norms, as are the
    final norm's and Qwen3's q/k norms', so ``norm="seednorm"`` (which equals RMSNorm at init)
    with ``placement="pre"`` leaves the output unchanged. Returns ``model``.
    """
    model_type = getattr(model, "model_type", None)
    if model_type not in SWAPPABLE_MODEL_TYPES or not hasattr(model, "model"):
        raise TypeError(f"swap_norms: model must be an mlx-lm model of type "
                        f"{SWAPPABLE_MODEL_TYPES}, got {type(model).__name__} with model_type "
                        f"{model_type!r}")
    if placement in HYPERSPHERE_NORMS:
        raise ValueError(f"swap_norms: placement {placement!r} changes attention, MLP and "
                         "weights, not just norms; build ln.Model(ln.ModelArgs(placement="
                         f"{placement!r}, ...)) instead")
    check_placement(placement, norm)
    check_mix_ratio(mix_ratio, "swap_norms")
    inner = model.model
    options = {"eps": inner.norm.eps, **norm_options}

    def new_norm(dims: int = inner.embed_tokens.weight.shape[-1]) -> nn.Module:
        return make_norm(norm, dims, **options)

    blocks = []
    for i, layer in enumerate(inner.layers):
        attn = layer.self_attn
        for name in ("q_norm", "k_norm"):
            if name in attn:
                qk = new_norm(getattr(attn, name).weight.shape[-1])
                _copy_gain(getattr(attn, name), qk)
                attn.update_modules({name: qk})
        block = make_block(placement, i, len(inner.layers), attn, layer.mlp, new_norm,
                           mix_ratio=mix_ratio)
        if placement in _SAME_POSITIONS:
            _copy_gain(layer.input_layernorm, block.input_layernorm)
            _copy_gain(layer.post_attention_layernorm, block.post_attention_layernorm)
        if hasattr(layer, "use_sliding"):  # Llama's model picks each block's mask by this flag
            block.use_sliding = layer.use_sliding
        blocks.append(block)

    final = nn.Identity()
    if has_final_norm(placement):
        final = new_norm()
        _copy_gain(inner.norm, final)
    inner.update_modules({"layers": blocks, "norm": final})
    model.swapped_norms = SwapSettings(norm, placement, mix_ratio, options)
    return model


def to_localnorm(model: nn.Module) -> Model:
    """The LocalNorm :class:`Model` with the weights of an mlx-lm model changed by swap_norms.

    Its blocks are the same placement's blocks around the same attention and MLP, so it
    computes the same logits (up to float32 rounding); ``save_model`` saves it this way.
    """
    settings = getattr(model, "swapped_norms", None)
    if settings is None:
        raise TypeError(f"to_localnorm: model must be an mlx-lm model changed by swap_norms, "
                        f"got {type(model).__name__}")
    ours = Model(_localnorm_args(model.args, model.layers[0], settings))
    layers = quantized_layers(model)
    nn.quantize(ours, class_predicate=lambda path, _: layers.get(path, False))
    weights = dict(tree_flatten(model.parameters()))
    for key, value in tree_flatten(ours.parameters()):
        if key.endswith("o_proj.bias") and key not in weights:  # Qwen2: q/k/v biases only
            weights[key] = mx.zeros(value.shape, weights[key.replace("o_proj", "q_proj")].dtype)
    ours.load_weights(list(weights.items()))
    return ours


def _localnorm_args(args, layer: nn.Module, settings: SwapSettings) -> ModelArgs:
    """ModelArgs of an mlx-lm Llama/Mistral/Qwen2/Qwen3 config after swap_norms."""
    options = dict(settings.options)
    eps = options.pop("eps")
    qk_norm = settings.norm if "q_norm" in layer.self_attn else None
    return ModelArgs(
        vocab_size=args.vocab_size, hidden_size=args.hidden_size,
        num_hidden_layers=args.num_hidden_layers, num_attention_heads=args.num_attention_heads,
        intermediate_size=args.intermediate_size, num_key_value_heads=args.num_key_value_heads,
        head_dim=getattr(args, "head_dim", None), rope_theta=args.rope_theta,
        rope_traditional=getattr(args, "rope_traditional", False),
        rope_scaling=args.rope_scaling,
        max_position_embeddings=getattr(args, "max_position_embeddings", None),
        tie_word_embeddings=args.tie_word_embeddings,
        attention_bias="bias" in layer.self_attn.q_proj, mlp_bias="bias" in layer.mlp.gate_proj,
        norm_type=settings.norm, norm_eps=eps, norm_options=options,
        placement=settings.placement, mix_ratio=settings.mix_ratio,
        qk_norm=qk_norm, qk_norm_options=options if qk_norm else {},
        layer_types=getattr(args, "layer_types", None),
        sliding_window=getattr(args, "sliding_window", None))
