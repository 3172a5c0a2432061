"""``from_hf``: a local Hugging Face checkpoint directory -> LocalNorm ``Model`` and tokenizer.

Tensors stream shard by shard: each safetensors file is read, renamed, checked and placed in
the model before the next is opened, so memory holds the model plus one shard. Nothing is
written to disk.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.utils import infer_quant_config
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.tokenizer_utils import load as load_tokenizer

from ..models import Model, ModelArgs
from .architectures import ARCHITECTURES, SUPPORTED_MODEL_TYPES, TensorMap, is_buffer
from .swap import check_swap, swap_model_norms

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# Files a Hugging Face tokenizer is read from (fast tokenizer, sentencepiece, GPT-2 BPE).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def from_hf(path: str | Path, norm: str | None = None, placement: str | None = None,
            dtype: str = "float32") -> tuple[Model, TokenizerWrapper]:
    """Read the Hugging Face checkpoint in directory ``path`` as a LocalNorm :class:`Model`.

    ``path`` holds config.json (``model_type`` one of ``SUPPORTED_MODEL_TYPES``), the weights
    (model.safetensors, or shards listed by model.safetensors.index.json) and the tokenizer
    files. A directory written by mlx-lm (``mlx_lm.convert``, quantized or not) reads the
    same way; a quantized one stays quantized (the same packed weights, scales and biases;
    norms are never quantized). With ``norm=None, placement=None`` the model computes the
    source's function (float32 logits equal ``transformers``' within 1e-4).
    ``norm``/``placement`` swap the norms afterwards as :func:`~mlx_localnorm.swap_norms`
    does: gains carry over where the new norms sit where the old ones did (not calibrated:
    see :func:`calibrate`). ``dtype``: the dtype of the float weights (and of quantization
    scales and biases).
    """
    path = _check_directory(path)
    if dtype not in DTYPES:
        raise ValueError(f"from_hf: dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    check_swap(norm, placement)
    raw = _read_config(path)
    make_args, tensor_map = ARCHITECTURES[raw["model_type"]]
    model = Model(ModelArgs(**make_args(_transformers_config(path))))
    shards = _shards(path)
    quantization = _quantization(raw, path)
    if quantization is not None:
        _quantize_as_saved(model, shards, tensor_map, quantization)
    _load_weights(model, shards, tensor_map, DTYPES[dtype])
    tokenizer = _tokenizer(path, raw)
    if norm is not None or placement is not None:
        model = swap_model_norms(model, norm, placement)
        model.set_dtype(DTYPES[dtype])  # the new norms' fresh parameters
    return model, tokenizer


def _check_directory(path) -> Path:
    if not isinstance(path, (str, Path)):
        raise TypeError(f"from_hf: path must be a str or Path, got {type(path).__name__}")
    path = Path(path)
    if not path.is_dir():
        what = "is not a directory" if path.exists() else "does not exist"
        raise ValueError(f"from_hf: path {str(path)!r} {what}; expected a Hugging Face "
                         "checkpoint directory (config.json, *.safetensors, tokenizer files)")
    return path


def _read_config(path: Path) -> dict:
    file = path / "config.json"
    if not file.is_file():
        raise ValueError(f"from_hf: {str(path)!r} has no config.json")
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"from_hf: {str(file)!r} is not valid JSON: {error}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"from_hf: {str(file)!r} must hold a JSON object, got "
                         f"{type(raw).__name__}")
    model_type = raw.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ValueError(f"from_hf: model_type must be one of {', '.join(SUPPORTED_MODEL_TYPES)};"
                         f" {str(file)!r} has {model_type!r}")
    return raw


def _quantization(raw: dict, path: Path) -> dict | None:
    """mlx-lm's quantization entry (None: a float checkpoint); other formats are refused."""
    entry = raw.get("quantization", raw.get("quantization_config"))
    if entry is None or (isinstance(entry, dict) and "group_size" in entry and "bits" in entry):
        return entry
    method = entry.get("quant_method") if isinstance(entry, dict) else None
    raise ValueError(f"from_hf: {str(path)!r} is quantized by {method!r}; only float "
                     "checkpoints and mlx-lm quantized ones (config.json 'quantization' "
                     "with 'group_size' and 'bits') convert")


