"""Fused Peri-LN norm-add-norm (arXiv 2502.02732) with a custom VJP, RMSNorm or SeeDNorm.

Forward: ``h = x + N_out(b)``, ``y = N_in(h)`` in one pass (reads ``b`` and ``x``, writes ``h``
and ``y``, saves four float32 statistics per row). Backward: ``dx = dh + dN_in(h, dy)`` and
``db = dN_out(b, dx)`` in one pass, both norms' parameter gradients as float32 partial sums
per block of rows plus one column sum.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import mlx.core as mx

from ..ops.norm_add_norm import check_norm_add_norm, normalize
from ..ops.norm_add_norm import norm_add_norm as ops_norm_add_norm
from ._launch import N_READS, consts, kernel, resolve_backend, thread_limit, warn_fallback
from .seednorm import MIN_BACKWARD_ROWS_PER_GROUP, _launch, _unsupported

OWNER = "kernels.norm_add_norm"


@functools.cache
def _fused(out_eps: float, in_eps: float, dot_scale: str, dynamic: bool, frozen: bool,
           backend: str):
    """The ``mx.custom_function`` of one configuration; primals ``(b, x, *out_p, *in_p)``."""
    names = ("weight", "alpha", "beta") if dynamic else ("weight",)
    nparam = len(names)
    nstat = 2 if dynamic else 1  # per norm: 1/RMS, then (SeeDNorm) s
    params = tuple(f"out_{n}" for n in names) + tuple(f"in_{n}" for n in names)
    norm = "seednorm" if dynamic else "rmsnorm"
    defines = (("DYNAMIC", int(dynamic)),)
    fwd = kernel(f"{norm}_add_norm_fwd", "norm_add_norm_fwd.metal", backend,
                 ("branch", "stream") + params + ("consts",), ("h", "y", "stats"), defines)
    bwd = kernel(f"{norm}_add_norm_bwd{'_frozen' if frozen else ''}", "norm_add_norm_bwd.metal",
                 backend, ("branch", "h") + params + ("grad_h", "grad_y", "stats", "consts"),
                 ("grad_branch", "grad_stream") + (() if frozen else ("param_partials",)),
                 defines + (("PARAM_GRADS", int(not frozen)),))
    colsum = kernel("column_sum", "column_sum.metal", backend, ("partials",), ("out",))

    def template(x: mx.array, weight: mx.array, iters: int) -> list:
        return [("T", x.dtype), ("TW", weight.dtype), ("N_READS", N_READS), ("ITERS", iters)]

    def constants(dims: int) -> mx.array:
        return consts(out_eps, in_eps, dims**-0.5 if dot_scale == "rsqrt_d" else 1.0)

    def split(p: Sequence[mx.array]) -> tuple[list, list]:
        return list(p[:nparam]), list(p[nparam:])

    @mx.custom_function
    def fused(b, x, *p):
        rows, dims = math.prod(b.shape[:-1]), b.shape[-1]
        geo = _launch(rows, dims, backend)
        flat = [a.reshape(rows, dims) for a in (b, x)]
        h, y, stats = fwd(inputs=flat + list(p) + [constants(dims)],
                          template=template(b, p[0], geo.iters), grid=geo.grid,
                          threadgroup=geo.threadgroup,
                          output_shapes=[(rows, dims), (rows, dims), (rows, 2 * nstat)],
                          output_dtypes=[b.dtype, b.dtype, mx.float32])
        return h.reshape(b.shape), y.reshape(b.shape), stats

    @mx.custom_function
    def backward(b, h, *rest):
        """``(db, dx, [dparams])``; ``rest`` is ``params, dh, dy, stats``."""
        p, (grad_h, grad_y, stats) = rest[:2 * nparam], rest[2 * nparam:]
        rows, dims = math.prod(b.shape[:-1]), b.shape[-1]
        geo = _launch(rows, dims, backend, MIN_BACKWARD_ROWS_PER_GROUP)
        flat = [a.reshape(rows, dims) for a in (b, h, grad_h, grad_y)]
        width = 2 * nparam * dims
        outs = bwd(inputs=flat[:2] + list(p) + flat[2:] + [stats, constants(dims)],
                   template=template(b, p[0], geo.iters), grid=geo.grid,
                   threadgroup=geo.threadgroup,
                   output_shapes=[(rows, dims)] * 2 + ([] if frozen else [(geo.groups, width)]),
                   output_dtypes=[b.dtype] * 2 + ([] if frozen else [mx.float32]))
        grads = [outs[0].reshape(b.shape), outs[1].reshape(b.shape)]
        if not frozen:
            group = min(thread_limit(backend), width)
            (total,) = colsum(inputs=[outs[2]], template=[("TW", p[0].dtype)],
                              grid=(width, 1, 1), threadgroup=(group, 1, 1),
                              output_shapes=[(width,)], output_dtypes=[p[0].dtype])
            grads += [total[i * dims:(i + 1) * dims] for i in range(2 * nparam)]
        return tuple(grads)

    @backward.vjp
    def backward_vjp(primals, cotangents, outputs):
        # Second derivatives: differentiate the ops twin's VJP (the stats get no cotangent).
        def twin_backward(b, h, *rest):
            (p_out, p_in), (grad_h, grad_y) = split(rest[:2 * nparam]), rest[2 * nparam:]
            if frozen:
                p_out, p_in = ([mx.stop_gradient(q) for q in ps] for ps in (p_out, p_in))
            _, (dh, *g_in) = mx.vjp(lambda h, *q: normalize(h, q, in_eps, dot_scale),
                                    [h, *p_in], [grad_y])
            dx = grad_h + dh
            _, (db, *g_out) = mx.vjp(lambda b, *q: normalize(b, q, out_eps, dot_scale),
                                     [b, *p_out], [dx])
            return (db, dx) + (() if frozen else tuple(g_out + g_in))

        grads = mx.vjp(twin_backward, list(primals[:-1]), list(cotangents))[1]
        return tuple(grads) + (mx.zeros_like(primals[-1]),)

    @fused.vjp
    def fused_vjp(primals, cotangents, outputs):
        b, _, *p = primals
        grads = list(backward(b, outputs[0], *p, cotangents[0], cotangents[1], outputs[2]))
        if frozen:
            grads += [mx.zeros_like(q) for q in p]
        return tuple(grads)

    return fused


def norm_add_norm(
    branch: mx.array,
    stream: mx.array,
    out_params: Sequence[mx.array],
    in_params: Sequence[mx.array],
    out_eps: float = 1e-6,
    in_eps: float = 1e-6,
    dot_scale: str = "none",
    backend: str = "auto",
    frozen: bool = False,
) -> tuple[mx.array, mx.array]:
    """Peri-LN's ``h = stream + N_out(branch)``, ``y = N_in(h)`` in one kernel; returns ``(h, y)``.

    arXiv 2502.02732. Both norms RMSNorm (``params = (weight,)``, arXiv 1910.07467) or both
    single-head SeeDNorm (``params = (weight, alpha, beta)``, arXiv 2510.22777). Same values
    as :func:`mlx_localnorm.ops.norm_add_norm` (the ops twin, the unfused sequence).
    ``frozen=True`` treats every parameter as a constant (zero gradients, no parameter
    reductions). ``backend`` as in :func:`mlx_localnorm.kernels.seednorm`.
    """
    check_norm_add_norm(branch, stream, out_params, in_params, out_eps, in_eps, dot_scale,
                            OWNER)
    chosen = resolve_backend(backend)
    params = [*out_params, *in_params]
    reason = None if chosen == "ops" else _unsupported(branch, params, 1, chosen)
    if reason:
        warn_fallback(OWNER, reason)
    if chosen == "ops" or reason:
        if frozen:
            out_params, in_params = ([mx.stop_gradient(p) for p in ps]
                                     for ps in (out_params, in_params))
        return ops_norm_add_norm(branch, stream, out_params, in_params, out_eps, in_eps,
                                 dot_scale)
    fused = _fused(float(out_eps), float(in_eps), dot_scale, len(out_params) == 3, bool(frozen),
                   chosen)
    h, y, _ = fused(branch, stream, *params)
    return h, y
