"""Quantization-aware training: MLX's quantization grids as differentiable layers, exported
as the real ``nn.QuantizedLinear``/``nn.QuantizedEmbedding`` model mlx-lm loads."""

from .fake import (MODES, check_quantization, fake_quantize, fake_quantize_learned,
                   mse_scales_biases, pack_affine, representable_range)
from .layers import (FakeQuantized, QATEmbedding, QATLinear, QATSwitchLinear, export,
                     prepare_qat, qat_layers)
from .save import save

__all__ = ["MODES", "FakeQuantized", "QATEmbedding", "QATLinear", "QATSwitchLinear",
           "check_quantization", "export", "fake_quantize", "fake_quantize_learned",
           "mse_scales_biases", "pack_affine", "prepare_qat", "qat_layers",
           "representable_range", "save"]
