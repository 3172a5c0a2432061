"""``save_model``: write a directory that mlx-lm's own ``load`` reads.

mlx-lm 0.32 resolves ``mlx_lm.models.<model_type>`` unless config.json names a
``model_file``: then ``load(path, trust_remote_code=True)`` (CLI: ``--trust-remote-code``)
executes that file and takes its ``Model`` and ``ModelArgs``. Ours is a two-line shim that
imports them from this package, so the package must be installed where the model is loaded.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from pathlib import Path

from mlx_lm.utils import save_config
from mlx_lm.utils import save_model as save_weights

from .localnorm import Model

MODEL_FILE = "localnorm_model.py"
_MODEL_FILE_SOURCE = '''"""LocalNorm transformer for mlx-lm: load with trust_remote_code=True (needs mlx-localnorm)."""

import os

# mlx-lm imported MLX already, too late to swap its CPU BLAS: skip the attempt and its warning.
os.environ.setdefault("MLX_LOCALNORM_FAST_BLAS", "0")

from mlx_localnorm.models import Model, ModelArgs  # noqa: E402, F401
'''


def save_model(model: Model, tokenizer, path: str | Path) -> Path:
    """Write config.json, model.safetensors, tokenizer files and the model file to ``path``.

    ``tokenizer`` is a Hugging Face tokenizer or mlx-lm ``TokenizerWrapper`` (anything with
    ``save_pretrained``). The directory is assembled beside ``path`` and renamed into place,
    replacing an existing one, so a crash never leaves a half-written model. Load it with
    ``mlx_lm.load(path, trust_remote_code=True)``.
    """
    if not isinstance(model, Model):
        raise TypeError(f"save_model: model must be an mlx_localnorm Model, got "
                        f"{type(model).__name__} (save mlx-lm models with mlx_lm.utils.save)")
    if not hasattr(tokenizer, "save_pretrained"):
        raise TypeError(f"save_model: tokenizer must have save_pretrained (a Hugging Face "
                        f"tokenizer or TokenizerWrapper), got {type(tokenizer).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        save_weights(staging, model)
        # None means "default": leave it out (transformers warns on some null keys).
        config = {k: v for k, v in dataclasses.asdict(model.args).items() if v is not None}
        config["model_file"] = MODEL_FILE
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is not None:
            config["eos_token_id"] = eos
        save_config(config, staging / "config.json")
        tokenizer.save_pretrained(str(staging))
        (staging / MODEL_FILE).write_text(_MODEL_FILE_SOURCE)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
            path.rename(old / path.name)
            staging.rename(path)
            shutil.rmtree(old)
        else:
            staging.rename(path)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return path
