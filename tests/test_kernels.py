"""Fused kernels (SeeDNorm, RMSNorm, PatchNorm) run through the CPU emulator of Metal.

Every kernel's exact Metal source runs in :mod:`mlx_localnorm.emulate` and is checked, forward
and backward, against a float64 NumPy reference written here from SPEC.md and against the ops
twin in :mod:`mlx_localnorm.ops`. Per-dtype tolerances are relative to the reference's
scale. The emulator's device-memory byte counts check the traffic targets.
"""

import importlib
import itertools
import math
import types
import warnings

import mlx.core as mx
import numpy as np
import pytest

import mlx_localnorm  # noqa: F401  (first: swaps MLX's CPU BLAS before mlx.core loads)
from mlx_localnorm import kernels, norms

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
# Max error allowed, relative to the element and to the RMS of the reference (storage rounding
# of float16 is 4.9e-4 and of bfloat16 3.9e-3; the rest is float32 accumulation).
TOL = {"float32": 2e-5, "float16": 3e-3, "bfloat16": 2.5e-2}
EPS = 1e-6


# ----------------------------------------------------------------- float64 references (SPEC)

def ref_seednorm(x, w, a, b, eps=EPS, heads=1, scale=1.0, head_rms=False, g=None):
    """SeeDNorm forward and (with cotangent g) its gradients, float64, rows x D.

    s_k = tanh(c <x_k, b_k>); y_k = (w_k + a_k s_k) x_k / r, r = RMS of the row (or head);
    dx = (w g - xh mean_G(w g xh)) / r + (1 - s^2) c C_k b, C_k = sum_{head k} g a xh;
    dw = sum g xh, da = sum g xh s, db = sum (1 - s^2) c C_k x.
    """
    n, d = x.shape
    hd = d // heads
    xk = x.reshape(n, heads, hd)
    wk, ak, bk = (p.reshape(1, heads, hd) for p in (w, a, b))
    s = np.tanh(scale * (xk * bk).sum(-1, keepdims=True))
    ms = (xk**2).mean(-1, keepdims=True) if head_rms else (x**2).mean(-1)[:, None, None]
    inv = 1 / np.sqrt(ms + eps)
    xh = xk * inv
    gain = wk + ak * s
    y = (gain * xh).reshape(n, d)
    if g is None:
        return y
    gk = g.reshape(n, heads, hd)
    m = (gk * gain * xh).sum(-1, keepdims=True)
    mean = m / hd if head_rms else m.sum(1, keepdims=True) / d
    ds = (1 - s**2) * scale * (gk * ak * xh).sum(-1, keepdims=True)
    dx = (gain * gk - xh * mean) * inv + ds * bk
    grads = [dx.reshape(n, d), (gk * xh).sum(0).reshape(d), (gk * xh * s).sum(0).reshape(d),
             (ds * xk).sum(0).reshape(d)]
    return y, grads


def window(a, k, ndim, transpose=False):
    """Zero-padded window sum over the last `ndim` axes: out[p] = sum_o a[p + o] with o in
    -(k-1)..0 (causal 1-D) or -((k-1)//2)..k//2 (centred 2-D); `transpose` mirrors o."""
    lo, hi = (-(k - 1), 0) if ndim == 1 else (-((k - 1) // 2), k // 2)
    if transpose:
        lo, hi = -hi, -lo
    pad = max(-lo, hi)
    padded = np.pad(a, [(0, 0)] * (a.ndim - ndim) + [(pad, pad)] * ndim)
    out = np.zeros_like(a)
    for off in itertools.product(range(lo, hi + 1), repeat=ndim):
        index = [slice(None)] * (a.ndim - ndim) + [
            slice(pad + o, pad + o + n) for o, n in zip(off, a.shape[a.ndim - ndim:])]
        out += padded[tuple(index)]
    return out


def ref_patchnorm(x, weight, bias, k, ndim, mode, eps=EPS, g=None):
    """PatchNorm forward and gradients (x, weight, bias), float64.

    u = W x (+ b in mode affine); y = u / d (+ b in mode rms); d^2 = S / n + eps (rms) or
    S + 1 (affine), S = window of sum_c x_c^2, n = D k^ndim. Backward: du = g / d,
    q = -sum_c g u / (2 n' d^3) (n' = n or 1), dx = W^T du + 2 x window^T(q).
    """
    d_in = x.shape[-1]
    count = d_in * k**ndim
    S = window((x**2).sum(-1), k, ndim)[..., None]
    affine = mode == "affine"
    dd = np.sqrt(S + 1) if affine else np.sqrt(S / count + eps)
    u = x * weight if weight.ndim == 1 else x @ weight.T
    if bias is not None and affine:
        u = u + bias
    y = u / dd + (bias if bias is not None and not affine else 0)
    if g is None:
        return y
    du = g / dd
    q = -(g * u).sum(-1) / (2 * (1 if affine else count) * dd[..., 0] ** 3)
    dx = (du * weight if weight.ndim == 1 else du @ weight) + 2 * x * window(q, k, ndim, True)[
        ..., None]
    lead = tuple(range(x.ndim - 1))
    if weight.ndim == 1:
        dw = (du * x).sum(lead)
    else:
        dw = du.reshape(-1, du.shape[-1]).T @ x.reshape(-1, d_in)
    grads = [dx, dw]
    if bias is not None:
        grads.append((du if affine else g).sum(lead))
    return y, grads


# ----------------------------------------------------------------- helpers

def f64(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32), dtype=np.float64)


def cast(a: np.ndarray, dtype: str) -> mx.array:
    return mx.array(a.astype(np.float32)).astype(DTYPES[dtype])


def assert_close(got: mx.array, ref: np.ndarray, dtype: str, what: str, factor: float = 1.0,
                 scale: float | None = None):
    """|got - ref| <= tol * (|ref| + scale), scale the RMS of ref unless given."""
    got = f64(got)
    assert got.shape == ref.shape, f"{what}: shape {got.shape} != {ref.shape}"
    assert np.isfinite(got).all(), f"{what}: non-finite values"
    tol = TOL[dtype] * factor
    scale = (np.sqrt(np.mean(ref**2)) if scale is None else scale) + 1e-30
    err = np.abs(got - ref)
    bad = err > tol * (np.abs(ref) + scale)
    assert not bad.any(), (f"{what} ({dtype}): {bad.sum()} of {bad.size} off, max err "
                           f"{err.max():.3g} at scale {scale:.3g} (tol {tol})")


def dx_scale(x, w, g, eps=EPS):
    """RMS of the terms w g / RMS(x) whose difference is dx: float32 rounding is relative to
    them, and dx itself nearly vanishes when they cancel (D = 1: y = w sign(x))."""
    return np.sqrt(np.mean((w * g / np.sqrt((x**2).mean(-1, keepdims=True) + eps)) ** 2))


def seed_inputs(rows, dims, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, dims))
    w = 1 + 0.2 * rng.normal(size=dims)
    a = 0.5 + 0.2 * rng.normal(size=dims)
    b = rng.normal(size=dims) * 0.8 / np.sqrt(dims)
    g = rng.normal(size=(rows, dims))
    mx_args = [cast(v, dtype) for v in (x, w, a, b, g)]
    return mx_args, [f64(v) for v in mx_args]


