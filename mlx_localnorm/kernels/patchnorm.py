"""Fused PatchNorm division (arXiv 2512.22247) with a custom VJP.

``z_p = (W x)_p / d_p + b`` (mode "rms", ``d_p = sqrt(mean(P_p(x)^2) + eps)``) or
``((W x)_p + b) / d_p`` (mode "affine", ``d_p = sqrt(||P_p(x)||^2 + 1)``). The linear map stays
an MLX matmul (or a gain multiply); the kernels fuse what plain ops spread over several passes:
the per-position sum of squares, its patch window and the division, and their backward.
"""

from __future__ import annotations

import functools
import math

import mlx.core as mx

from ..ops.patch import check_patchnorm_args, patch_divisor, patch_sum_squares
from ..ops.patch import patchnorm as ops_patchnorm
from ._launch import (
    KERNEL_DTYPES,
    N_READS,
    consts,
    kernel,
    launch_problem,
    resolve_backend,
    row_launch,
    warn_fallback,
)


@functools.cache
def _fused(eps: float, patch_size: int, patch_ndim: int, affine: bool, count: int, backend: str):
    """``u / d(x)`` as an ``mx.custom_function`` of ``(x, u)`` for one configuration."""
    defines = (("PATCH_NDIM", patch_ndim),)
    sumsq = kernel("patch_sumsq", "patch_sumsq.metal", backend, ("x",), ("sum_sq",))
    divide = kernel(f"patch_divide_{patch_ndim}d", "patch_divide.metal", backend,
                    ("u", "sum_sq", "consts"), ("y", "inv_d"), defines)
    divide_bwd = kernel("patch_divide_bwd", "patch_divide_bwd.metal", backend,
                        ("u", "cotangent", "inv_d", "consts"), ("grad_u", "grad_sum_sq"))
    window_bwd = kernel(f"patch_window_bwd_{patch_ndim}d", "patch_window_bwd.metal", backend,
                        ("x", "grad_sum_sq", "consts"), ("grad_x",), defines)
    # consts: eps, count (mode rms), 1 / (2 n) with n = count (rms) or 1 (affine)
    scalars = consts(eps, count, 0.5 if affine else 0.5 / count)

    def template(a: mx.array, iters: int) -> list:
        return [("T", a.dtype), ("N_READS", N_READS), ("ITERS", iters), ("PATCH", patch_size),
                ("AFFINE", affine)]

    @mx.custom_function
    def fused(x, u):
        grid_shape = x.shape[:-1] or (1,)
        rows = math.prod(grid_shape)
        geo = row_launch(rows, x.shape[-1], backend)
        (ss,) = sumsq(inputs=[x.reshape(rows, -1)], template=template(x, geo.iters),
                      grid=geo.grid, threadgroup=geo.threadgroup,
                      output_shapes=[(rows,)], output_dtypes=[mx.float32])
        geo = row_launch(rows, u.shape[-1], backend)
        y, inv_d = divide(inputs=[u.reshape(rows, -1), ss.reshape(grid_shape), scalars],
                          template=template(u, geo.iters), grid=geo.grid,
                          threadgroup=geo.threadgroup,
                          output_shapes=[(rows, u.shape[-1]), (rows,)],
                          output_dtypes=[u.dtype, mx.float32])
        return y.reshape(u.shape), inv_d

    def twin(x: mx.array, u: mx.array) -> mx.array:
        """The ops twin of the fused part."""
        ss = patch_sum_squares(x, patch_size, patch_ndim)
        return u / patch_divisor(ss, count, "affine" if affine else "rms", eps)

    @mx.custom_function
    def backward(x, u, grad_y, inv_d):
        """``(dx, du)`` of ``u / d(x)`` from the saved ``1/d``."""
        grid_shape = x.shape[:-1] or (1,)
        rows = math.prod(grid_shape)
        geo = row_launch(rows, u.shape[-1], backend)
        grad_u, grad_ss = divide_bwd(
            inputs=[u.reshape(rows, -1), grad_y.reshape(rows, -1), inv_d, scalars],
            template=template(u, geo.iters), grid=geo.grid, threadgroup=geo.threadgroup,
            output_shapes=[(rows, u.shape[-1]), (rows,)], output_dtypes=[u.dtype, mx.float32])
        geo = row_launch(rows, x.shape[-1], backend)
        (grad_x,) = window_bwd(
            inputs=[x.reshape(rows, -1), grad_ss.reshape(grid_shape), scalars],
            template=template(x, geo.iters), grid=geo.grid, threadgroup=geo.threadgroup,
            output_shapes=[(rows, x.shape[-1])], output_dtypes=[x.dtype])
        return grad_x.reshape(x.shape), grad_u.reshape(u.shape)

    @backward.vjp
    def backward_vjp(primals, cotangents, outputs):
        # Second derivatives: differentiate the ops twin's VJP (1/d gets no cotangent).
        def twin_backward(x, u, grad_y):
            return tuple(mx.vjp(twin, [x, u], [grad_y])[1])

        grads = mx.vjp(twin_backward, list(primals[:3]), list(cotangents))[1]
        return tuple(grads) + (mx.zeros_like(primals[3]),)

    @fused.vjp
    def fused_vjp(primals, cotangents, outputs):
        return backward(*primals, cotangents[0], outputs[1])

    return fused


