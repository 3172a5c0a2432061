"""QAT layers: ``nn.Linear``/``nn.Embedding``/mlx-lm ``SwitchLinear`` computing with
fake-quantized weights, swapped in by ``prepare_qat`` and out by ``export``."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_unflatten
from mlx_lm.models.switch_layers import SwitchLinear

from .fake import affine_codes, check_quantization, fake_quantize, fake_quantize_learned, \
    mse_scales_biases, pack_affine

SCALE_INITS = ("minmax", "mse")


class FakeQuantized:
    """Mixin: the layer's float ``weight`` is the master copy; it computes with
    ``quantized_weight()``, MLX's grid of it (fixed scales, recomputed from the weight at
    every call as ``mx.quantize`` does) or the affine grid with learned per-group ``scales``
    and ``biases`` (LSQ, arXiv 1902.08153; initialized from ``mx.quantize``, or
    ``mse_scales_biases`` with ``scale_init="mse"``)."""

    def _set_quantization(self, group_size: int, bits: int, mode: str, clip: bool,
                          learn_scales: bool, scale_init: str = "minmax") -> None:
        group_size, bits = check_quantization(group_size, bits, mode, type(self).__name__)
        self.group_size, self.bits, self.mode, self.clip = group_size, bits, mode, clip
        if learn_scales:
            if mode != "affine":  # the float modes' scales are powers of two / fp8 codes
                raise ValueError(f"prepare_qat: learn_scales needs mode='affine', got {mode!r}")
            if scale_init == "mse":
                self.scales, self.biases = mse_scales_biases(self.weight, group_size, bits)
            else:
                _, self.scales, self.biases = mx.quantize(self.weight, group_size, bits)

    @property
    def learns_scales(self) -> bool:
        return "scales" in self

    def quantized_weight(self, rows=None) -> mx.array:
        """The weight the exported layer computes with (only ``rows`` of it, if given)."""
        pick = (lambda a: a) if rows is None else (lambda a: a[rows])
        if self.learns_scales:
            return fake_quantize_learned(pick(self["weight"]), pick(self["scales"]),
                                         pick(self["biases"]), self.group_size, self.bits)
        return fake_quantize(pick(self["weight"]), self.group_size, self.bits, self.mode,
                             clip=self.clip)

    def _float_twin(self) -> nn.Module:
        raise NotImplementedError

    def to_quantized(self) -> nn.Module:
        """The real quantized layer (``nn.QuantizedLinear`` etc.) with the same grid."""
        quantized = self._float_twin().to_quantized(group_size=self.group_size,
                                                    bits=self.bits, mode=self.mode)
        if self.learns_scales:
            codes = mx.round(affine_codes(self["weight"], self["scales"], self["biases"],
                                          self.group_size, self.bits))
            codes = np.array(codes.astype(mx.uint32)).reshape(self["weight"].shape)
            quantized.weight = mx.array(pack_affine(codes, self.bits))
            quantized.scales, quantized.biases = self["scales"], self["biases"]
        return quantized

    def _describe(self) -> str:
        extra = ", learned scales" if self.learns_scales else (", clip" if self.clip else "")
        return f"group_size={self.group_size}, bits={self.bits}, mode={self.mode!r}{extra}"


class QATLinear(FakeQuantized, nn.Linear):
    """``y = x W_hat^T + b`` with ``W_hat`` the fake-quantized weight."""

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int, bits: int, mode: str = "affine",
                    clip: bool = False, learn_scales: bool = False,
                    scale_init: str = "minmax") -> QATLinear:
        out_dims, in_dims = linear.weight.shape
        layer = cls(in_dims, out_dims, bias="bias" in linear)
        layer.update(linear.parameters())
        layer._set_quantization(group_size, bits, mode, clip, learn_scales, scale_init)
        return layer

    def __call__(self, x: mx.array) -> mx.array:
        w = self.quantized_weight()
        return mx.addmm(self["bias"], x, w.T) if "bias" in self else x @ w.T

    def _float_twin(self) -> nn.Linear:
        out_dims, in_dims = self.weight.shape
        twin = nn.Linear(in_dims, out_dims, bias="bias" in self)
        twin.update({k: self[k] for k in ("weight", "bias") if k in self})
        return twin

    def _extra_repr(self) -> str:
        return f"{super()._extra_repr()}, {self._describe()}"


class QATEmbedding(FakeQuantized, nn.Embedding):
    """Rows of the fake-quantized table (groups run along a row, so quantizing the rows
    looked up equals looking up the quantized table); ``as_linear`` for tied heads.

    As ``nn.QuantizedEmbedding``, the float modes return bfloat16 rows (``mx.dequantize``'s
    default there), so the rest of the model runs in bfloat16 as it will once exported.
    """

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, group_size: int, bits: int,
                       mode: str = "affine", clip: bool = False,
                       learn_scales: bool = False, scale_init: str = "minmax") -> QATEmbedding:
        layer = cls(*embedding.weight.shape)
        layer.weight = embedding.weight
        layer._set_quantization(group_size, bits, mode, clip, learn_scales, scale_init)
        return layer

    def __call__(self, x: mx.array) -> mx.array:
        rows = self.quantized_weight(rows=x)
        return rows if self.mode == "affine" else rows.astype(mx.bfloat16)

    def as_linear(self, x: mx.array) -> mx.array:
        return x @ self.quantized_weight().T

    def _float_twin(self) -> nn.Embedding:
        twin = nn.Embedding(*self.weight.shape)
        twin.weight = self.weight
        return twin

    def _extra_repr(self) -> str:
        return f"{super()._extra_repr()}, {self._describe()}"


class QATSwitchLinear(FakeQuantized, SwitchLinear):
    """mlx-lm's MoE expert bank (``[experts, out, in]``) with fake-quantized experts."""

    @classmethod
    def from_switch(cls, switch: SwitchLinear, group_size: int, bits: int,
                    mode: str = "affine", clip: bool = False,
                    learn_scales: bool = False, scale_init: str = "minmax") -> QATSwitchLinear:
        experts, out_dims, in_dims = switch.weight.shape
        layer = cls(in_dims, out_dims, experts, bias="bias" in switch)
        layer.update(switch.parameters())
        layer._set_quantization(group_size, bits, mode, clip, learn_scales, scale_init)
        return layer

    def __call__(self, x, indices, sorted_indices=False):
        x = mx.gather_mm(x, self.quantized_weight().swapaxes(-1, -2), rhs_indices=indices,
                         sorted_indices=sorted_indices)
        return x + mx.expand_dims(self["bias"][indices], -2) if "bias" in self else x

    def _float_twin(self) -> SwitchLinear:
        experts, out_dims, in_dims = self.weight.shape
        twin = SwitchLinear(in_dims, out_dims, experts, bias="bias" in self)
        twin.update({k: self[k] for k in ("weight", "bias") if k in self})
        return twin


