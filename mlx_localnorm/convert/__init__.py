"""Hugging Face and mlx-lm checkpoints -> LocalNorm models (``from_hf``), exact when no norm is
swapped; ``calibrate`` fits swapped norms to the source's on sample text."""

from .architectures import SUPPORTED_MODEL_TYPES
from .calibrate import calibrate
from .hf import from_hf

__all__ = ["SUPPORTED_MODEL_TYPES", "calibrate", "from_hf"]