def _unsupported(shape: tuple[int, ...], dtype: mx.Dtype, out_dims: int,
                 backend: str) -> str | None:
    """Why the kernels cannot take an input of this shape and dtype, or None (shapes only, so
    a shape too large to allocate can be checked)."""
    if dtype not in KERNEL_DTYPES:
        return f"input dtype {dtype} is not float32/float16/bfloat16"
    if math.prod(shape) == 0:
        return "the input is empty"
    # One threadgroup per position: rows x threads must fit MLX's grid.
    rows = math.prod(shape[:-1])
    for dims in (shape[-1], out_dims):
        problem = launch_problem(rows, dims, backend)
        if problem:
            return problem
    return None


def patchnorm(
    x: mx.array,
    weight: mx.array,
    bias: mx.array | None = None,
    eps: float = 1e-6,
    patch_size: int = 1,
    patch_ndim: int = 1,
    mode: str = "rms",
    backend: str = "auto",
) -> mx.array:
    """PatchNorm with the patch divisor fused: ``z_p = (W x)_p / d_p + b`` (arXiv 2512.22247).

    Same arguments and values as :func:`mlx_localnorm.ops.patchnorm` (``weight`` a gain
    ``(D,)`` or a matrix ``(D_out, D)``; mode ``"affine"`` puts the bias inside the division),
    plus ``backend`` as in :func:`seednorm`.
    """
    owner = "kernels.patchnorm"
    check_patchnorm_args(x, weight, bias, eps, patch_size, patch_ndim, mode, owner)
    dims = x.shape[-1]

    chosen = resolve_backend(backend)
    reason = None if chosen == "ops" else _unsupported(x.shape, x.dtype, weight.shape[0], chosen)
    if reason:
        warn_fallback(owner, reason)
    if chosen == "ops" or reason:
        return ops_patchnorm(x, weight, bias, eps, patch_size, patch_ndim, mode)

    # The linear map in MLX ops, in float32 like the ops twin; the kernels fuse the division.
    xf = x.astype(mx.float32)
    u = xf * weight if weight.ndim == 1 else xf @ weight.T
    affine = mode == "affine"
    if bias is not None and affine:
        u = u + bias
    fused = _fused(float(eps), patch_size, patch_ndim, affine, dims * patch_size**patch_ndim,
                   chosen)
    # The divisor also reads the float32 copy, so both gradient paths of x meet in float32.
    y = fused(xf, u)[0]
    if bias is not None and not affine:
        y = y + bias
    return y.astype(x.dtype)
