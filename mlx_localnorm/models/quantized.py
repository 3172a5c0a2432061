"""A quantized model's layers as mlx-lm's config.json ``"quantization"`` entry records them."""

from __future__ import annotations

from collections import Counter

import mlx.nn as nn
from mlx_lm.models.switch_layers import QuantizedSwitchLinear

QUANTIZED = (nn.QuantizedLinear, nn.QuantizedEmbedding, QuantizedSwitchLinear)


def quantized_layers(model: nn.Module) -> dict[str, dict]:
    """``{path: to_quantized arguments}`` of every quantized layer of ``model``."""
    layers = {}
    for path, module in model.named_modules():
        if isinstance(module, QUANTIZED):
            params = {"group_size": module.group_size, "bits": module.bits, "mode": module.mode}
            if getattr(module, "global_scale", None) is not None:  # nvfp4 experts
                params["global_scale"] = True
            layers[path] = params
    return layers


def quantization_config(model: nn.Module) -> dict | None:
    """mlx-lm's entry: the most common settings, plus each layer that differs (None: float).

    ``mlx_lm.utils.load_model`` quantizes the layers whose ``scales`` it finds with these
    settings (a path's own entry first) before it loads the weights.
    """
    layers = quantized_layers(model)
    if not layers:
        return None
    common = Counter(tuple(params.items()) for params in layers.values()).most_common(1)
    default = dict(common[0][0])
    default.pop("global_scale", None)
    return {**default, **{path: params for path, params in layers.items() if params != default}}