def _quantize_as_saved(model: Model, shards: list[Path], tensor_map: TensorMap,
                       quantization: dict) -> None:
    """Quantize the layers the checkpoint stores quantized, as ``mlx_lm.utils.load_model`` does.

    Each layer with ``scales`` takes its config.json entry, else the group size, bits and
    mode its packed shapes imply. Tensors are mapped lazily: nothing is read here.
    """
    tensors = {}
    for shard in shards:
        for name, value in mx.load(str(shard)).items():
            if not is_buffer(name):
                tensors.update(tensor_map(name, value))

    def predicate(path: str, module: nn.Module):
        if path in quantization:
            return quantization[path]
        if not hasattr(module, "to_quantized") or f"{path}.scales" not in tensors:
            return False
        return infer_quant_config(path, module, tensors)

    nn.quantize(model, quantization["group_size"], quantization["bits"],
                mode=quantization.get("mode", "affine"), class_predicate=predicate)


def _transformers_config(path: Path):
    """transformers' config object: the architecture's defaults filled in, rope keys unified."""
    from transformers import AutoConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoConfig.from_pretrained(str(path))


def _shards(path: Path) -> list[Path]:
    """The safetensors files, all checked to exist before any is read."""
    index = path / INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"from_hf: {str(index)!r} must have a non-empty 'weight_map'")
        shards = [path / name for name in sorted(set(weight_map.values()))]
        missing = [s.name for s in shards if not s.is_file()]
        if missing:
            raise ValueError(f"from_hf: {str(index)!r} names shard(s) {', '.join(missing)} "
                             f"that are not in {str(path)!r}")
        return shards
    if (path / SINGLE).is_file():
        return [path / SINGLE]
    raise ValueError(f"from_hf: {str(path)!r} has no weights: expected {SINGLE} or {INDEX} "
                     "with its shards")


def _load_weights(model: Model, shards: list[Path], tensor_map: TensorMap,
                  dtype: mx.Dtype) -> None:
    """Place every tensor of ``shards`` in ``model``; each name, shape and tensor is checked.

    The model's own random init is never evaluated: every parameter is replaced first.
    """
    expected = {name: tuple(p.shape) for name, p in tree_flatten(model.parameters())}
    tied = model.args.tie_word_embeddings
    found = set()
    for shard in shards:
        weights = {}
        for name, value in mx.load(str(shard)).items():
            if is_buffer(name) or (tied and name == "lm_head.weight"):
                continue
            for target, tensor in tensor_map(name, value).items():
                _check_tensor(shard, name, target, tuple(tensor.shape), expected)
                # Packed quantized weights are integers: only floats take the dtype.
                floating = mx.issubdtype(tensor.dtype, mx.floating)
                weights[target] = tensor.astype(dtype) if floating else tensor
        model.load_weights(list(weights.items()), strict=False)
        mx.eval(list(weights.values()))
        found |= weights.keys()
    missing = sorted(set(expected) - found)
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ValueError(f"from_hf: the checkpoint is missing tensor(s) "
                         f"{', '.join(missing[:3])}{more} (LocalNorm names)")


def _check_tensor(shard: Path, name: str, target: str, shape: tuple, expected: dict) -> None:
    if target not in expected:
        raise ValueError(f"from_hf: {shard.name} has tensor {name!r}, which this "
                         f"architecture does not have (as {target!r})")
    if shape != expected[target]:
        raise ValueError(f"from_hf: tensor {name!r} in {shard.name} has shape {shape}, but "
                         f"config.json makes {target!r} {expected[target]}")


def _tokenizer(path: Path, raw: dict) -> TokenizerWrapper:
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(f"from_hf: {str(path)!r} has no tokenizer (one of "
                         f"{', '.join(TOKENIZER_FILES)})")
    eos = raw.get("eos_token_id")
    return load_tokenizer(path, eos_token_ids=[eos] if isinstance(eos, int) else eos)
