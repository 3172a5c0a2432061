"""The LocalNorm transformer (mlx-lm model interface), norm swapping and saving for mlx-lm."""

from .args import ModelArgs
from .localnorm import Model
from .save import save_model
from .swap import swap_norms, to_localnorm

__all__ = ["Model", "ModelArgs", "save_model", "swap_norms", "to_localnorm"]