def run_vjp(fn, primals, cotangents):
    outs, grads = mx.vjp(fn, primals, cotangents)
    mx.eval(outs, grads)
    return outs, grads


# ----------------------------------------------------------------- SeeDNorm

SEED_CASES = (
    [(3, d, t) for d in (1, 31, 32, 33, 1024, 4096, 4099, 8192) for t in DTYPES]
    + [(1, d, "float32") for d in (1, 33, 4099)]
    + [(1000, 33, "float16"), (1000, 1024, "bfloat16"), (1000, 4099, "float32")]
    # register tiles of 12, 13 and 32 iterations (the widest row the kernels take)
    + [(2, 12288, "float32"), (2, 12291, "bfloat16"), (1, 32768, "float32")]
)


@pytest.mark.parametrize("rows,dims,dtype", SEED_CASES)
def test_seednorm_forward_and_gradients(rows, dims, dtype):
    (x, w, a, b, g), (x64, w64, a64, b64, g64) = seed_inputs(rows, dims, dtype)
    y_ref, grads_ref = ref_seednorm(x64, w64, a64, b64, g=g64)
    fn = lambda *p: kernels.seednorm(*p, backend="emulate")
    (y,), grads = run_vjp(fn, [x, w, a, b], [g])
    assert y.dtype == x.dtype
    assert_close(y, y_ref, dtype, "y")
    for name, got, ref in zip(("dx", "dweight", "dalpha", "dbeta"), grads, grads_ref):
        assert got.dtype == x.dtype
        assert_close(got, ref, dtype, name)

    ops = lambda *p: norms.seednorm(*p)
    (y_ops,), grads_ops = run_vjp(ops, [x, w, a, b], [g])
    assert_close(y, f64(y_ops), dtype, "y vs ops twin", factor=2)
    for name, got, twin in zip(("dx", "dweight", "dalpha", "dbeta"), grads, grads_ops):
        assert_close(got, f64(twin), dtype, f"{name} vs ops twin", factor=2)


