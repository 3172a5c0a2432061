"""``swap_norms``: give an mlx-lm Llama/Mistral/Qwen2/Qwen3 model another norm and placement."""

from __future__ import annotations

import mlx.nn as nn

from ..norms import make_norm
from ..placements import HYPERSPHERE_NORMS, check_placement, has_final_norm, make_block
from .args import check_mix_ratio

SWAPPABLE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
# Placements whose norms sit where mlx-lm's Pre-LN norms sit, so their gains carry over.
_SAME_POSITIONS = ("pre", "lnscaling")


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
    return model
