"""Write a QAT model, exported to real quantized layers, as a directory ``mlx_lm.load`` reads."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import mlx.nn as nn
from mlx_lm.utils import save_config
from mlx_lm.utils import save_model as save_weights

from ..models import Model, save_model
from ..models.quantized import quantization_config
from .layers import export, qat_layers


def save(model: nn.Module, tokenizer, path: str | Path, config: dict | None = None) -> Path:
    """Export ``model`` (in place, if it still has fake-quantized layers) and write it.

    An ``ln.Model`` (or an mlx-lm model changed by ``swap_norms``) goes through
    ``ln.save_model``: load it with ``mlx_lm.load(path, trust_remote_code=True)``. Any other
    mlx-lm model needs ``config``, its config.json dict (``model_type`` and the arguments),
    and loads with ``mlx_lm.load(path)``. config.json gets mlx-lm's ``"quantization"`` (and
    ``"quantization_config"``) entry: ``group_size``, ``bits``, ``mode`` plus each layer that
    differs, as ``mlx_lm.utils.quantize_model`` writes it. ``path`` must be new or empty for
    an mlx-lm model; it is written beside ``path`` and renamed into place.
    """
    if qat_layers(model):
        export(model)
    if isinstance(model, Model) or getattr(model, "swapped_norms", None) is not None:
        return save_model(model, tokenizer, path)
    if not isinstance(config, dict) or "model_type" not in config:
        raise TypeError(f"save: config must be the mlx-lm model's config.json dict (with "
                        f"model_type) for a {type(model).__name__}, got {config!r:.60}")
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ValueError(f"save: path {str(path)!r} exists and is not an empty directory; "
                         "choose a new path")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.saving-", dir=path.parent))
    try:
        save_weights(staging, model)
        config = {k: v for k, v in config.items()
                  if k not in ("quantization", "quantization_config")}
        quantization = quantization_config(model)
        if quantization is not None:
            config["quantization"] = config["quantization_config"] = quantization
        save_config(config, staging / "config.json")
        tokenizer.save_pretrained(str(staging))
        os.replace(staging, path)  # onto a missing path or an empty directory
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return path