@pytest.mark.parametrize("heads,head_rms,dot_scale,dims,dtype", [
    (4, False, "none", 1024, "float32"),
    (4, True, "rsqrt_d", 1024, "bfloat16"),
    (16, False, "rsqrt_d", 4096, "float16"),
    (3, True, "none", 33, "float32"),
    (2, False, "none", 8192, "float32"),
    (4, False, "rsqrt_d", 64, "float32"),
    (8, True, "rsqrt_d", 4096, "float32"),
])
def test_seednorm_multi_head(heads, head_rms, dot_scale, dims, dtype):
    """Both paths against the reference: the ops twin is what Linux and the model run."""
    (x, w, a, b, g), (x64, w64, a64, b64, g64) = seed_inputs(5, dims, dtype, seed=heads)
    scale = (dims // heads) ** -0.5 if dot_scale == "rsqrt_d" else 1.0
    y_ref, grads_ref = ref_seednorm(x64, w64, a64, b64, heads=heads, scale=scale,
                                    head_rms=head_rms, g=g64)
    results = {}
    for backend in ("ops", "emulate"):
        fn = lambda *p, backend=backend: kernels.seednorm(
            *p, num_heads=heads, backend=backend, dot_scale=dot_scale, head_rms=head_rms)
        (y,), grads = results[backend] = run_vjp(fn, [x, w, a, b], [g])
        assert_close(y, y_ref, dtype, f"y ({backend})")
        for name, got, ref in zip(("dx", "dweight", "dalpha", "dbeta"), grads, grads_ref):
            assert_close(got, ref, dtype, f"{name} ({backend})")
    (y_ops,), grads_ops = results["ops"]
    (y_emu,), grads_emu = results["emulate"]
    assert_close(y_emu, f64(y_ops), dtype, "y kernel vs ops twin", factor=2)
    for name, got, twin in zip(("dx", "dweight", "dalpha", "dbeta"), grads_emu, grads_ops):
        assert_close(got, f64(twin), dtype, f"{name} kernel vs ops twin", factor=2)


@pytest.mark.parametrize("heads", [5, 7, 12, 13])
def test_seednorm_head_counts_with_odd_heads_across_iterations(heads, monkeypatch):
    """Head widths of 45 (odd: a thread's 4-column span crosses heads) under a 64-thread
    pipeline limit, so each thread's tile has 3 iterations and meets several heads: the running
    per-head sums and the per-head lookups, forward and backward, against the reference."""
    from mlx_localnorm.emulate.kernel import MAX_THREADS_ENV

    monkeypatch.setenv(MAX_THREADS_ENV, "64")
    dims = 45 * heads
    (x, w, a, b, g), (x64, w64, a64, b64, g64) = seed_inputs(7, dims, "float32", seed=heads)
    head_rms = heads % 2 == 1
    y_ref, grads_ref = ref_seednorm(x64, w64, a64, b64, heads=heads, head_rms=head_rms, g=g64)
    with kernels.record_traffic() as launches:
        (y,), grads = run_vjp(lambda *p: kernels.seednorm(*p, num_heads=heads, head_rms=head_rms,
                                                           backend="emulate"), [x, w, a, b], [g])
    assert launches and launches[0].threadgroup[0] == 64
    assert_close(y, y_ref, "float32", "y")
    for name, got, ref in zip(("dx", "dweight", "dalpha", "dbeta"), grads, grads_ref):
        assert_close(got, ref, "float32", name)


@pytest.mark.parametrize("backend", ["ops", "emulate"])
@pytest.mark.parametrize("dims,dtype", [(33, "float32"), (1024, "float16"), (8192, "bfloat16")])
def test_seednorm_frozen_parameters(dims, dtype, backend):
    (x, w, a, b, g), (x64, w64, a64, b64, g64) = seed_inputs(3, dims, dtype, seed=7)
    _, (dx_ref, *_) = ref_seednorm(x64, w64, a64, b64, g=g64)
    fn = lambda *p: kernels.seednorm(*p, backend=backend, frozen=True)
    with kernels.record_traffic() as launches:
        (y,), (dx, dw, da, db) = run_vjp(fn, [x, w, a, b], [g])
    assert_close(y, ref_seednorm(x64, w64, a64, b64), dtype, "y")
    assert_close(dx, dx_ref, dtype, "dx")
    for grad in (dw, da, db):
        assert not f64(grad).any(), "frozen parameters must get zero gradients"
    # The kernel skips the parameter partials: no such output, no column sum.
    assert [s.kernel.split("__")[0] for s in launches] == (
        [] if backend == "ops" else ["custom_kernel_mlx_localnorm_seednorm_fwd",
                                     "custom_kernel_mlx_localnorm_seednorm_bwd_frozen"])
    assert all(b.name != "param_partials" for s in launches for b in s.buffers)


@pytest.mark.parametrize("backend", ["ops", "emulate"])
@pytest.mark.parametrize("rows,dims,dtype", [(3, 1, "float32"), (5, 33, "float16"),
                                             (2, 4099, "bfloat16"), (100, 1024, "float32")])
def test_rms_norm_kernel_frozen_weight(rows, dims, dtype, backend):
    (x, w, _, _, g), (x64, w64, _, _, g64) = seed_inputs(rows, dims, dtype, seed=13)
    zero = np.zeros(dims)
    y_ref, (dx_ref, *_) = ref_seednorm(x64, w64, zero, zero, g=g64)
    fn = lambda x, w: kernels.rms_norm(x, w, backend=backend, frozen=True)
    with kernels.record_traffic() as launches:
        (y,), (dx, dw) = run_vjp(fn, [x, w], [g])
    assert y.dtype == dx.dtype == x.dtype and dw.dtype == w.dtype
    assert_close(y, y_ref, dtype, "y")
    assert_close(dx, dx_ref, dtype, "dx", scale=dx_scale(x64, w64, g64))
    assert not f64(dw).any(), "a frozen weight must get a zero gradient"
    assert [s.kernel.split("__")[0] for s in launches] == (
        [] if backend == "ops" else ["custom_kernel_mlx_localnorm_rmsnorm_fwd",
                                     "custom_kernel_mlx_localnorm_rmsnorm_bwd_frozen"])
    assert all(b.name != "param_partials" for s in launches for b in s.buffers)


@pytest.mark.parametrize("rows,dims,dtype", [
    (3, 1, "float32"), (3, 33, "float16"), (1000, 1024, "float32"), (3, 4099, "bfloat16"),
])
def test_seednorm_fused_residual(rows, dims, dtype):
    (x, w, a, b, g), _ = seed_inputs(rows, dims, dtype, seed=3)
    rng = np.random.default_rng(4)
    r = cast(rng.normal(size=(rows, dims)), dtype)
    g_h = cast(rng.normal(size=(rows, dims)), dtype)
    h64 = f64(x + r)  # the sum rounded to the dtype, as the caller receives it
    w64, a64, b64, g64 = (f64(v) for v in (w, a, b, g))
    y_ref, (dh, *param_refs) = ref_seednorm(h64, w64, a64, b64, g=g64)
    dx_ref = dh + f64(g_h)

    fn = lambda x, r, w, a, b: kernels.seednorm(x, w, a, b, residual=r,
                                                backend="emulate")
    (h, y), (dx, dr, *param_grads) = run_vjp(fn, [x, r, w, a, b], [g_h, g])
    assert_close(h, h64, dtype, "h")
    assert_close(y, y_ref, dtype, "y")
    assert_close(dx, dx_ref, dtype, "dx")
    assert_close(dr, dx_ref, dtype, "dresidual")
    for name, got, ref in zip(("dweight", "dalpha", "dbeta"), param_grads, param_refs):
        assert_close(got, ref, dtype, name)


# ----------------------------------------------------------------- memory traffic (emulator counts)

@pytest.mark.parametrize("rows,dims,dtype,residual,heads,frozen", [
    (8192, 1024, "float16", False, 1, False),
    (8192, 2048, "bfloat16", False, 1, False),
    (8192, 1027, "float32", True, 1, False),
    (8192, 512, "bfloat16", False, 4, True),
])
def test_seednorm_traffic_near_the_minimum(rows, dims, dtype, residual, heads, frozen):
    """Minimum: every input read once, every output written once. Forward <= 1.05x, backward
    (with the column sum of the parameter partials) <= 1.15x, at MLX's benchmark row count
    (8 x 1024), where each threadgroup takes a full block of 64 rows."""
    (x, w, a, b, g), _ = seed_inputs(rows, dims, dtype)
    tensor, params = x.nbytes, w.nbytes + a.nbytes + b.nbytes
    extra = [x] if residual else []
    cotangents = [g, g][: 1 + residual]

    def fn(x, w, a, b, *r):
        return kernels.seednorm(x, w, a, b, num_heads=heads, residual=r[0] if r else None,
                                backend="emulate", frozen=frozen)

    with kernels.record_traffic() as forward:
        mx.eval(fn(x, w, a, b, *extra))
    (launch,) = forward
    assert launch["x"].bytes_read == tensor and launch["y"].bytes_written == tensor
    fwd_min = (2 + 2 * residual) * tensor + params
    ratio = launch.bytes_moved / fwd_min
    assert ratio <= 1.05, f"forward moved {ratio:.3f}x the minimum"

    with kernels.record_traffic() as launches:
        outs, grads = run_vjp(fn, [x, w, a, b, *extra], cotangents)
    backward = [s for s in launches if "bwd" in s.kernel or "column_sum" in s.kernel]
    assert len(backward) == 1 + (not frozen)
    assert backward[0]["cotangent"].bytes_read == tensor
    assert backward[0]["grad_x"].bytes_written == tensor
    bwd_min = (3 + residual) * tensor + params * (1 if frozen else 2)
    moved = sum(s.bytes_moved for s in backward)
    assert moved <= 1.15 * bwd_min, f"backward moved {moved / bwd_min:.3f}x"

    # Full 64-row blocks give the same values as the ops twin.
    twin_outs, twin_grads = run_vjp(
        lambda *p: kernels.seednorm(*p[:4], num_heads=heads, residual=p[4] if residual else None,
                                    backend="ops"), [x, w, a, b, *extra], cotangents)
    for got, twin in zip(outs + grads[:1], twin_outs + twin_grads[:1]):
        assert_close(got, f64(twin), dtype, "kernel vs ops twin", factor=2)
    if not frozen:
        for got, twin in zip(grads[-3:], twin_grads[-3:]):
            assert_close(got, f64(twin), dtype, "parameter gradient vs ops twin", factor=2)


# ----------------------------------------------------------------- RMSNorm from the same template

@pytest.mark.parametrize("rows,dims,dtype", [
    (3, 1, "float32"), (3, 31, "bfloat16"), (3, 32, "float16"), (1, 1024, "float32"),
    (3, 4099, "float16"), (3, 8192, "bfloat16"), (1000, 33, "float32"), (2, 12288, "float16"),
])
def test_rms_norm_kernel(rows, dims, dtype):
    (x, w, _, _, g), (x64, w64, _, _, g64) = seed_inputs(rows, dims, dtype, seed=11)
    zero = np.zeros(dims)
    y_ref, (dx_ref, dw_ref, *_) = ref_seednorm(x64, w64, zero, zero, g=g64)
    fn = lambda x, w: kernels.rms_norm(x, w, backend="emulate")
    (y,), (dx, dw) = run_vjp(fn, [x, w], [g])
    assert_close(y, y_ref, dtype, "y")
    cancel = dx_scale(x64, w64, g64)
    assert_close(dx, dx_ref, dtype, "dx", scale=cancel)
    assert_close(dw, dw_ref, dtype, "dweight")
    (y_fast,), (dx_fast, dw_fast) = run_vjp(lambda x, w: mx.fast.rms_norm(x, w, EPS), [x, w], [g])
    assert_close(y, f64(y_fast), dtype, "y vs mx.fast.rms_norm", factor=2)
    assert_close(dx, f64(dx_fast), dtype, "dx vs mx.fast.rms_norm", factor=2, scale=cancel)
    assert_close(dw, f64(dw_fast), dtype, "dweight vs mx.fast.rms_norm", factor=2)


# ----------------------------------------------------------------- PatchNorm

PATCH_CASES = [
    # shape, patch_size, patch_ndim, mode, full weight, bias, dtype
    ((2, 7, 33), 3, 1, "rms", False, True, "float32"),
    ((2, 7, 33), 4, 1, "affine", True, True, "float32"),
    ((1, 5, 1024), 2, 1, "rms", True, False, "bfloat16"),
    ((3, 1), 1, 1, "rms", False, True, "float16"),
    ((1, 9, 4099), 5, 1, "affine", False, True, "float16"),
    ((2, 4, 5, 31), 3, 2, "rms", True, True, "float32"),
    ((1, 3, 4, 32), 2, 2, "affine", False, True, "bfloat16"),
    ((1, 2, 2, 8192), 2, 2, "rms", False, False, "float32"),
]


@pytest.mark.parametrize("shape,k,ndim,mode,full,bias,dtype", PATCH_CASES)
def test_patchnorm_forward_and_gradients(shape, k, ndim, mode, full, bias, dtype):
    rng = np.random.default_rng(k + 10 * ndim)
    dims = shape[-1]
    out = min(dims, 48) if full else dims
    x = cast(rng.normal(size=shape), dtype)
    weight = cast(rng.normal(size=(out, dims)) / np.sqrt(dims) if full
                  else 1 + 0.2 * rng.normal(size=dims), dtype)
    b = cast(0.1 * rng.normal(size=out), dtype) if bias else None
    g = cast(rng.normal(size=shape[:-1] + (out,)), dtype)
    y_ref, grads_ref = ref_patchnorm(f64(x), f64(weight), f64(b) if bias else None, k, ndim,
                                     mode, g=f64(g))
    primals = [x, weight] + ([b] if bias else [])

    def run(fn):
        return run_vjp(lambda x, w, *b: fn(x, w, b[0] if b else None, EPS, k, ndim, mode),
                       primals, [g])

    (y,), grads = run(lambda *a: kernels.patchnorm(*a, backend="emulate"))
    assert y.dtype == x.dtype
    assert_close(y, y_ref, dtype, "y")
    for name, got, ref in zip(("dx", "dweight", "dbias"), grads, grads_ref):
        assert_close(got, ref, dtype, name)
    (y_ops,), grads_ops = run(norms.patchnorm)
    assert_close(y, f64(y_ops), dtype, "y vs ops twin", factor=2)
    for name, got, twin in zip(("dx", "dweight", "dbias"), grads, grads_ops):
        assert_close(got, f64(twin), dtype, f"{name} vs ops twin", factor=2)


# ----------------------------------------------------------------- thread schedules

@pytest.fixture
def three_schedules(monkeypatch):
    """Every emulated launch runs under three seeded thread and threadgroup orders and must
    give bitwise-equal outputs (a race shows up as a difference); the kernel objects are
    rebuilt to read the setting, and rebuilt again afterwards."""
    from mlx_localnorm.emulate.kernel import SCHEDULES_ENV, SEED_ENV

    caches = [importlib.import_module(f"mlx_localnorm.kernels.{name}")._fused
              for name in ("seednorm", "patchnorm")]
    caches.append(importlib.import_module("mlx_localnorm.kernels._launch").kernel)

    def rebuild():
        for cache in caches:
            cache.cache_clear()

    monkeypatch.setenv(SCHEDULES_ENV, "3")
    monkeypatch.setenv(SEED_ENV, "11")
    rebuild()
    yield
    monkeypatch.delenv(SCHEDULES_ENV)
    monkeypatch.delenv(SEED_ENV)
    rebuild()


SCHEDULED = {
    "seednorm 2 heads": lambda x, w, a, b, be: kernels.seednorm(x, w, a, b, num_heads=2,
                                                                backend=be),
    "seednorm residual": lambda x, w, a, b, be: kernels.seednorm(x, w, a, b, residual=x * a,
                                                                 backend=be)[1],
    "seednorm frozen, head_rms": lambda x, w, a, b, be: kernels.seednorm(
        x, w, a, b, num_heads=4, head_rms=True, frozen=True, backend=be),
    "rms_norm": lambda x, w, a, b, be: kernels.rms_norm(x, w, backend=be) * a,
    "patchnorm 1-D k=3 affine": lambda x, w, a, b, be: kernels.patchnorm(
        x.reshape(2, -1, x.shape[-1]), w, b, patch_size=3, mode="affine", backend=be),
    "patchnorm 2-D k=2": lambda x, w, a, b, be: kernels.patchnorm(
        x.reshape(1, 4, -1, x.shape[-1]), w, b, patch_size=2, patch_ndim=2, backend=be),
}


@pytest.mark.parametrize("order", ["forward", "reverse", "shuffle"])
@pytest.mark.parametrize("case", list(SCHEDULED))
def test_package_kernels_agree_under_several_thread_schedules(case, order, three_schedules,
                                                              monkeypatch):
    """Forward and backward kernels, with several simdgroups and threadgroups per launch, with
    the threads of each threadgroup run forward, reversed and shuffled between barriers (the
    emulator's threadgroup-memory race check sees a different interleaving in each)."""
    monkeypatch.setenv("MLX_LOCALNORM_EMULATE_ORDER", order)
    (x, w, a, b, _), _ = seed_inputs(8, 300, "float32", seed=21)
    results = {}
    for backend in ("emulate", "ops"):
        fn = lambda *p, backend=backend: SCHEDULED[case](*p, backend)
        with kernels.record_traffic() as launches:
            y = fn(x, w, a, b)
            g = mx.random.normal(y.shape, key=mx.random.key(22))
            results[backend] = run_vjp(fn, [x, w, a, b], [g])
        assert bool(launches) == (backend == "emulate")
    (out_emu, grads_emu), (out_ops, grads_ops) = results["emulate"], results["ops"]
    for name, got, twin in zip(("y", "dx", "dweight", "dalpha", "dbeta"),
                               out_emu + grads_emu, out_ops + grads_ops):
        assert_close(got, f64(twin), "float32", f"{case}: {name} vs ops twin", factor=2)


# Barriers of the multi-head forward, each removed in turn: the emulator's threadgroup-memory
# race check must name the array the missing barrier protected.
MISSING_BARRIERS = {
    "partials cleared": ("common.h", "  threadgroup_barrier(mem_flags::mem_threadgroup);\n"
                                     "  if (simd_lane == 0)", "  if (simd_lane == 0)", "partial"),
    "per-head statistics": ("seednorm_fwd.metal", "  if (HEADS > 1) {\n    threadgroup_barrier("
                            "mem_flags::mem_threadgroup);\n  }\n", "", "head_stats"),
    "device flag only": ("common.h", "mem_flags::mem_threadgroup", "mem_flags::mem_device",
                         "partial"),
}


@pytest.mark.parametrize("case", list(MISSING_BARRIERS))
def test_a_missing_barrier_in_the_kernel_is_caught(case):
    from mlx_localnorm.emulate import EmulatorError, metal_kernel

    launch = importlib.import_module("mlx_localnorm.kernels._launch")
    filename, old, new, array = MISSING_BARRIERS[case]
    text = {name: launch._read(name) for name in ("common.h", "seednorm_fwd.metal")}
    assert old in text[filename]
    text[filename] = text[filename].replace(old, new)
    kernel = metal_kernel(f"planted_{len(text['common.h'])}_{len(text['seednorm_fwd.metal'])}",
                          ["x", "weight", "alpha", "beta", "consts"], ["y", "stats"],
                          "#define DYNAMIC 1\n#define RESIDUAL 0\n" + text["seednorm_fwd.metal"],
                          header=text["common.h"])
    (x, w, a, b, _), _ = seed_inputs(6, 1000, "float32", seed=5)
    template = [("T", mx.float32), ("TW", mx.float32), ("N_READS", 4), ("ITERS", 1),
                ("HEADS", 4), ("HEAD_RMS", False)]
    with pytest.raises(EmulatorError, match=rf"threadgroup memory race on '{array}'"):
        kernel(inputs=[x, w, a, b, launch.consts(1e-6, 1.0)], template=template,
               grid=(2 * 256, 1, 1), threadgroup=(256, 1, 1), output_shapes=[(6, 1000), (6, 8)],
               output_dtypes=[mx.float32, mx.float32])


# ----------------------------------------------------------------- pipeline thread limits

LIMITED = {
    "seednorm": lambda x, w, a, b, be: kernels.seednorm(x, w, a, b, backend=be),
    "seednorm 16 heads, head_rms": lambda x, w, a, b, be: kernels.seednorm(
        x, w, a, b, num_heads=16, head_rms=True, dot_scale="rsqrt_d", backend=be),
    "seednorm residual, frozen": lambda x, w, a, b, be: kernels.seednorm(
        x, w, a, b, residual=x * a, frozen=True, backend=be)[1],
    "rms_norm": lambda x, w, a, b, be: kernels.rms_norm(x, w, backend=be) * a,
    "patchnorm 1-D k=2": lambda x, w, a, b, be: kernels.patchnorm(
        x.reshape(1, -1, x.shape[-1]), w, b, patch_size=2, backend=be),
}


@pytest.mark.parametrize("limit", [832, 512])
@pytest.mark.parametrize("case", list(LIMITED))
def test_package_kernels_run_under_a_lower_pipeline_thread_limit(case, limit, monkeypatch):
    """Register-heavy pipelines allow fewer than 1024 threads (832 on an M1 Max): every
    forward and backward kernel must launch within that, at a width that once asked for 1024."""
    from mlx_localnorm.emulate.kernel import MAX_THREADS_ENV

    monkeypatch.setenv(MAX_THREADS_ENV, str(limit))
    (x, w, a, b, _), _ = seed_inputs(3, 4096, "float32", seed=31)
    results = {}
    for name in ("emulate", "ops"):
        fn = lambda *p, name=name: LIMITED[case](*p, name)
        y = fn(x, w, a, b)
        g = mx.random.normal(y.shape, key=mx.random.key(32))
        with kernels.record_traffic() as launches:
            results[name] = run_vjp(fn, [x, w, a, b], [g])
        assert bool(launches) == (name == "emulate")
    (out_emu, grads_emu), (out_ops, grads_ops) = results["emulate"], results["ops"]
    for name, got, twin in zip(("y", "dx", "dweight", "dalpha", "dbeta"),
                               out_emu + grads_emu, out_ops + grads_ops):
        assert_close(got, f64(twin), "float32", f"{case}: {name} vs ops twin", factor=2)


def test_geometry_follows_a_pipeline_limit_below_the_cap_or_falls_back(monkeypatch):
    """Under a 64-thread limit the kernels launch 64-thread groups; a row too wide for 64
    threads' register tiles runs the ops twin with a warning instead of failing at launch."""
    from mlx_localnorm.emulate.kernel import MAX_THREADS_ENV

    monkeypatch.setenv(MAX_THREADS_ENV, "64")
    (x, w, a, b, g), (x64, w64, a64, b64, g64) = seed_inputs(3, 1000, "float32", seed=33)
    y_ref, grads_ref = ref_seednorm(x64, w64, a64, b64, g=g64)
    with kernels.record_traffic() as launches:
        (y,), grads = run_vjp(lambda *p: kernels.seednorm(*p, backend="emulate"),
                              [x, w, a, b], [g])
    assert launches and all(s.threadgroup[0] <= 64 for s in launches)
    assert_close(y, y_ref, "float32", "y")
    for name, got, ref in zip(("dx", "dweight", "dalpha", "dbeta"), grads, grads_ref):
        assert_close(got, ref, "float32", name)

    (x, w, a, b, _), (x64, w64, a64, b64, _) = seed_inputs(2, 64 * 4 * 32 + 4, "float32")
    with pytest.warns(UserWarning, match="wider than 8192; using the MLX ops twin"):
        with kernels.record_traffic() as launches:
            y = kernels.rms_norm(x, w, backend="emulate")
    assert not launches
    zero = np.zeros(x.shape[-1])
    assert_close(y, ref_seednorm(x64, w64, zero, zero), "float32", "fallback y")


# ----------------------------------------------------------------- the references themselves

def test_references_match_finite_differences():
    rng = np.random.default_rng(0)

    def check(f, primals, grads, g):
        for i, v in enumerate(primals):
            num = np.zeros_like(v)
            for j in np.ndindex(v.shape):
                e = np.zeros_like(v)
                e[j] = 1e-6
                plus, minus = list(primals), list(primals)
                plus[i], minus[i] = v + e, v - e
                num[j] = ((f(*plus) - f(*minus)) * g).sum() / 2e-6
            np.testing.assert_allclose(grads[i], num, atol=1e-7, rtol=1e-6)

    for heads, head_rms, scale in ((1, False, 1.0), (2, True, 0.5), (4, False, 0.3)):
        p = [rng.normal(size=(3, 8))] + [rng.normal(size=8) for _ in range(3)]
        g = rng.normal(size=(3, 8))
        kw = {"heads": heads, "scale": scale, "head_rms": head_rms}
        check(lambda *q, kw=kw: ref_seednorm(*q, **kw), p, ref_seednorm(*p, **kw, g=g)[1], g)
    for shape, k, ndim, mode, full in (((2, 5, 3), 3, 1, "rms", False),
                                       ((1, 4, 5, 3), 2, 2, "affine", True)):
        out = 4 if full else 3
        p = [rng.normal(size=shape), rng.normal(size=(out, 3) if full else 3),
             rng.normal(size=out)]
        g = rng.normal(size=shape[:-1] + (out,))
        check(lambda x, w, b, k=k, ndim=ndim, mode=mode: ref_patchnorm(x, w, b, k, ndim, mode),
              p, ref_patchnorm(*p, k, ndim, mode, g=g)[1], g)


# ----------------------------------------------------------------- dispatch and errors

@pytest.mark.parametrize("shape", [(40,), (2, 3, 5, 40)])
def test_any_leading_shape(shape):
    (x, w, a, b, _), _ = seed_inputs(math.prod(shape[:-1]), 40, "float32")
    x = x.reshape(shape)
    y = kernels.seednorm(x, w, a, b, backend="emulate")
    assert y.shape == x.shape
    assert_close(y, f64(norms.seednorm(x, w, a, b)), "float32", "y vs ops twin", factor=2)
    h, y = kernels.seednorm(x, w, a, b, residual=x, backend="emulate")
    assert h.shape == y.shape == x.shape
    z = kernels.patchnorm(x, w, backend="emulate")
    assert_close(z, f64(norms.patchnorm(x, w)), "float32", "patchnorm vs ops twin", factor=2)


def test_backend_choice_and_env_override(monkeypatch):
    monkeypatch.delenv(kernels.BACKEND_ENV, raising=False)
    expected = "metal" if mx.metal.is_available() else "ops"
    assert kernels.resolve_backend("auto") == expected
    assert kernels.resolve_backend("emulate") == "emulate"
    monkeypatch.setenv(kernels.BACKEND_ENV, "ops")
    assert kernels.resolve_backend("emulate") == "ops"
    monkeypatch.setenv(kernels.BACKEND_ENV, "gpu")
    with pytest.raises(ValueError, match="MLX_LOCALNORM_BACKEND"):
        kernels.resolve_backend("auto")
    monkeypatch.delenv(kernels.BACKEND_ENV)
    with pytest.raises(ValueError, match="backend must be one of"):
        kernels.resolve_backend("cuda")
    if not mx.metal.is_available():
        with pytest.raises(ValueError, match="needs a Metal GPU"):
            kernels.resolve_backend("metal")


def test_ops_backend_is_the_ops_twin():
    (x, w, a, b, _), _ = seed_inputs(4, 64, "float32")
    y = kernels.seednorm(x, w, a, b, backend="ops")
    assert mx.array_equal(y, norms.seednorm(x, w, a, b))
    h, y = kernels.seednorm(x, w, a, b, residual=x, backend="ops")
    assert mx.array_equal(h, x + x) and mx.array_equal(y, norms.seednorm(x + x, w, a, b))


@pytest.mark.parametrize("backend", ["metal", "emulate"], ids=["gpu_geometry", "emulated"])
def test_launch_geometry_never_asks_for_a_grid_over_int32(backend):
    """MLX takes grid components as C++ ints (a larger one is a TypeError at the call): shapes
    whose rows x threads would cross 2**31 - 1 are refused before any launch, by arithmetic on
    the shape alone (nothing this large is allocated)."""
    _launch, patchnorm, seednorm = (importlib.import_module(f"mlx_localnorm.kernels.{name}")
                                    for name in ("_launch", "patchnorm", "seednorm"))

    assert _launch.MAX_GRID == 2**31 - 1
    # PatchNorm: one 32-thread threadgroup per position of 4 channels.
    fits, over = (2**31 - 1) // 32, (2**31 - 1) // 32 + 1
    assert _launch.row_launch(fits, 4, backend).grid == (fits * 32, 1, 1)
    assert patchnorm._unsupported((fits, 4), mx.float32, 4, backend) is None
    reason = patchnorm._unsupported((64, over // 64 + 1, 4), mx.float32, 4, backend)
    assert reason and "over MLX's limit of 2**31 - 1" in reason
    # The output width counts too: 4 channels in, 1024 out (256 threads per position).
    assert "grid of" in patchnorm._unsupported((2**24, 4), mx.float32, 1024, backend)
    with pytest.raises(ValueError, match=r"row_launch: .* need a grid of \d+ threads"):
        _launch.row_launch(over, 4, backend)
    # SeeDNorm blocks 64 rows per threadgroup: 2**31 rows of 4096 need 2**25 x 256 threads.
    fake = types.SimpleNamespace(shape=(2**31, 4096), dtype=mx.float32, size=2**43)
    params = [mx.ones((4096,))]
    assert "over MLX's limit" in seednorm._unsupported(fake, params, 1, backend)
    fake.shape = (2**28, 4096)
    assert seednorm._unsupported(fake, params, 1, backend) is None


def test_unsupported_shapes_fall_back_once_with_a_warning():
    dims = 32768 + 4
    (x, w, a, b, _), (x64, w64, a64, b64, _) = seed_inputs(2, dims, "float32")
    with pytest.warns(UserWarning, match="wider than 32768; using the MLX ops twin"):
        y = kernels.seednorm(x, w, a, b, backend="emulate")
    assert_close(y, ref_seednorm(x64, w64, a64, b64), "float32", "fallback y")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kernels.seednorm(x, w, a, b, backend="emulate")  # said once already
    x16 = x.astype(mx.float16)
    with pytest.warns(UserWarning, match="parameter dtypes"):
        kernels.seednorm(x16[:, :64], w[:64], a[:64].astype(mx.float16), b[:64],
                         backend="emulate")


@pytest.mark.parametrize("call,match", [
    (lambda x, w: kernels.seednorm(x, w[:-1], w, w, backend="emulate"), "weight must have shape"),
    (lambda x, w: kernels.seednorm(x, w, w, w, num_heads=5, backend="emulate"), "num_heads=5"),
    (lambda x, w: kernels.seednorm(x, w, w, w, eps=0.0, backend="emulate"), "eps"),
    (lambda x, w: kernels.seednorm(x, w, w, w, residual=x[:1], backend="emulate"), "residual"),
    (lambda x, w: kernels.seednorm(x, w, w, w, backend="tpu"), "backend must be one of"),
    (lambda x, w: kernels.patchnorm(x, w, patch_size=0, backend="emulate"), "patch_size"),
    (lambda x, w: kernels.patchnorm(x, w, mode="l1", backend="emulate"), "mode"),
    (lambda x, w: kernels.rms_norm(x, w[:3], backend="emulate"), "weight must have shape"),
])
def test_bad_arguments_raise_clear_errors(call, match):
    x, w = mx.ones((2, 8)), mx.ones((8,))
    with pytest.raises(ValueError, match=match):
        call(x, w)
    with pytest.raises(TypeError, match="mx.array"):
        kernels.seednorm(np.ones((2, 8)), w, w, w)


KERNEL_PARAMETERS = {
    "seednorm weight": (lambda x, v, w: kernels.seednorm(x, v, w, w, backend="emulate"), "weight"),
    "seednorm alpha": (lambda x, v, w: kernels.seednorm(x, w, v, w, backend="emulate"), "alpha"),
    "seednorm beta": (lambda x, v, w: kernels.seednorm(x, w, w, v, backend="ops"), "beta"),
    "rms_norm weight": (lambda x, v, w: kernels.rms_norm(x, v, backend="emulate"), "weight"),
    "patchnorm weight": (lambda x, v, w: kernels.patchnorm(x, v, backend="emulate"), "weight"),
    "patchnorm bias": (lambda x, v, w: kernels.patchnorm(x, w, v, backend="ops"), "bias"),
}


@pytest.mark.parametrize("case,value", [
    (case, value) for case in KERNEL_PARAMETERS
    for value in ([1.0] * 8, np.ones(8, np.float32)) + (() if "bias" in case else (None,))])
def test_kernel_parameters_must_be_arrays(case, value):
    call, argument = KERNEL_PARAMETERS[case]
    x, w = mx.ones((2, 8)), mx.ones((8,))
    optional = " or None" if argument == "bias" else ""
    with pytest.raises(TypeError, match=rf"kernels\.\w+: {argument} must be an mx\.array"
                                        rf"{optional}, got {type(value).__name__}"):
        call(x, value, w)


def test_emulated_kernel_gradients_under_value_and_grad():
    from mlx import nn

    class Block(nn.Module):
        def __init__(self, dims):
            super().__init__()
            self.weight, self.alpha = mx.ones((dims,)), mx.full((dims,), 0.5)
            self.beta = 0.1 * mx.random.normal((dims,), key=mx.random.key(0))

        def __call__(self, x, backend):
            return kernels.seednorm(x, self.weight, self.alpha, self.beta, backend=backend)

    block = Block(40)
    x = mx.random.normal((6, 40), key=mx.random.key(1))
    results = {}
    for backend in ("emulate", "ops"):
        def loss(m, x, backend=backend):
            return (m(x, backend) ** 3).sum()

        results[backend] = nn.value_and_grad(block, loss)(block, x)
    (v_emu, g_emu), (v_ops, g_ops) = results["emulate"], results["ops"]
    assert abs(v_emu.item() - v_ops.item()) <= 1e-4 * abs(v_ops.item())
    for name in ("weight", "alpha", "beta"):
        assert_close(g_emu[name], f64(g_ops[name]), "float32", name, factor=5)


@pytest.mark.parametrize("variant", ["seednorm", "frozen", "residual", "rms_norm", "patchnorm"])
def test_second_order_gradients_match_the_ops_twin(variant):
    """Gradients of a gradient: the backward kernel's own VJP differentiates the ops twin's."""
    (x, w, a, b, c), _ = seed_inputs(5, 40, "float32", seed=5)
    d = mx.random.normal(x.shape, key=mx.random.key(6))

    def norm(x, w, a, b, backend):
        if variant == "rms_norm":
            return kernels.rms_norm(x, w, backend=backend) * a
        if variant == "patchnorm":
            return kernels.patchnorm(x.reshape(1, 5, 40), w, b, patch_size=3, mode="affine",
                                     backend=backend).reshape(x.shape) * a
        if variant == "residual":
            h, y = kernels.seednorm(x, w, a, b, residual=c, backend=backend)
            return h * y
        return kernels.seednorm(x, w, a, b, backend=backend, frozen=variant == "frozen")

    def second(backend):
        def first(x, w, a, b):
            return mx.grad(lambda x: (norm(x, w, a, b, backend) * c).sum())(x)
        return mx.grad(lambda *p: (first(*p) * d).sum(), argnums=(0, 1, 2, 3))(x, w, a, b)

    for name, got, twin in zip(("x", "weight", "alpha", "beta"), second("emulate"),
                               second("ops")):
        assert_close(got, f64(twin), "float32", f"d/d{name} of dL/dx", factor=5)


def test_emulate_backend_says_it_cannot_be_compiled():
    (x, w, a, b, _), _ = seed_inputs(2, 64, "float32")
    compiled = mx.compile(lambda x: kernels.seednorm(x, w, a, b, backend="emulate"))
    with pytest.raises(ValueError, match="cannot be traced by mx.compile"):
        compiled(x)


def test_bench_counts_traffic_and_writes_csv(tmp_path):
    import csv

    from mlx_localnorm.bench import kernels as bench

    assert bench.main(["--out", str(tmp_path), "--no-timing", "--traffic-shapes", "128x256",
                       "--dtypes", "float16"]) == 0
    with open(tmp_path / "kernels_traffic.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(r["kernel"], r["pass"]) for r in rows} >= {("seednorm", "forward"),
                                                       ("seednorm", "backward")}
    for r in rows:
        assert float(r["ratio"]) >= 1.0 and float(r["bytes_per_element"]) > 0
    assert (tmp_path / "kernels.png").stat().st_size > 0


# ----------------------------------------------------------------- on a real Mac

@pytest.mark.metal
@pytest.mark.parametrize("dims", [33, 4096, 8192])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_metal_matches_ops_twin_eager_and_compiled(dims, dtype):
    (x, w, a, b, g), (x64, w64, a64, b64, g64) = seed_inputs(64, dims, dtype)
    y_ref, grads_ref = ref_seednorm(x64, w64, a64, b64, g=g64)
    fn = lambda *p: kernels.seednorm(*p, backend="metal")
    for f in (fn, mx.compile(fn)):
        (y,), grads = run_vjp(f, [x, w, a, b], [g])
        assert_close(y, y_ref, dtype, "y")
        for name, got, ref in zip(("dx", "dweight", "dalpha", "dbeta"), grads, grads_ref):
            assert_close(got, ref, dtype, name)


METAL_VS_EMULATOR = {
    "seednorm": lambda x, w, b, be: kernels.seednorm(x, w, w, b, backend=be),
    "seednorm 8 heads, head_rms": lambda x, w, b, be: kernels.seednorm(
        x, w, w, b, num_heads=8, head_rms=True, backend=be),
    "seednorm frozen": lambda x, w, b, be: kernels.seednorm(x, w, w, b, frozen=True, backend=be),
    "seednorm residual": lambda x, w, b, be: kernels.seednorm(x, w, w, b, residual=x,
                                                              backend=be)[1],
    "rms_norm": lambda x, w, b, be: kernels.rms_norm(x, w, backend=be),
    "patchnorm 1-D k=3 affine": lambda x, w, b, be: kernels.patchnorm(
        x, w, b, patch_size=3, mode="affine", backend=be),
    "patchnorm 2-D k=2": lambda x, w, b, be: kernels.patchnorm(
        x.reshape(4, 16, -1), w, b, patch_size=2, patch_ndim=2, backend=be),
}


@pytest.mark.metal
@pytest.mark.parametrize("case", list(METAL_VS_EMULATOR))
@pytest.mark.parametrize("dims", [40, 4099])
def test_metal_matches_the_emulator_on_the_same_source(case, dims):
    (x, w, _, b, g), _ = seed_inputs(64, dims, "float32")
    results = []
    for backend in ("metal", "emulate"):
        def fn(x, w, b, backend=backend):
            return METAL_VS_EMULATOR[case](x, w, b, backend)
        results.append(run_vjp(fn, [x, w, b], [g]))
    (out_metal, grads_metal), (out_emu, grads_emu) = results
    for got, ref in zip(out_metal + grads_metal, out_emu + grads_emu):
        assert_close(got, f64(ref), "float32", case, factor=2)