# float layer type -> (QAT type, its constructor)
_SWAPS = {
    nn.Linear: (QATLinear, QATLinear.from_linear),
    nn.Embedding: (QATEmbedding, QATEmbedding.from_embedding),
    SwitchLinear: (QATSwitchLinear, QATSwitchLinear.from_switch),
}


def _layer_settings(choice, group_size: int, bits: int, mode: str) -> dict:
    """A predicate's answer (True or a ``to_quantized`` dict, as mlx-lm's) -> the settings."""
    if choice is True:
        return {"group_size": group_size, "bits": bits, "mode": mode}
    if not isinstance(choice, dict) or set(choice) - {"group_size", "bits", "mode"}:
        raise ValueError(f"prepare_qat: the quantization predicate must return a bool or a "
                         f"dict of group_size/bits/mode, got {choice!r}")
    # as nn.quantize: a dict is passed to to_quantized, whose mode defaults to affine
    layer_mode = choice.get("mode", "affine")
    layer_group, layer_bits = check_quantization(choice.get("group_size"), choice.get("bits"),
                                                 layer_mode, "prepare_qat")
    return {"group_size": layer_group, "bits": layer_bits, "mode": layer_mode}


def prepare_qat(model: nn.Module, bits: int | None = None, group_size: int | None = None,
                mode: str = "affine", *, embeddings: bool = False, learn_scales: bool = False,
                scale_init: str = "minmax", clip: bool = False, train_others: bool = True,
                predicate=None) -> nn.Module:
    """Swap ``model``'s ``nn.Linear`` (and ``SwitchLinear``; ``nn.Embedding`` if
    ``embeddings``) layers for fake-quantized ones, in place; returns ``model``.

    The layers chosen are those ``mlx_lm.utils.quantize_model`` quantizes: the last axis a
    multiple of ``group_size``, and ``predicate(path, module)`` (default: the model's
    ``quant_predicate``, e.g. MoE routers at 8 bits) True or a dict of per-layer settings.
    Only exact ``nn.Linear``/``nn.Embedding`` are swapped (a subclass keeps its own call).
    Everything else (norms, biases, gates, other vectors) keeps its dtype and stays
    trainable unless ``train_others=False`` (then only the quantized weights and learned
    scales train). ``bits``/``group_size`` ``None``: the mode's default (affine: 4 and 64).
    Learned scales start from ``mx.quantize``'s min-max grid (``scale_init="minmax"``) or
    from each group's least-squared-error range (``"mse"``, :func:`mse_scales_biases`).
    """
    group_size, bits = check_quantization(group_size, bits, mode, "prepare_qat")
    for name, flag in (("embeddings", embeddings), ("learn_scales", learn_scales),
                       ("clip", clip), ("train_others", train_others)):
        if flag not in (True, False):
            raise TypeError(f"prepare_qat: {name} must be True or False, got {flag!r}")
    if learn_scales and mode != "affine":
        raise ValueError(f"prepare_qat: learn_scales needs mode='affine', got {mode!r}")
    if scale_init not in SCALE_INITS:
        raise ValueError(f"prepare_qat: scale_init must be one of {SCALE_INITS}, got "
                         f"{scale_init!r}")
    if scale_init != "minmax" and not learn_scales:
        raise ValueError(f"prepare_qat: scale_init={scale_init!r} needs learn_scales=True (the "
                         "fixed grid is mx.quantize's)")
    predicate = predicate or getattr(model, "quant_predicate", None)
    swaps = []
    for path, module in model.named_modules():
        kind = type(module)
        if kind not in _SWAPS or (kind is nn.Embedding and not embeddings):
            continue
        if module.weight.shape[-1] % group_size:
            continue
        choice = predicate(path, module) if predicate is not None else True
        if choice is False:
            continue
        settings = _layer_settings(choice, group_size, bits, mode)
        swaps.append((path, _SWAPS[kind][1](module, **settings, clip=clip,
                                            learn_scales=learn_scales, scale_init=scale_init)))
    model.update_modules(tree_unflatten(swaps))
    if not train_others:
        model.freeze()
        for _, layer in swaps:
            layer.unfreeze(keys=["weight", "scales", "biases"], strict=False)
    return model


def qat_layers(model: nn.Module) -> dict[str, FakeQuantized]:
    """``{path: layer}`` of every fake-quantized layer of ``model``."""
    return {path: m for path, m in model.named_modules() if isinstance(m, FakeQuantized)}


def export(model: nn.Module) -> nn.Module:
    """Replace every fake-quantized layer by the real quantized layer (``nn.QuantizedLinear``,
    ``nn.QuantizedEmbedding``, ``QuantizedSwitchLinear``) on the same grid, in place (as
    ``nn.quantize``); returns ``model``. Its logits equal the QAT model's up to float
    rounding (``quantized_matmul`` vs a matmul with the dequantized weight)."""
    swaps = [(path, layer.to_quantized()) for path, layer in qat_layers(model).items()]
    if not swaps:
        raise ValueError("export: model has no fake-quantized layers (run prepare_qat first)")
    model.update_modules(tree_unflatten(swaps))
    return model
