"""The Metal kernels at the widest rows they take, on a real Mac (skipped elsewhere).

Widths 12288, 16384 and 32768 loop the register tile 12, 16 and 32 times within 256-thread
threadgroups; these are the launches that once asked for 1024 threads and failed on pipelines
with lower limits. Forward and every gradient against the float64 references of
test_kernels.py / test_norm_add_norm.py, with their per-dtype tolerances. Warnings are errors:
a silent fallback to the ops twin would test nothing.
"""

import warnings

import mlx.core as mx
import numpy as np
import pytest
from test_kernels import (
    assert_close,
    cast,
    dx_scale,
    f64,
    ref_patchnorm,
    ref_seednorm,
    run_vjp,
    seed_inputs,
)
from test_norm_add_norm import fused_fn, inputs, ref_norm_add_norm

import mlx_localnorm  # noqa: F401  (first: swaps MLX's CPU BLAS before mlx.core loads)
from mlx_localnorm import kernels

pytestmark = pytest.mark.metal
BACKEND = "metal"
WIDTHS = [12288, 16384, 32768]
SEED_VARIANTS = {
    "frozen": {"frozen": True},
    "residual": {},
    "16 heads, head_rms": {"num_heads": 16, "head_rms": True, "dot_scale": "rsqrt_d"},
}


@pytest.fixture(autouse=True)
def no_fallback():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("variant", list(SEED_VARIANTS))
@pytest.mark.parametrize("dims", WIDTHS)
def test_seednorm_wide_rows(dims, variant, dtype):
    (x, w, a, b, g), (x64, w64, a64, b64, g64) = seed_inputs(3, dims, dtype, seed=dims % 97)
    if variant == "residual":
        rng = np.random.default_rng(1)
        r, g_h = (cast(rng.normal(size=(3, dims)), dtype) for _ in range(2))
        fn = lambda x, r, w, a, b: kernels.seednorm(x, w, a, b, residual=r, backend=BACKEND)
        (h, y), (dx, dr, *param_grads) = run_vjp(fn, [x, r, w, a, b], [g_h, g])
        y_ref, (dh, *param_refs) = ref_seednorm(f64(x + r), w64, a64, b64, g=g64)
        assert_close(h, f64(x + r), dtype, "h")
        for name, got in (("dx", dx), ("dresidual", dr)):
            assert_close(got, dh + f64(g_h), dtype, name)
    else:
        options = SEED_VARIANTS[variant]
        heads = options.get("num_heads", 1)
        scale = (dims // heads) ** -0.5 if options.get("dot_scale") == "rsqrt_d" else 1.0
        fn = lambda *p: kernels.seednorm(*p, backend=BACKEND, **options)
        (y,), (dx, *param_grads) = run_vjp(fn, [x, w, a, b], [g])
        y_ref, (dx_ref, *param_refs) = ref_seednorm(
            x64, w64, a64, b64, heads=heads, scale=scale,
            head_rms=options.get("head_rms", False), g=g64)
        assert_close(dx, dx_ref, dtype, "dx")
        if options.get("frozen"):
            param_refs = [np.zeros(dims)] * 3
    assert_close(y, y_ref, dtype, "y")
    for name, got, ref in zip(("dweight", "dalpha", "dbeta"), param_grads, param_refs):
        assert_close(got, ref, dtype, name, scale=None if ref.any() else 1.0)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("dims", WIDTHS)
def test_rms_norm_wide_rows(dims, dtype):
    (x, w, _, _, g), (x64, w64, _, _, g64) = seed_inputs(3, dims, dtype, seed=5)
    zero = np.zeros(dims)
    y_ref, (dx_ref, dw_ref, *_) = ref_seednorm(x64, w64, zero, zero, g=g64)
    (y,), (dx, dw) = run_vjp(lambda x, w: kernels.rms_norm(x, w, backend=BACKEND), [x, w], [g])
    assert_close(y, y_ref, dtype, "y")
    assert_close(dx, dx_ref, dtype, "dx", scale=dx_scale(x64, w64, g64))
    assert_close(dw, dw_ref, dtype, "dweight")


@pytest.mark.parametrize("kind", ["seednorm", "rmsnorm"])
@pytest.mark.parametrize("dims", WIDTHS)
def test_norm_add_norm_wide_rows(dims, kind):
    primals, cots, p64, c64 = inputs(3, dims, "float32", kind, seed=7)
    n = (len(primals) - 2) // 2
    outs_ref, grads_ref = ref_norm_add_norm(p64[0], p64[1], p64[2:2 + n], p64[2 + n:], *c64)
    outs, grads = run_vjp(fused_fn(BACKEND, n), primals, cots)
    for got, ref in zip(outs + grads, outs_ref + grads_ref):
        assert_close(got, ref, "float32", f"{kind} at {dims}")


@pytest.mark.parametrize("full,mode", [(False, "rms"), (True, "affine")])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_patchnorm_at_4096(full, mode, dtype):
    rng = np.random.default_rng(3)
    dims, shape, k = 4096, (2, 9, 4096), 3
    x = cast(rng.normal(size=shape), dtype)
    weight = cast(rng.normal(size=(dims, dims)) / np.sqrt(dims) if full
                  else 1 + 0.2 * rng.normal(size=dims), dtype)
    bias = cast(0.1 * rng.normal(size=dims), dtype)
    g = cast(rng.normal(size=shape), dtype)
    y_ref, grads_ref = ref_patchnorm(f64(x), f64(weight), f64(bias), k, 1, mode, g=f64(g))
    fn = lambda x, w, b: kernels.patchnorm(x, w, b, patch_size=k, mode=mode, backend=BACKEND)
    (y,), grads = run_vjp(fn, [x, weight, bias], [g])
    assert y.dtype == x.dtype
    assert_close(y, y_ref, dtype, "y")
    for name, got, ref in zip(("dx", "dweight", "dbias"), grads, grads_ref):
        assert_close(got, ref, dtype, name)


def test_the_metal_backend_is_really_used():
    assert kernels.resolve_backend(BACKEND) == "metal" and mx.metal.is_available()
