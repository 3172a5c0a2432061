"""Hugging Face and mlx-lm checkpoints -> LocalNorm models (``from_hf``), exact when no norm is
swapped; ``calibrate`` fits swapped norms to the source's on sample text, ``heal`` fine-tunes
them, ``export_hf`` writes RMSNorm/LayerNorm Pre-LN models back as Hugging Face checkpoints."""

from .architectures import SUPPORTED_MODEL_TYPES
from .calibrate import calibrate
from .export import export_hf
from .heal import heal
from .hf import from_hf

__all__ = ["SUPPORTED_MODEL_TYPES", "calibrate", "export_hf", "from_hf", "heal"]
