"""PatchNorm and the affine-divergence correction (arXiv 2512.22247).

For ``z = W x + b`` one SGD step moves the activation by ``-lr * g * (||x||^2 + 1)``: a
sample-dependent step, the "affine divergence". Dividing each output by the norm of exactly
the patch of input it saw removes it. Because that divisor depends on the layer's receptive
field, the layer owns its linear map ("compositionally inseparable").
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from ..kernels import BACKENDS
from ..kernels import patchnorm as fused_patchnorm
from ..ops._checks import (
    MAX_SIZE,
    check_choice,
    check_dims,
    check_eps,
    check_flag,
    check_input,
    check_size,
)
from ..ops.patch import (
    MODES,
    check_patch_shape,
    divide,
    patch_divisor,
    patch_sum_squares,
    patchnorm,
)


class PatchNorm(nn.Module):
    r"""PatchNorm as a drop-in norm (arXiv 2512.22247).

    .. math:: z_p = (W x)_p / d_p + b, \quad d_p = \sqrt{\mathrm{mean}(P_p(x)^2) + \epsilon}

    (mode ``"rms"``, default) or :math:`z_p = ((W x)_p + b) / \sqrt{\lVert P_p(x) \rVert^2 + 1}`
    (mode ``"affine"``: the affine-divergence correction). ``P_p(x)`` is the patch of
    ``patch_size`` positions ending at ``p`` (causal, sequences ``[..., L, D]``) or the centred
    ``k x k`` window (``patch_ndim=2``, images ``[..., H, W, C]``), zero padded, times all
    channels. ``weight="full"`` learns a ``D x D`` map initialised to the identity,
    ``"diagonal"`` a gain vector; with ``patch_size=1`` and mode ``"rms"`` it equals RMSNorm
    at initialization. Not scale invariant in mode ``"affine"`` (``f(2x) != f(x)``).

    Args:
        dims: size of the last axis.
        eps: added to the mean square (mode "rms").
        patch_size: positions per patch along each patch axis.
        patch_ndim: 1 (causal sequence window) or 2 (centred image window).
        mode: ``"rms"`` or ``"affine"``.
        weight: ``"diagonal"`` or ``"full"``.
        bias: learn the shift ``bias`` (init 0).
        backend: ``"auto"`` (the fused Metal kernel on a Mac, these ops elsewhere),
            ``"metal"``, ``"ops"`` or ``"emulate"``; see :func:`mlx_localnorm.kernels.patchnorm`.
    """

    def __init__(
        self,
        dims: int,
        eps: float = 1e-6,
        patch_size: int = 1,
        patch_ndim: int = 1,
        mode: str = "rms",
        weight: str = "diagonal",
        bias: bool = True,
        backend: str = "auto",
    ):
        super().__init__()
        owner = f"PatchNorm(dims={dims})"
        self.backend = check_choice(backend, BACKENDS, "backend", owner)
        self.dims = check_dims(dims, "PatchNorm")
        self.eps = check_eps(eps, owner)
        self.mode = check_choice(mode, MODES, "mode", owner)
        check_patch_shape(patch_size, patch_ndim, owner)
        self.patch_size, self.patch_ndim = patch_size, patch_ndim
        check_choice(weight, ("diagonal", "full"), "weight", owner)
        if weight == "full" and dims**2 > MAX_SIZE:
            raise ValueError(f"{owner}: weight='full' needs dims**2 = {dims**2} entries, more "
                             f"than MLX's {MAX_SIZE}; use weight='diagonal'")
        self.weight = mx.eye(dims) if weight == "full" else mx.ones((dims,))
        if check_flag(bias, "bias", owner):
            self.bias = mx.zeros((dims,))

    def _extra_repr(self) -> str:
        return (f"{self.dims}, mode={self.mode!r}, patch_size={self.patch_size}, "
                f"patch_ndim={self.patch_ndim}, full={self.weight.ndim == 2}")

    def __call__(self, x: mx.array) -> mx.array:
        check_input(x, self.dims, f"PatchNorm(dims={self.dims})")
        return fused_patchnorm(x, self.weight, self.get("bias"), self.eps, self.patch_size,
                               self.patch_ndim, self.mode, backend=self.backend)


class PatchNormLinear(nn.Module):
    r"""Affine-divergence linear layer (arXiv 2512.22247).

    .. math:: z = (W x + b) / \sqrt{\lVert x \rVert^2 + 1}

    (mode ``"affine"``, default; then one SGD step moves ``z`` by exactly ``-lr * g``) or
    ``z = W x / RMS(x) + b`` (mode ``"rms"``). Weights initialised like ``nn.Linear``.
    """

    def __init__(self, input_dims: int, output_dims: int, bias: bool = True,
                 mode: str = "affine", eps: float = 1e-6):
        super().__init__()
        check_size(input_dims, "input_dims", "PatchNormLinear")
        check_size(output_dims, "output_dims", "PatchNormLinear")
        self.mode = check_choice(mode, MODES, "mode", "PatchNormLinear")
        self.eps = check_eps(eps, "PatchNormLinear")
        scale = math.sqrt(1.0 / input_dims)
        self.weight = mx.random.uniform(-scale, scale, (output_dims, input_dims))
        if check_flag(bias, "bias", "PatchNormLinear"):
            self.bias = mx.random.uniform(-scale, scale, (output_dims,))

    def __call__(self, x: mx.array) -> mx.array:
        check_input(x, self.weight.shape[1], "PatchNormLinear")
        return patchnorm(x, self.weight, self.get("bias"), self.eps, mode=self.mode)


class _PatchNormConv(nn.Module):
    """Shared body of the 1-D (causal) and 2-D (same-padded) affine-divergence convolutions."""

    ndim = 1

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, bias: bool,
                 mode: str, eps: float):
        super().__init__()
        name = type(self).__name__
        check_size(in_channels, "in_channels", name)
        check_size(out_channels, "out_channels", name)
        check_size(kernel_size, "kernel_size", name)
        self.mode = check_choice(mode, MODES, "mode", name)
        self.eps = check_eps(eps, name)
        self.kernel_size = kernel_size
        scale = math.sqrt(1.0 / (in_channels * kernel_size**self.ndim))
        shape = (out_channels,) + (kernel_size,) * self.ndim + (in_channels,)
        self.weight = mx.random.uniform(-scale, scale, shape)
        if check_flag(bias, "bias", name):
            self.bias = mx.zeros((out_channels,))

    def _padding(self) -> tuple[int, int]:
        k = self.kernel_size
        return (k - 1, 0) if self.ndim == 1 else ((k - 1) // 2, k // 2)

    def __call__(self, x: mx.array) -> mx.array:
        name = type(self).__name__
        check_input(x, self.weight.shape[-1], name, min_ndim=self.ndim + 2)
        if x.ndim != self.ndim + 2:
            raise ValueError(f"{name} expects a batched channels-last input with "
                             f"{self.ndim + 2} axes, got {x.shape}")
        xf = x.astype(mx.float32)
        pad = [(0, 0)] + [self._padding()] * self.ndim + [(0, 0)]
        conv = mx.conv1d if self.ndim == 1 else mx.conv2d
        z = conv(mx.pad(xf, pad), self.weight)
        ss = patch_sum_squares(xf, self.kernel_size, self.ndim)
        d = patch_divisor(ss, x.shape[-1] * self.kernel_size**self.ndim, self.mode, self.eps)
        return divide(z, d, self.get("bias"), self.mode).astype(x.dtype)


class PatchNormConv1d(_PatchNormConv):
    r"""Causal 1-D convolution with per-position affine-divergence correction (arXiv 2512.22247).

    .. math:: z_p = ((W * x)_p + b) / \sqrt{\textstyle\sum_{q=p-k+1}^{p} \lVert x_q \rVert^2 + 1}

    Input ``[N, L, C_in]``, output ``[N, L, C_out]``; mode ``"rms"`` divides by the patch RMS.
    """

    ndim = 1

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int,
                 bias: bool = True, mode: str = "affine", eps: float = 1e-6):
        super().__init__(in_channels, out_channels, kernel_size, bias, mode, eps)


class PatchNormConv2d(_PatchNormConv):
    r"""Same-padded 2-D convolution with per-position affine-divergence correction
    (arXiv 2512.22247).

    .. math:: z_p = ((W * x)_p + b) / \sqrt{\lVert P_p(x) \rVert^2 + 1}

    ``P_p(x)`` the ``k x k`` window the kernel sees at ``p``. Input ``[N, H, W, C_in]``.
    """

    ndim = 2

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int,
                 bias: bool = True, mode: str = "affine", eps: float = 1e-6):
        super().__init__(in_channels, out_channels, kernel_size, bias, mode, eps)
