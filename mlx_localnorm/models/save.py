"""``save_model``: write a directory that mlx-lm's own ``load`` reads.

mlx-lm 0.32 resolves ``mlx_lm.models.<model_type>`` unless config.json names a
``model_file``: then ``load(path, trust_remote_code=True)`` (CLI: ``--trust-remote-code``)
executes that file and takes its ``Model`` and ``ModelArgs``. Ours is a short shim that
imports them from this package, so the package must be installed where the model is loaded.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from pathlib import Path

import mlx.nn as nn
from mlx_lm.utils import save_config
from mlx_lm.utils import save_model as save_weights

from .localnorm import Model
from .quantized import quantization_config
from .swap import to_localnorm

MODEL_FILE = "localnorm_model.py"
# Lists the files save_model wrote: a directory holding only these may be replaced.
MANIFEST = ".localnorm-saved"
_STAGING = ".localnorm-staging-"
_ASIDE = ".localnorm-old"
_MODEL_FILE_SOURCE = '''"""LocalNorm transformer for mlx-lm: load with trust_remote_code=True (needs mlx-localnorm)."""

import warnings

# mlx-lm imported MLX already, too late to swap its CPU BLAS: silence only that warning
# (setting MLX_LOCALNORM_FAST_BLAS here would leak into every process started later).
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="mlx_localnorm: mlx.core was imported before")
    from mlx_localnorm.models import Model, ModelArgs  # noqa: F401
    from mlx_localnorm.models.transformers_config import register

register()  # before mlx-lm reads the tokenizer through transformers' AutoTokenizer
'''


def save_model(model: nn.Module, tokenizer, path: str | Path, *,
               overwrite: bool = False) -> Path:
    """Write config.json, model.safetensors, tokenizer files and the model file to ``path``.

    ``model`` is a LocalNorm :class:`Model` (quantized or not: config.json then records each
    layer's quantization as mlx-lm does) or an mlx-lm model changed by ``swap_norms``, saved
    as the LocalNorm model with the same weights and outputs.
    ``tokenizer`` is a Hugging Face tokenizer or mlx-lm ``TokenizerWrapper`` (anything with
    ``save_pretrained``). ``path`` must be missing, empty or a model saved here before;
    anything else (a file, a run directory, a model with files added) is replaced only with
    ``overwrite=True``. The model is written beside ``path``; the old one is renamed aside,
    the new one renamed in, then the old one deleted. A save killed in between leaves the
    old model aside, and the next save to ``path`` restores it before starting. Load the
    result with ``mlx_lm.load(path, trust_remote_code=True)``.
    """
    if not isinstance(model, Model):
        if getattr(model, "swapped_norms", None) is None:
            raise TypeError(f"save_model: model must be an mlx_localnorm Model or an mlx-lm "
                            f"model changed by swap_norms, got {type(model).__name__} (save "
                            "other mlx-lm models with mlx_lm.utils.save)")
        model = to_localnorm(model)
    if not hasattr(tokenizer, "save_pretrained"):
        raise TypeError(f"save_model: tokenizer must have save_pretrained (a Hugging Face "
                        f"tokenizer or TokenizerWrapper), got {type(tokenizer).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _recover(path)
    if not overwrite:
        _check_replaceable(path)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}{_STAGING}", dir=path.parent))
    try:
        _write(model, tokenizer, staging)
        _move_into_place(staging, path)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return path


def _write(model: Model, tokenizer, directory: Path) -> None:
    save_weights(directory, model)
    # None means "default": leave it out (transformers warns on some null keys).
    config = {k: v for k, v in dataclasses.asdict(model.args).items() if v is not None}
    config["model_file"] = MODEL_FILE
    quantization = quantization_config(model)
    if quantization is not None:  # both keys, as mlx_lm.utils.quantize_model writes them
        config["quantization"] = config["quantization_config"] = quantization
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None:
        config["eos_token_id"] = eos
    save_config(config, directory / "config.json")
    tokenizer.save_pretrained(str(directory))
    (directory / MODEL_FILE).write_text(_MODEL_FILE_SOURCE)
    names = sorted(p.name for p in directory.iterdir())
    (directory / MANIFEST).write_text("\n".join(names) + "\n")


def _aside(path: Path) -> Path:
    return path.with_name(f".{path.name}{_ASIDE}")


def _move_into_place(staging: Path, path: Path) -> None:
    """Rename ``staging`` to ``path``; an old ``path`` goes aside first and is deleted last."""
    if not os.path.lexists(path):
        os.rename(staging, path)
        return
    aside = _aside(path)
    os.rename(path, aside)
    try:
        os.rename(staging, path)
    except BaseException:
        os.rename(aside, path)
        raise
    _remove(aside)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _recover(path: Path) -> None:
    """Undo what a killed save left: stale staging directories, an old model moved aside."""
    staging = f".{path.name}{_STAGING}"
    for stale in path.parent.iterdir():
        if stale.name.startswith(staging):
            shutil.rmtree(stale)
    aside = _aside(path)
    if os.path.lexists(aside):
        if os.path.lexists(path):  # killed after the new model was in place
            _remove(aside)
        else:  # killed between the renames: the old model comes back
            os.rename(aside, path)


def _check_replaceable(path: Path) -> None:
    """Refuse to replace anything but nothing, an empty directory or a model saved here."""
    if not os.path.lexists(path):
        return
    if not path.is_dir():
        raise ValueError(f"save_model: path {str(path)!r} is a file, not a model directory; "
                         "pass overwrite=True to replace it")
    found = {p.name for p in path.iterdir()}
    manifest = path / MANIFEST
    ours = {MANIFEST, *manifest.read_text().splitlines()} if manifest.is_file() else set()
    unknown = sorted(found - ours)
    if unknown:
        raise ValueError(
            f"save_model: path {str(path)!r} is not empty and not a model saved by save_model "
            f"(it holds {', '.join(unknown[:5])}{', ...' if len(unknown) > 5 else ''}); "
            "choose another path or pass overwrite=True to replace it")
