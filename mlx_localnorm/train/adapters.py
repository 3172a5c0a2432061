"""Fine-tuning modes (which parameters train) and the adapter files mlx-lm loads.

Modes (:data:`MODES`):

- ``lora``: mlx-lm's ``LoRALinear`` on every Linear of the last ``num_layers`` blocks,
  ``y = W x + s B^T A^T x`` with only ``A`` (``lora_a``) and ``B`` (``lora_b``) trained
  (arXiv 2106.09685).
- ``dora``: mlx-lm's ``DoRALinear``, ``y = m (W + s B^T A^T) x / ||W + s B^T A^T||_row``, with
  ``lora_a``, ``lora_b`` and the magnitude ``m`` trained (arXiv 2402.09353).
- ``norms``: only the norm parameters train: the gains, biases and own parameters (SeeDNorm's
  ``alpha``/``beta``, DyT's ``alpha``) of every norm layer, found by module type
  (:data:`NORM_TYPES`), and the nGPT/anGPT scale vectors (arXiv 2410.01131, 2505.22014).
- ``full``: every parameter trains.

An adapter is a directory with mlx-lm's ``adapter_config.json`` and ``adapters.safetensors``
(the trainable parameters under the model's own names), so ``mlx_lm.load(model_dir,
adapter_path=dir)`` applies it. A ``norms`` (or ``full``) adapter is written as mlx-lm's
``fine_tune_type: "full"``, which mlx-lm applies with ``load_weights(strict=False)`` after
checking every name and shape; ``localnorm_mode`` records which mode wrote it.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tuner.utils import linear_to_lora_layers, load_adapters
from mlx_lm.utils import get_total_parameters

from ..models import Model
from ..models.layers import MLP, Attention
from ..norms import NORMS, QKNorm
from ..placements import ANGPTBlock, NGPTBlock

MODES = ("lora", "dora", "full", "norms")
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapters.safetensors"
# mlx-lm's own LoRA defaults (mlx_lm.lora CONFIG_DEFAULTS).
LORA_DEFAULTS = {"rank": 8, "scale": 20.0, "dropout": 0.0}
# Norm layers: the package's, MLX's (and subclasses, e.g. mlx-lm's own LayerNorm variants).
NORM_TYPES: tuple[type[nn.Module], ...] = (
    *NORMS.values(), QKNorm, nn.RMSNorm, nn.LayerNorm, nn.GroupNorm, nn.BatchNorm,
    nn.InstanceNorm)
# Which parameters of a norm layer the norms mode trains: every one ("all"), its gain and
# shift ("gains"), or its gain alone ("weight": one vector per norm, the smallest adapter).
NORM_PARAMS = ("all", "gains", "weight")
_SUBSETS = {"gains": ("weight", "bias"), "weight": ("weight",)}
# Modules whose own (not their children's) vectors are nGPT/anGPT scales: s_q/s_k,
# s_u/s_v, the blocks' alpha_attn/alpha_mlp and the logit scale s_z.
_SCALE_HOLDERS = (Attention, MLP, NGPTBlock, ANGPTBlock, Model)


def _own_arrays(module: nn.Module) -> list[str]:
    return [k for k, v in module.items() if isinstance(v, mx.array) and not k.startswith("_")]


def _norm_keys(model: nn.Module, which: str):
    """``(path, module, own parameter names)`` of the ``norms`` mode's parameters."""
    if which not in NORM_PARAMS:
        raise ValueError(f"norm_params must be one of {list(NORM_PARAMS)}, got {which!r}")
    for path, module in model.named_modules():
        if isinstance(module, NORM_TYPES):
            keys = [k for k in _own_arrays(module) if which == "all" or k in _SUBSETS[which]]
        elif isinstance(module, _SCALE_HOLDERS):
            keys = _own_arrays(module)
        else:
            continue
        if keys:
            yield path, module, keys


def norm_parameter_names(model: nn.Module, which: str = "all") -> list[str]:
    """Full names (as in ``tree_flatten(model.parameters())``) of the ``norms`` mode's
    parameters: those of the :data:`NORM_TYPES` layers (``which="gains"``: only their
    ``weight`` and ``bias``; ``"weight"``: only their ``weight``) and the nGPT/anGPT scale
    vectors."""
    return sorted(f"{path}.{k}" if path else k for path, _, keys in _norm_keys(model, which)
                  for k in keys)


def check_lora_parameters(rank: Any, scale: Any, dropout: Any) -> dict[str, Any]:
    """mlx-lm's ``lora_parameters`` after checking each value."""
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not (
            0 <= dropout < 1):
        raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
    return {"rank": rank, "scale": float(scale), "dropout": float(dropout)}


