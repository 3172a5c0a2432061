"""The PatchNorm ops twin (arXiv 2512.22247): patch sums of squares, the divisor, ``patchnorm``."""

from __future__ import annotations

import mlx.core as mx

from ._checks import check_choice, check_eps, check_input, check_param, check_size

MODES = ("rms", "affine")


def window_sum(a: mx.array, size: int, axis: int, causal: bool) -> mx.array:
    """Sum of ``size`` neighbouring entries along ``axis`` with zero padding.

    Causal windows end at the position (``p-size+1 .. p``); otherwise they are centred, with
    the extra entry of an even window on the right. A sum of shifted slices rather than a
    difference of cumulative sums, which would lose precision on long sequences.
    """
    if size == 1:
        return a
    left, right = (size - 1, 0) if causal else ((size - 1) // 2, size // 2)
    axis = axis % a.ndim
    length = a.shape[axis]
    # Offsets of length or more from a position only ever reach the zero padding.
    left, right = min(left, max(length - 1, 0)), min(right, max(length - 1, 0))
    widths = [(0, 0)] * a.ndim
    widths[axis] = (left, right)
    padded = mx.pad(a, widths)
    index = [slice(None)] * a.ndim
    total = None
    for j in range(left + right + 1):
        index[axis] = slice(j, j + length)
        part = padded[tuple(index)]
        total = part if total is None else total + part
    return total


def patch_sum_squares(x: mx.array, patch_size: int = 1, patch_ndim: int = 1) -> mx.array:
    """float32 ``sum(P_p(x)^2)`` per position: a box filter over ``sum_c x_c^2``.

    ``patch_ndim=1``: causal window over axis -2 (sequences ``[..., L, D]``);
    ``patch_ndim=2``: centred ``k x k`` window over axes -3, -2 (images ``[..., H, W, C]``).
    """
    xf = x.astype(mx.float32)
    ss = mx.sum(xf * xf, axis=-1, keepdims=True)
    axes = (-2,) if patch_ndim == 1 else (-3, -2)
    for axis in axes:
        ss = window_sum(ss, patch_size, axis, causal=patch_ndim == 1)
    return ss


def patch_divisor(ss: mx.array, count: int, mode: str, eps: float) -> mx.array:
    """``d_p``: ``sqrt(ss/count + eps)`` (mode "rms") or ``sqrt(ss + 1)`` (mode "affine")."""
    return mx.sqrt(ss / count + eps) if mode == "rms" else mx.sqrt(ss + 1)


def divide(z: mx.array, d: mx.array, bias: mx.array | None, mode: str) -> mx.array:
    """``z / d + b`` (mode "rms") or ``(z + b) / d`` (mode "affine": the bias is an input too)."""
    if bias is not None and mode == "affine":
        z = z + bias
    z = z / d
    if bias is not None and mode == "rms":
        z = z + bias
    return z


def check_patch_shape(patch_size, patch_ndim, owner: str) -> None:
    check_size(patch_size, "patch_size", owner)
    check_choice(check_size(patch_ndim, "patch_ndim", owner), (1, 2), "patch_ndim", owner)


def check_patchnorm_args(x, weight, bias, eps, patch_size, patch_ndim, mode, owner) -> None:
    """The checks of :func:`patchnorm`'s arguments, shared with its fused kernel."""
    check_input(x, None, owner)
    dims = x.shape[-1]
    _check_patch(x, patch_size, patch_ndim, mode, eps, owner)
    check_param(weight, None, "weight", owner, optional=False)
    if weight.ndim == 1:
        check_param(weight, (dims,), "weight", owner)
    elif weight.ndim != 2 or weight.shape[1] != dims:
        raise ValueError(f"{owner}: weight must have shape ({dims},) or (out, {dims}), "
                         f"got {tuple(weight.shape)}")
    check_param(bias, (weight.shape[0],), "bias", owner)


def _check_patch(x, patch_size, patch_ndim, mode, eps, owner):
    check_patch_shape(patch_size, patch_ndim, owner)
    check_choice(mode, MODES, "mode", owner)
    check_eps(eps, owner)
    if patch_size > 1 and x.ndim < patch_ndim + 1:
        raise ValueError(
            f"{owner}: patch_size={patch_size} with patch_ndim={patch_ndim} needs an input with "
            f"at least {patch_ndim + 1} axes ([..., L, D] or [..., H, W, C]), got {x.shape}"
        )


def patchnorm(
    x: mx.array,
    weight: mx.array,
    bias: mx.array | None = None,
    eps: float = 1e-6,
    patch_size: int = 1,
    patch_ndim: int = 1,
    mode: str = "rms",
) -> mx.array:
    """``z_p = (W x)_p / d_p + b`` (mode "rms") or ``((W x)_p + b) / d_p`` (mode "affine").

    ``W`` is ``weight``: a gain vector ``(D,)`` (diagonal map) or a matrix ``(D_out, D)``
    applied position-wise; ``d_p`` is computed from the patch of ``patch_size`` positions
    (``patch_size^2`` for ``patch_ndim=2``) times all channels, see :func:`patch_divisor`.
    """
    check_patchnorm_args(x, weight, bias, eps, patch_size, patch_ndim, mode, "patchnorm")
    dims = x.shape[-1]
    xf = x.astype(mx.float32)
    d = patch_divisor(patch_sum_squares(xf, patch_size, patch_ndim),
                      dims * patch_size**patch_ndim, mode, eps)
    z = xf * weight if weight.ndim == 1 else xf @ weight.T
    return divide(z, d, bias, mode).astype(x.dtype)
