"""Fake quantization: the weights an MLX quantized layer computes with, differentiable.

``fake_quantize(w)`` is ``mx.dequantize(*mx.quantize(w, ...), ...)`` bit for bit (it calls
them), with a straight-through gradient (Bengio et al., arXiv 1308.3432): the rounding is
treated as the identity, optionally masked to zero where ``w`` lies outside the range the
group can represent (the clipped STE of QAT).

``fake_quantize_learned(w, scales, biases)`` is the affine grid with the scales and biases as
parameters, trained with LSQ's gradients (Esser et al., arXiv 1902.08153; the learned offset
of LSQ+, arXiv 2004.09576): ``w_hat = s * clip(round((w - b) / s), 0, 2^bits - 1) + b``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import mlx.core as mx
import numpy as np

# Every mode mx.quantize takes: the bit widths and group sizes it accepts (mlx 0.32; affine
# refuses 7 bits), the default first (as mx.quantize and mlx_lm's quantize_model pick them).
MODES = {
    "affine": {"group_size": (64, 32, 128), "bits": (4, 1, 2, 3, 5, 6, 8)},
    "mxfp4": {"group_size": (32,), "bits": (4,)},
    "nvfp4": {"group_size": (16,), "bits": (4,)},
    "mxfp8": {"group_size": (32,), "bits": (8,)},
}
# A uint32 word of the largest positive code: e2m1 6.0 (0b0111) and e4m3 448 (0x7E).
_MAX_CODE_WORD = {"mxfp4": 0x77777777, "nvfp4": 0x77777777, "mxfp8": 0x7E7E7E7E}
_FLOAT_DTYPES = (mx.float32, mx.float16, mx.bfloat16)


def check_quantization(group_size, bits, mode, caller: str = "fake_quantize") -> tuple[int, int]:
    """``(group_size, bits)`` with ``None`` replaced by the mode's default; ValueError if MLX
    has no such format (the message names the argument and the allowed values)."""
    if mode not in MODES:
        raise ValueError(f"{caller}: mode must be one of {sorted(MODES)}, got {mode!r}")
    allowed = MODES[mode]
    values = {"group_size": group_size, "bits": bits}
    for name, value in values.items():
        if value is None:
            values[name] = allowed[name][0]
        elif isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{caller}: {name} must be an int, got {type(value).__name__} "
                            f"{value!r}")
        elif value not in allowed[name]:
            raise ValueError(f"{caller}: {name} must be one of {sorted(allowed[name])} for "
                             f"mode={mode!r}, got {value}")
    return int(values["group_size"]), int(values["bits"])


def _check_weight(w, group_size: int, caller: str) -> None:
    if not isinstance(w, mx.array):
        raise TypeError(f"{caller}: w must be an mx.array, got {type(w).__name__}")
    if w.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{caller}: w must be float32, float16 or bfloat16, got {w.dtype}")
    if w.ndim == 0 or w.shape[-1] % group_size:
        raise ValueError(f"{caller}: w's last axis must be a multiple of group_size="
                         f"{group_size}, got shape {tuple(w.shape)}")


def _quantize(w: mx.array, group_size: int, bits: int, mode: str) -> tuple[list, Callable]:
    """``mx.quantize`` of ``w``'s groups, one per row (groups are independent), and a function
    that puts an array of those rows back in ``w``'s shape.

    MLX 0.32's CPU nvfp4 needs an even number of groups ((1, 16) fails in a reshape): an odd
    one gets a zero group appended, dropped again by the function.
    """
    rows = w.reshape(-1, group_size)
    count = rows.shape[0]
    if mode == "nvfp4" and count % 2:
        rows = mx.concatenate([rows, mx.zeros((1, group_size), dtype=w.dtype)])
    return mx.quantize(rows, group_size, bits, mode=mode), \
        lambda x: x[:count].reshape(w.shape)


def _grid(w: mx.array, group_size: int, bits: int, mode: str) -> mx.array:
    quantized, restore = _quantize(w, group_size, bits, mode)
    return restore(mx.dequantize(*quantized, group_size=group_size, bits=bits, mode=mode,
                                 dtype=w.dtype))


def representable_range(w: mx.array, group_size: int, bits: int,
                        mode: str) -> tuple[mx.array, mx.array]:
    """``(low, high)`` per element: the ends of the grid of ``w``'s group, as MLX dequantizes
    them (affine: codes 0 and 2^bits - 1; float modes: -max and +max of the element format)."""
    (packed, *scales_biases), restore = _quantize(w, group_size, bits, mode)

    def ends(word: int) -> mx.array:
        codes = mx.full(packed.shape, word, dtype=mx.uint32)
        return restore(mx.dequantize(codes, *scales_biases, group_size=group_size, bits=bits,
                                     mode=mode, dtype=w.dtype))

    if mode == "affine":  # a negative scale (MLX's choice when |min| < |max|) flips the ends
        a, b = ends(0), ends(0xFFFFFFFF)
        return mx.minimum(a, b), mx.maximum(a, b)
    high = ends(_MAX_CODE_WORD[mode])
    return -high, high


@lru_cache(maxsize=None)
def _straight_through(group_size: int, bits: int, mode: str, clip: bool):
    """The grid forward, the identity (masked to the range if ``clip``) backward."""

    @mx.custom_function
    def quantize(w):
        return _grid(w, group_size, bits, mode)

    @quantize.vjp
    def quantize_vjp(w, cotangent, output):
        if not clip:
            return cotangent
        low, high = representable_range(w, group_size, bits, mode)
        return mx.where((w >= low) & (w <= high), cotangent, mx.zeros_like(cotangent))

    return quantize


def fake_quantize(w: mx.array, group_size: int | None = None, bits: int | None = None,
                  mode: str = "affine", *, clip: bool = False) -> mx.array:
    """``mx.dequantize(*mx.quantize(w, group_size, bits, mode), ...)`` with a straight-through
    gradient.

    Forward: exactly MLX's grid (same dtype as ``w``), so training sees what the exported
    ``nn.QuantizedLinear`` computes. Backward: ``dL/dw = dL/dw_hat`` (the STE, arXiv
    1308.3432), times ``1[low <= w <= high]`` if ``clip`` (zero where the group's grid
    saturates, see :func:`representable_range`).
    Modes and their ``(group_size, bits)``: affine (32, 64, 128; 1-6 and 8 bits; default 64
    and 4), mxfp4 (32, 4), nvfp4 (16, 4), mxfp8 (32, 8); ``None`` takes the default.
    Groups run along the last axis, which must be a multiple of ``group_size``; ``w`` may
    have any number of axes (MLX itself needs two).
    """
    group_size, bits = check_quantization(group_size, bits, mode)
    _check_weight(w, group_size, "fake_quantize")
    if clip not in (True, False):
        raise TypeError(f"fake_quantize: clip must be True or False, got {clip!r}")
    return _straight_through(group_size, bits, mode, bool(clip))(w)


@mx.custom_function
def _round_ste(x):
    return mx.round(x)


@_round_ste.vjp
def _round_ste_vjp(x, cotangent, output):
    return cotangent


def affine_codes(w: mx.array, scales: mx.array, biases: mx.array, group_size: int,
                 bits: int) -> mx.array:
    """``clip((w - b) / s, 0, 2^bits - 1)`` per group, before rounding (float, ``w``'s shape)."""
    groups = w.reshape(*w.shape[:-1], -1, group_size)
    v = (groups - biases[..., None]) / scales[..., None]
    return mx.clip(v, 0, 2**bits - 1)


def fake_quantize_learned(w: mx.array, scales: mx.array, biases: mx.array,
                          group_size: int | None = None, bits: int | None = None) -> mx.array:
    """Affine fake quantization with learnable ``scales`` and ``biases`` (one per group).

    ``w_hat = s * q + b`` with ``q = round(clip((w - b) / s, 0, 2^bits - 1))`` and the
    rounding straight-through, so (LSQ, arXiv 1902.08153; LSQ+, arXiv 2004.09576)
    ``dw_hat/dw = 1`` inside the grid and 0 outside, ``dw_hat/ds = q - (w - b)/s`` inside
    (``0`` or ``2^bits - 1`` outside), ``dw_hat/db = 0`` inside and 1 outside. With the scales
    and biases of ``mx.quantize(w)`` (float32) it is MLX's grid bit for bit. LSQ's gradient
    scale ``1/sqrt(numel * Qp)`` is left to the optimizer (Adam normalizes it away).
    """
    group_size, bits = check_quantization(group_size, bits, "affine", "fake_quantize_learned")
    _check_weight(w, group_size, "fake_quantize_learned")
    expected = (*w.shape[:-1], w.shape[-1] // group_size)
    for name, value in (("scales", scales), ("biases", biases)):
        if not isinstance(value, mx.array) or tuple(value.shape) != expected:
            shape = tuple(value.shape) if isinstance(value, mx.array) else type(value).__name__
            raise ValueError(f"fake_quantize_learned: {name} must have shape {expected} (one "
                             f"per group of w), got {shape}")
    q = _round_ste(affine_codes(w, scales, biases, group_size, bits))
    return (scales[..., None] * q + biases[..., None]).reshape(w.shape).astype(w.dtype)


# Range shrink factors mse_scales_biases tries: 1.00, 0.99, ..., 0.50.
SHRINKS = tuple(round(1 - 0.01 * i, 2) for i in range(51))


def mse_scales_biases(w: mx.array, group_size: int | None = None, bits: int | None = None,
                      shrinks: tuple[float, ...] = SHRINKS) -> tuple[mx.array, mx.array]:
    """Per-group affine ``(scales, biases)`` that minimize the squared weight error.

    Each group's range ``[a * min, a * max]`` (``s = a (max - min) / (2^bits - 1)``,
    ``b = a * min``) is tried for every ``a`` in ``shrinks`` beside ``mx.quantize``'s own
    grid, and the one with the least ``sum (w_hat - w)^2`` kept (ties: the earlier), so the
    error is never above MLX's min-max grid. Clipping a group's outliers buys finer steps
    for the rest (MSE range setting, arXiv 2106.08295). An initialization for
    ``fake_quantize_learned``.
    """
    group_size, bits = check_quantization(group_size, bits, "affine", "mse_scales_biases")
    _check_weight(w, group_size, "mse_scales_biases")
    if not shrinks or any(not 0 < a <= 1 for a in shrinks):
        raise ValueError(f"mse_scales_biases: shrinks must be factors in (0, 1], got "
                         f"{shrinks!r}")
    levels = 2**bits - 1
    groups = w.astype(mx.float32).reshape(*w.shape[:-1], -1, group_size)

    def error(scales, biases):
        codes = mx.clip(mx.round((groups - biases[..., None]) / scales[..., None]), 0, levels)
        return mx.square(scales[..., None] * codes + biases[..., None] - groups).sum(-1)

    _, scales, biases = mx.quantize(w, group_size, bits)
    best_s, best_b = scales.astype(mx.float32), biases.astype(mx.float32)
    best = error(best_s, best_b)
    low, high = groups.min(-1), groups.max(-1)
    for a in shrinks:
        s = mx.maximum(a * (high - low) / levels, 1e-7)  # a flat group: no 0 / 0
        b = a * low
        err = error(s, b)
        better = err < best
        best, best_s, best_b = (mx.where(better, err, best), mx.where(better, s, best_s),
                                mx.where(better, b, best_b))
        mx.eval(best, best_s, best_b)  # one shrink at a time: the graph and memory stay small
    return best_s.astype(scales.dtype), best_b.astype(biases.dtype)


def pack_affine(codes: np.ndarray, bits: int) -> np.ndarray:
    """Integer codes ``[..., n]`` -> MLX's packed ``uint32`` words ``[..., n * bits / 32]``.

    MLX stores the codes of a row as one little-endian bit stream: code ``i`` occupies bits
    ``i*bits`` to ``(i+1)*bits - 1`` (3, 5 and 6 bits straddle words).
    """
    codes = np.asarray(codes, dtype=np.uint32)
    stream = (codes[..., None] >> np.arange(bits, dtype=np.uint32)) & 1
    stream = stream.reshape(*codes.shape[:-1], -1).astype(np.uint8)
    packed = np.packbits(stream, axis=-1, bitorder="little")
    return np.ascontiguousarray(packed).view("<u4")
