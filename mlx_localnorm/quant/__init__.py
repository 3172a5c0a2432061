"""Quantization-aware training: MLX's quantization grids as differentiable layers, exported
as the real ``nn.QuantizedLinear``/``nn.QuantizedEmbedding`` model mlx-lm loads."""

from .fake import (MODES, check_quantization, fake_quantize, fake_quantize_learned,
                   pack_affine, representable_range)

__all__ = ["MODES", "check_quantization", "fake_quantize", "fake_quantize_learned",
           "pack_affine", "representable_range"]
