"""The frozen reference policy of a LoRA/DoRA model: the same model with its adapters off."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from mlx import nn
from mlx.utils import tree_unflatten
from mlx_lm.tuner.dora import DoRAEmbedding, DoRALinear
from mlx_lm.tuner.lora import LoRAEmbedding, LoRALinear, LoRASwitchLinear

# Each adapter type and the attribute holding the layer it wraps.
_BASE_OF = {LoRALinear: "linear", LoRASwitchLinear: "linear", DoRALinear: "linear",
            LoRAEmbedding: "embedding", DoRAEmbedding: "embedding"}


@contextmanager
def adapters_off(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, every mlx-lm LoRA/DoRA layer of ``model`` is its base layer.

    The reference policy for the KL penalty without a second copy of the weights:
    ``with adapters_off(model): ref = token_logprobs(model, tokens)``. Swapping the
    layer (not zeroing its scale) also removes DoRA's trained magnitude. The adapters come
    back when the block ends, even by an exception.
    """
    adapters = [(name, m) for name, m in model.named_modules() if type(m) in _BASE_OF]
    if not adapters:
        raise ValueError("adapters_off: the model has no LoRA/DoRA adapters (mlx_lm.tuner); "
                         "for full fine-tuning keep a frozen copy of the model as the reference")
    model.update_modules(tree_unflatten(
        [(name, getattr(m, _BASE_OF[type(m)])) for name, m in adapters]))
    try:
        yield model
    finally:
        model.update_modules(tree_unflatten(adapters))