def apply_mode(model: nn.Module, mode: str, num_layers: int | None = None,
               lora_parameters: dict[str, Any] | None = None,
               norm_params: str = "all") -> dict[str, Any]:
    """Make only ``mode``'s parameters trainable (adding LoRA/DoRA layers); return the
    adapter config that :func:`save_adapter` writes and ``mlx_lm.load`` reads.

    ``num_layers``: LoRA/DoRA on the last this many blocks (default: all); ``lora_parameters``:
    ``rank``, ``scale`` (mlx-lm's name for ``alpha / rank``) and ``dropout``; ``norm_params``:
    see :func:`norm_parameter_names`.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
    blocks = len(model.layers)
    if mode not in ("lora", "dora") and (num_layers is not None or lora_parameters):
        raise ValueError(f"num_layers and the LoRA parameters apply to lora and dora only, "
                         f"got them for mode {mode!r}")
    if mode != "norms" and norm_params != "all":
        raise ValueError(f"norm_params applies to mode 'norms' only, got {norm_params!r} for "
                         f"mode {mode!r}")
    if num_layers is None:
        num_layers = blocks
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or not (
            1 <= num_layers <= blocks):
        raise ValueError(f"num_layers must be an int in [1, {blocks}] (the model's blocks), "
                         f"got {num_layers!r}")
    model.freeze()
    config: dict[str, Any] = {"fine_tune_type": mode, "localnorm_mode": mode,
                              "num_layers": num_layers}
    if mode in ("lora", "dora"):
        params = check_lora_parameters(**{**LORA_DEFAULTS, **(lora_parameters or {})})
        linear_to_lora_layers(model, num_layers, params, use_dora=mode == "dora")
        config["lora_parameters"] = params
    elif mode == "norms":
        if not norm_parameter_names(model, norm_params):
            raise ValueError(f"mode 'norms': {type(model).__name__} has no norm layer of a "
                             f"known type ({', '.join(t.__name__ for t in NORM_TYPES)})")
        for _, module, keys in _norm_keys(model, norm_params):
            module.unfreeze(recurse=False, keys=keys)
        config.update(fine_tune_type="full", norm_params=norm_params)
    else:
        model.unfreeze()
    return config


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)``: ``total`` counts the base model without LoRA/DoRA layers, a
    quantized weight by its unpacked size (as mlx-lm's ``get_total_parameters``, plus the
    vectors held by modules that have children, such as the nGPT scales, which it misses)."""
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    held = sum(module[k].size for _, module in model.named_modules()
               if _has_children(module) and not hasattr(module, "fuse")
               for k in _own_arrays(module))
    return trainable, get_total_parameters(model) + held


def _has_children(module: nn.Module) -> bool:
    return bool(tree_flatten(module.children(), is_leaf=lambda m: isinstance(m, nn.Module)))


def save_adapter(model: nn.Module, config: dict[str, Any], path: str | Path) -> Path:
    """Write the trainable parameters and ``config`` as an mlx-lm adapter directory.

    Each file is written under a temporary name in ``path`` and renamed into place.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.trainable_parameters()))
    tmp = path / f".{ADAPTER_WEIGHTS}.tmp.safetensors"
    mx.save_safetensors(str(tmp), weights)
    os.replace(tmp, path / ADAPTER_WEIGHTS)
    tmp = path / f".{ADAPTER_CONFIG}.tmp"
    tmp.write_text(json.dumps(config, indent=4, sort_keys=True))
    os.replace(tmp, path / ADAPTER_CONFIG)
    return path


def load_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Apply the adapter in ``path`` to ``model`` as ``mlx_lm.load(adapter_path=...)`` does.

    Raises a one-line ``ValueError`` when it does not fit the model: a tensor the model does
    not have or of another shape (mlx-lm's check), or, for LoRA/DoRA, adapter tensors missing
    (mlx-lm would silently keep their initial values). ``model`` may be half-changed then.
    """
    path = Path(path)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (path / name).is_file():
            raise FileNotFoundError(f"adapter_path: {path / name} does not exist (an adapter "
                                    f"directory holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    try:
        config = json.loads((path / ADAPTER_CONFIG).read_text())
        load_adapters(model, str(path))
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"adapter {path} does not fit this {type(model).__name__}: "
                         f"{' '.join(str(err).split())}") from None
    if config.get("fine_tune_type", "lora") != "full":
        saved = set(mx.load(str(path / ADAPTER_WEIGHTS)))
        missing = sorted(set(_lora_parameter_names(model)) - saved)
        if missing:
            raise ValueError(f"adapter {path} does not fit this {type(model).__name__}: it "
                             f"lacks {len(missing)} adapter tensors, e.g. {missing[0]}")
    return model


def _lora_parameter_names(model: nn.Module) -> list[str]:
    """The parameters the LoRA/DoRA layers add (their own arrays, not the wrapped Linear's)."""
    return [f"{path}.{k}" for path, module in model.named_modules() if hasattr(module, "fuse")
            for k in _own_arrays(module)]


def fuse_adapters(model: nn.Module, dequantize: bool = False) -> nn.Module:
    """Replace every LoRA/DoRA layer by the Linear it equals (mlx-lm's ``fuse``), in place.

    ``dequantize``: fuse into a full-precision Linear even when the base was quantized.
    """
    fused = [(name, module.fuse(dequantize=dequantize))
             for name, module in model.named_modules() if hasattr(module, "fuse")]
    if fused:
        model.update_modules(tree_unflatten(fused))
    return model
