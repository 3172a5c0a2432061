"""Write a QAT model, exported to real quantized layers, as a directory ``mlx_lm.load`` reads."""

from __future__ import annotations

import tempfile
from pathlib import Path

import mlx.nn as nn

from ..models import Model, save_model
from ..models.quantized import quantization_config
from ..train.model_dir import save_model_dir
from .layers import export, qat_layers


def save(model: nn.Module, tokenizer, path: str | Path, config: dict | None = None,
         source_dir: str | Path | None = None) -> Path:
    """Export ``model`` (in place, if it still has fake-quantized layers) and write it.

    An ``ln.Model`` (or an mlx-lm model changed by ``swap_norms``) goes through
    ``ln.save_model``: load it with ``mlx_lm.load(path, trust_remote_code=True)``. Any other
    mlx-lm model needs ``config``, its config.json dict (``model_type`` and the arguments),
    and loads with ``mlx_lm.load(path)``; ``source_dir``, the directory it was loaded from,
    gives the extra files mlx-lm copies (``*.py``, generation_config.json). config.json gets
    mlx-lm's ``"quantization"`` (and ``"quantization_config"``) entry: ``group_size``,
    ``bits``, ``mode`` plus each layer that differs, as ``mlx_lm.utils.quantize_model``
    writes it. ``path`` must be new or empty for an mlx-lm model.
    """
    if qat_layers(model):
        export(model)
    if isinstance(model, Model) or getattr(model, "swapped_norms", None) is not None:
        return save_model(model, tokenizer, path)
    if not isinstance(config, dict) or "model_type" not in config:
        raise TypeError(f"save: config must be the mlx-lm model's config.json dict (with "
                        f"model_type) for a {type(model).__name__}, got {config!r:.60}")
    config = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    quantization = quantization_config(model)
    if quantization is not None:
        config["quantization"] = config["quantization_config"] = quantization
    if source_dir is not None:
        return save_model_dir(model, tokenizer, config, source_dir, path)
    with tempfile.TemporaryDirectory() as nothing_to_copy:
        return save_model_dir(model, tokenizer, config, nothing_to_copy, path)
