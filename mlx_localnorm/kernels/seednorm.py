"""Fused SeeDNorm (arXiv 2510.22777) and RMSNorm (arXiv 1910.07467) with custom VJPs.

Forward: ``s_k = tanh(c <x_k, beta_k>)``, ``y_k = (gamma_k + alpha_k s_k) x_k / RMS(x)``, one
read of x and one write of y, statistics saved in float32. Backward: dx in one pass from those
statistics, parameter gradients as float32 partial sums per block of rows plus a column sum.
"""

from __future__ import annotations

import functools
import math

import mlx.core as mx

from .. import ops
from ..ops._checks import check_choice, check_eps, check_heads, check_input, check_param
from ..ops.seed import DOT_SCALES
from ._launch import (
    KERNEL_DTYPES,
    N_READS,
    Launch,
    consts,
    kernel,
    launch_problem,
    resolve_backend,
    row_launch,
    thread_limit,
    warn_fallback,
)

MAX_HEADS = 16  # per-head statistics live in registers and one 32-float partial slot each
MAX_ROWS_PER_GROUP = 64  # a threadgroup reads the parameters once per block of rows
MIN_GROUPS = 128  # but keeps enough threadgroups for every core of the largest Apple GPUs
# A backward threadgroup also writes one float32 partial row per parameter: at least 16 rows
# keep that under about a quarter of the block's own traffic.
MIN_BACKWARD_ROWS_PER_GROUP = 16


