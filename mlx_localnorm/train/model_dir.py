"""Read and write the model directories fine-tuning starts from and fuses into.

Any directory ``mlx_lm.load`` reads works: the package's saved models and runs, converted
checkpoints, mlx-lm models. Nothing is downloaded: a path that does not exist is an error.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlx.nn as nn

from ..models import Model, save_model
from ..models.save import _MODEL_FILE_SOURCE, MODEL_FILE


def _is_our_model_file(path: Path) -> bool:
    """True when ``path`` names the model file ``save_model`` writes, unchanged: it only
    imports this package, so loading it needs no ``--trust-remote-code``."""
    try:
        return (path / MODEL_FILE).read_text() == _MODEL_FILE_SOURCE
    except OSError:
        return False


def load_model_dir(model_dir: str | Path, trust_remote_code: bool = False,
                   what: str = "--model") -> tuple[nn.Module, Any, dict[str, Any]]:
    """``(model, tokenizer, config)`` from ``mlx_lm.load``; ``what`` names the argument in
    errors. A directory mlx-lm cannot read raises a one-line ``ValueError`` (``OSError`` if
    it does not exist)."""
    from mlx_lm import load

    path = Path(model_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"{what}: model directory {path} does not exist")
    if not (path / "config.json").is_file():
        raise ValueError(f"{what}: {path} is not a model directory mlx_lm.load can read "
                         "(it has no config.json)")
    trust = trust_remote_code or _is_our_model_file(path)
    try:
        model, tokenizer, config = load(str(path), return_config=True, trust_remote_code=trust)
    except (ValueError, KeyError, TypeError, OSError) as err:
        raise ValueError(f"{what}: mlx_lm.load cannot read {path}: "
                         f"{' '.join(str(err).split())}") from None
    return model, tokenizer, config


def save_model_dir(model: nn.Module, tokenizer, config: dict[str, Any],
                   source_dir: str | Path, out: str | Path) -> Path:
    """Save ``model`` (loaded from ``source_dir``) to ``out`` so ``mlx_lm.load`` reads it.

    A LocalNorm model goes through :func:`mlx_localnorm.models.save_model` (which replaces
    only an earlier saved model); any other through ``mlx_lm.utils.save`` into a staging
    directory renamed to ``out``, which must be missing or empty.
    """
    out = Path(out)
    if isinstance(model, Model):
        return save_model(model, tokenizer, out)
    from mlx_lm.utils import save

    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out: {out} exists and is not an empty directory; choose another "
                         "path or delete it")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    try:
        save(staging, source_dir, model, tokenizer, config, donate_model=False)
        if out.exists():
            out.rmdir()
        os.rename(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return out
