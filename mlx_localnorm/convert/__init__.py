"""Hugging Face checkpoints -> LocalNorm models (``from_hf``), exact when no norm is swapped."""

from .architectures import SUPPORTED_MODEL_TYPES
from .hf import from_hf

__all__ = ["SUPPORTED_MODEL_TYPES", "from_hf"]