def _rows_per_group(rows: int, min_rows_per_group: int = 1) -> int:
    """Blocks of up to 64 rows, smaller (down to ``min_rows_per_group``) when that would leave
    fewer than 128 threadgroups."""
    return max(1, min(MAX_ROWS_PER_GROUP, max(min_rows_per_group, rows // MIN_GROUPS)))


def _launch(rows: int, dims: int, backend: str, min_rows_per_group: int = 1) -> Launch:
    return row_launch(rows, dims, backend, _rows_per_group(rows, min_rows_per_group))


def _unsupported(x: mx.array, params: list[mx.array], num_heads: int,
                 backend: str) -> str | None:
    """Why the kernel cannot take this call, or None."""
    if x.dtype not in KERNEL_DTYPES:
        return f"input dtype {x.dtype} is not float32/float16/bfloat16"
    if len({p.dtype for p in params}) > 1 or params[0].dtype not in KERNEL_DTYPES:
        return f"parameter dtypes {[p.dtype for p in params]} differ or are not floating"
    if x.size == 0:
        return "the input is empty"
    rows = math.prod(x.shape[:-1])
    problem = launch_problem(rows, x.shape[-1], backend, _rows_per_group(rows))
    if problem:
        return problem
    if num_heads > MAX_HEADS:
        return f"num_heads={num_heads} is more than {MAX_HEADS}"
    return None


@functools.cache
def _fused(eps: float, num_heads: int, dot_scale: str, head_rms: bool, residual: bool,
           frozen: bool, dynamic: bool, backend: str):
    """The ``mx.custom_function`` of one configuration; primals ``(x, [residual], params...)``."""
    nstat = (2 if dynamic else 1) * num_heads
    params = ("weight", "alpha", "beta") if dynamic else ("weight",)
    norm = "seednorm" if dynamic else "rmsnorm"
    defines = (("DYNAMIC", int(dynamic)), ("RESIDUAL", int(residual)))
    fwd_inputs = ("x",) + (("residual",) if residual else ()) + params + ("consts",)
    fwd_outputs = (("h",) if residual else ()) + ("y", "stats")
    fwd = kernel(f"{norm}_fwd{'_residual' if residual else ''}", "seednorm_fwd.metal", backend,
                 fwd_inputs, fwd_outputs, defines)
    bwd_inputs = ("x",) + params + ("cotangent",) + (("grad_h",) if residual else ()) + (
        "stats", "consts")
    bwd_outputs = ("grad_x",) + (() if frozen else ("param_partials",))
    bwd = kernel(
        f"{norm}_bwd{'_residual' if residual else ''}{'_frozen' if frozen else ''}",
        "seednorm_bwd.metal", backend, bwd_inputs, bwd_outputs,
        defines + (("PARAM_GRADS", int(not frozen)),),
    )
    colsum = kernel("column_sum", "column_sum.metal", backend, ("partials",), ("out",))

    def template(x: mx.array, weight: mx.array, iters: int) -> list:
        return [("T", x.dtype), ("TW", weight.dtype), ("N_READS", N_READS), ("ITERS", iters),
                ("HEADS", num_heads), ("HEAD_RMS", head_rms)]

    def constants(dims: int) -> mx.array:
        head_dim = dims // num_heads
        return consts(eps, head_dim**-0.5 if dot_scale == "rsqrt_d" else 1.0)

    def twin(x: mx.array, *p: mx.array) -> mx.array:
        """The ops twin of the normalization alone (RMSNorm: SeeDNorm with alpha = 0)."""
        if not dynamic:
            p = (p[0], mx.zeros_like(p[0]), mx.zeros_like(p[0]))
        return ops.seednorm(x, *p, eps, num_heads, dot_scale, head_rms)

    @mx.custom_function
    def fused(*primals):
        x, rest = primals[0], list(primals[1:])
        r = rest.pop(0) if residual else None
        rows, dims = math.prod(x.shape[:-1]), x.shape[-1]
        geo = _launch(rows, dims, backend)
        x2 = x.reshape(rows, dims)
        inputs = [x2] + ([r.reshape(rows, dims)] if residual else []) + rest + [constants(dims)]
        shapes = ([(rows, dims)] if residual else []) + [(rows, dims), (rows, nstat)]
        dtypes = ([x.dtype] if residual else []) + [x.dtype, mx.float32]
        outs = fwd(inputs=inputs, template=template(x, rest[0], geo.iters),
                   grid=geo.grid, threadgroup=geo.threadgroup,
                   output_shapes=shapes, output_dtypes=dtypes)
        return tuple(o.reshape(x.shape) for o in outs[:-1]) + (outs[-1],)

    @mx.custom_function
    def backward(source, *rest):
        """``(dx, [dparams])`` at ``source`` (x, or h with a residual) from the saved stats;
        ``rest`` is ``params, dy, [dh], stats``."""
        p, grad_y = rest[:len(params)], rest[len(params)]
        extra, stats = rest[len(params) + 1:-1], rest[-1]
        rows, dims = math.prod(source.shape[:-1]), source.shape[-1]
        geo = _launch(rows, dims, backend, MIN_BACKWARD_ROWS_PER_GROUP)
        flat = [a.reshape(rows, dims) for a in (source, grad_y, *extra)]
        inputs = [flat[0], *p, *flat[1:], stats, constants(dims)]
        shapes = [(rows, dims)] + ([] if frozen else [(geo.groups, len(params) * dims)])
        dtypes = [source.dtype] + ([] if frozen else [mx.float32])
        outs = bwd(inputs=inputs, template=template(source, p[0], geo.iters),
                   grid=geo.grid, threadgroup=geo.threadgroup,
                   output_shapes=shapes, output_dtypes=dtypes)
        grads = [outs[0].reshape(source.shape)]
        if not frozen:
            width = len(params) * dims
            group = min(thread_limit(backend), width)
            (total,) = colsum(inputs=[outs[1]], template=[("TW", p[0].dtype)],
                              grid=(width, 1, 1), threadgroup=(group, 1, 1),
                              output_shapes=[(width,)], output_dtypes=[p[0].dtype])
            grads += [total[i * dims:(i + 1) * dims] for i in range(len(params))]
        return tuple(grads)

    @backward.vjp
    def backward_vjp(primals, cotangents, outputs):
        # Second derivatives: differentiate the ops twin's VJP (the stats get no cotangent).
        def twin_backward(source, *rest):
            p, grad_y, extra = rest[:len(params)], rest[len(params)], rest[len(params) + 1:]
            if frozen:  # constants: no derivative of any order reaches them
                frozen_p = [mx.stop_gradient(q) for q in p]
                grads = mx.vjp(lambda s: twin(s, *frozen_p), [source], [grad_y])[1]
            else:
                grads = mx.vjp(twin, [source, *p], [grad_y])[1]
            if extra:
                grads[0] = grads[0] + extra[0]
            return tuple(grads)

        grads = mx.vjp(twin_backward, list(primals[:-1]), list(cotangents))[1]
        return tuple(grads) + (mx.zeros_like(primals[-1]),)

    @fused.vjp
    def fused_vjp(primals, cotangents, outputs):
        rest = list(primals[2:] if residual else primals[1:])
        # With a residual the kernel normalized h = x + r: differentiate at h, then add dL/dh.
        source = outputs[0] if residual else primals[0]
        grad_y = cotangents[1] if residual else cotangents[0]
        extra = [cotangents[0]] if residual else []
        grads = list(backward(source, *rest, grad_y, *extra, outputs[-1]))
        grad_x = grads.pop(0)
        if frozen:
            grads = [mx.zeros_like(p) for p in rest]
        return tuple([grad_x] + ([grad_x] if residual else []) + grads)

    return fused


def seednorm(
    x: mx.array,
    weight: mx.array,
    alpha: mx.array,
    beta: mx.array,
    eps: float = 1e-6,
    num_heads: int = 1,
    residual: mx.array | None = None,
    backend: str = "auto",
    dot_scale: str = "none",
    head_rms: bool = False,
    frozen: bool = False,
) -> mx.array | tuple[mx.array, mx.array]:
    """SeeDNorm, fused: ``y_k = (weight_k + alpha_k tanh(c <x_k, beta_k>)) x_k / RMS(x)``.

    arXiv 2510.22777. Same values as :func:`mlx_localnorm.ops.seednorm` (the ops twin, with
    the same ``dot_scale`` and ``head_rms`` options). With ``residual`` it normalizes
    ``h = x + residual`` in the same pass and returns ``(h, y)``. ``frozen=True`` treats the
    parameters as constants (LoRA, QAT): their gradients are zero and the backward kernel
    skips them. ``backend``: ``"auto"`` (Metal on a Mac, ops elsewhere), ``"metal"``,
    ``"ops"`` or ``"emulate"`` (the Metal source run on the CPU; eager only, not inside
    ``mx.compile``); the environment variable ``MLX_LOCALNORM_BACKEND`` overrides it.
    """
    owner = "kernels.seednorm"
    check_input(x, None, owner)
    dims = x.shape[-1]
    for name, p in (("weight", weight), ("alpha", alpha), ("beta", beta)):
        check_param(p, (dims,), name, owner, optional=False)
        check_input(p, dims, f"{owner} ({name})")
    check_eps(eps, owner)
    check_heads(num_heads, dims, owner)
    check_choice(dot_scale, DOT_SCALES, "dot_scale", owner)
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"{owner}: residual must match x (shape {x.shape}, {x.dtype}), "
                         f"got {residual.shape}, {residual.dtype}")

    chosen = resolve_backend(backend)
    reason = None if chosen == "ops" else _unsupported(x, [weight, alpha, beta], num_heads, chosen)
    if reason:
        warn_fallback(owner, reason)
    if chosen == "ops" or reason:
        h = x if residual is None else x + residual
        if frozen:
            weight, alpha, beta = (mx.stop_gradient(p) for p in (weight, alpha, beta))
        y = ops.seednorm(h, weight, alpha, beta, eps, num_heads, dot_scale, head_rms)
        return y if residual is None else (h, y)

    fused = _fused(float(eps), num_heads, dot_scale, bool(head_rms), residual is not None,
                   bool(frozen), True, chosen)
    if residual is None:
        return fused(x, weight, alpha, beta)[0]
    h, y, _ = fused(x, residual, weight, alpha, beta)
    return h, y


def rms_norm(x: mx.array, weight: mx.array, eps: float = 1e-6, backend: str = "auto",
             frozen: bool = False) -> mx.array:
    """RMSNorm from the SeeDNorm template without the dynamic scale: ``y = weight x / RMS(x)``.

    arXiv 1910.07467. The baseline that measures the template against ``mx.fast.rms_norm``
    (which is also its ops twin). ``frozen=True`` as in :func:`seednorm`.
    """
    owner = "kernels.rms_norm"
    check_input(x, None, owner)
    check_param(weight, (x.shape[-1],), "weight", owner, optional=False)
    check_input(weight, x.shape[-1], f"{owner} (weight)")
    check_eps(eps, owner)
    chosen = resolve_backend(backend)
    reason = None if chosen == "ops" else _unsupported(x, [weight], 1, chosen)
    if reason:
        warn_fallback(owner, reason)
    if chosen == "ops" or reason:
        return ops.rms_norm(x, mx.stop_gradient(weight) if frozen else weight, eps)
    fused = _fused(float(eps), 1, "none", False, False, bool(frozen), False, chosen)
    return fused(x, weight)[0]
