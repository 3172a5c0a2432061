"""The norm zoo against float64 NumPy references written here from SPEC.md.

Each reference is a forward function and its hand-derived VJP; the VJPs are themselves
checked against central finite differences in float64, so a wrong reference cannot hide a
wrong norm.
"""

import math
import re

import mlx_localnorm as ln
import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map, tree_unflatten

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
# Tolerance per dtype: |actual - ref| <= tol * (|ref| + max|ref|): one unit in the last place
# for float16 and bfloat16 (the output rounding), float32 leaves room for sums of 4099 terms.
TOL = {"float32": 1e-5, "float16": 1e-3, "bfloat16": 8e-3}
SIZES = [1, 31, 32, 33, 4096, 4099]
LEADING = [(1,), (2, 7), (2, 3, 4)]  # one row, many rows as 2-D, 3-D and 4-D inputs


# ----------------------------------------------------------------------------- references
def _window(a, size, axis, left, right):
    """Zero-padded sum over positions p-left .. p+right along axis."""
    assert left + right + 1 == size
    out = np.zeros_like(a)
    n = a.shape[axis]
    for shift in range(-left, right + 1):
        src = [slice(None)] * a.ndim
        dst = [slice(None)] * a.ndim
        src[axis] = slice(max(shift, 0), n + min(shift, 0))
        dst[axis] = slice(max(-shift, 0), n - max(shift, 0))
        out[tuple(dst)] += a[tuple(src)]
    return out


def ref_rmsnorm(x, p, g, eps, zero_centered=False):
    w = 1 + p["weight"] if zero_centered else p["weight"]
    r = np.sqrt(np.mean(x * x, -1, keepdims=True) + eps)
    xh = x / r
    y = w * xh
    dx = (w * g - xh * np.mean(w * g * xh, -1, keepdims=True)) / r
    return y, dx, {"weight": _rowsum(g * xh)}


def ref_layernorm(x, p, g, eps):
    mu = x.mean(-1, keepdims=True)
    inv = 1 / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps)
    xh = (x - mu) * inv
    w = p.get("weight", 1.0)
    y = w * xh + p.get("bias", 0.0)
    gxh = g * w
    dx = inv * (gxh - gxh.mean(-1, keepdims=True) - xh * (gxh * xh).mean(-1, keepdims=True))
    grads = {}
    if "weight" in p:
        grads["weight"] = _rowsum(g * xh)
    if "bias" in p:
        grads["bias"] = _rowsum(g)
    return y, dx, grads


def ref_seednorm(x, p, g, eps, num_heads=1, dot_scale="none", head_rms=False):
    """SPEC SeeDNorm, per head k: y_k = (gamma_k + alpha_k s_k) x_k / RMS, s_k = tanh(c <x_k, beta_k>)."""
    d = x.shape[-1]
    hd = d // num_heads
    sc = hd**-0.5 if dot_scale == "rsqrt_d" else 1.0
    heads = x.shape[:-1] + (num_heads, hd)
    xs, gs = x.reshape(heads), g.reshape(heads)
    gamma, alpha, beta = (p[k].reshape(num_heads, hd) for k in ("weight", "alpha", "beta"))
    s = np.tanh(sc * (xs * beta).sum(-1, keepdims=True))
    axes = (-1,) if head_rms else (-2, -1)
    r = np.sqrt(np.mean(xs * xs, axis=axes, keepdims=True) + eps)
    xh = xs / r
    w = gamma + alpha * s
    y = w * xh
    c = (gs * alpha * xh).sum(-1, keepdims=True)
    ds = (1 - s * s) * c * sc  # dL/d<x_k, beta_k> before the scale is folded in
    dx = (w * gs - xh * np.mean(w * gs * xh, axis=axes, keepdims=True)) / r + ds * beta
    grads = {
        "weight": _rowsum((gs * xh).reshape(x.shape)),
        "alpha": _rowsum((gs * xh * s).reshape(x.shape)),
        "beta": _rowsum((ds * xs).reshape(x.shape)),
    }
    return y.reshape(x.shape), dx.reshape(x.shape), grads


def ref_patchnorm(x, p, g, eps, patch_size=1, patch_ndim=1, mode="rms"):
    """SPEC PatchNorm: z_p = (W x)_p / d_p + b (rms) or ((W x)_p + b) / d_p (affine)."""
    d = x.shape[-1]
    k = patch_size
    axes = (-2,) if patch_ndim == 1 else (-3, -2)
    pads = (k - 1, 0) if patch_ndim == 1 else ((k - 1) // 2, k // 2)
    ss = (x * x).sum(-1, keepdims=True)
    for axis in axes:
        ss = _window(ss, k, axis, *pads)
    count = d * k**patch_ndim
    den = np.sqrt(ss / count + eps) if mode == "rms" else np.sqrt(ss + 1)
    wt = p["weight"]
    z = x * wt if wt.ndim == 1 else x @ wt.T
    b = p.get("bias", 0.0)
    u = z + b if mode == "affine" else z
    y = u / den if mode == "affine" else z / den + b
    dz = g / den
    dden = -(g * u).sum(-1, keepdims=True) / den**2
    dss = dden / (2 * den * count) if mode == "rms" else dden / (2 * den)
    for axis in axes:  # the adjoint of a window sum is the mirrored window sum
        dss = _window(dss, k, axis, pads[1], pads[0])
    dx = (dz * wt if wt.ndim == 1 else dz @ wt) + 2 * x * dss
    if wt.ndim == 1:
        grads = {"weight": _rowsum(dz * x)}
    else:
        grads = {"weight": dz.reshape(-1, dz.shape[-1]).T @ x.reshape(-1, d)}
    if "bias" in p:
        grads["bias"] = _rowsum(dz if mode == "affine" else g)
    return y, dx, grads


def ref_dyt(x, p, g, eps=None):
    a = p["alpha"][0]
    t = np.tanh(a * x)
    y = p["weight"] * t + p.get("bias", 0.0)
    dt = g * p["weight"] * (1 - t * t)
    grads = {"alpha": np.array([(dt * x).sum()]), "weight": _rowsum(g * t)}
    if "bias" in p:
        grads["bias"] = _rowsum(g)
    return y, dt * a, grads


def ref_l2norm(x, p, g, eps):
    n = np.maximum(np.sqrt((x * x).sum(-1, keepdims=True)), eps)
    xh = x / n
    w = p.get("weight", 1.0)
    dx = (w * g - xh * (w * g * xh).sum(-1, keepdims=True)) / n
    grads = {"weight": _rowsum(g * xh)} if "weight" in p else {}
    return w * xh, dx, grads


def ref_angpt(x, p, g, eps=None, nu=1.0):
    return nu * x, nu * g, {}


def _rowsum(a):
    return a.reshape(-1, a.shape[-1]).sum(0)


# ----------------------------------------------------------------------------- cases
# name -> (make_norm name, options, reference, reference options, ok(dims, leading))
CASES = {
    "rmsnorm": ("rmsnorm", {}, ref_rmsnorm, {}),
    "rmsnorm-zero-centered": ("rmsnorm", {"zero_centered": True}, ref_rmsnorm,
                              {"zero_centered": True}),
    "layernorm": ("layernorm", {}, ref_layernorm, {}),
    "layernorm-no-bias": ("layernorm", {"bias": False}, ref_layernorm, {}),
    "layernorm-no-affine": ("layernorm", {"affine": False}, ref_layernorm, {}),
    "seednorm": ("seednorm", {}, ref_seednorm, {}),
    "seednorm-rsqrt-d": ("seednorm", {"dot_scale": "rsqrt_d"}, ref_seednorm,
                         {"dot_scale": "rsqrt_d"}),
    "patchnorm": ("patchnorm", {}, ref_patchnorm, {}),
    "patchnorm-affine-full-causal3": (
        "patchnorm", {"mode": "affine", "weight": "full", "patch_size": 3}, ref_patchnorm,
        {"mode": "affine", "patch_size": 3}),
    "patchnorm-rms-causal2": ("patchnorm", {"patch_size": 2}, ref_patchnorm, {"patch_size": 2}),
    "dyt": ("dyt", {}, ref_dyt, {}),
    "dyt-no-bias": ("dyt", {"bias": False}, ref_dyt, {}),
    "l2norm": ("l2norm", {}, ref_l2norm, {}),
    "l2norm-scale": ("l2norm", {"scale": True}, ref_l2norm, {}),
    "angpt": ("angpt", {"nu": 1.7}, ref_angpt, {"nu": 1.7}),
}


def _randomize(module, dims, rng):
    """Move every parameter away from its init so that no gradient path is trivially zero."""
    def draw(path, value):
        name = path.split(".")[-1]
        shape = value.shape
        if name == "beta":
            new = rng.normal(0, 1.5 / math.sqrt(dims), shape)
        elif name == "alpha" and shape == (1,):
            new = rng.uniform(0.4, 1.2, shape)
        elif name == "weight" and len(shape) == 2:
            new = np.eye(dims) + rng.normal(0, 0.3 / math.sqrt(dims), shape)
        elif name in ("weight", "alpha"):
            new = (0.0 if getattr(module, "zero_centered", False) else 1.0) + rng.normal(
                0, 0.3, shape)
        else:
            new = rng.normal(0, 0.3, shape)
        return mx.array(new.astype(np.float32))

    flat = [(k, draw(k, v)) for k, v in tree_flatten(module.parameters())]
    module.update(tree_unflatten(flat))


def _f64(a):
    return np.array(a.astype(mx.float32), dtype=np.float64)


def _assert_close(actual, ref, dtype, what, terms=0.0):
    """Relative error of a few ulps of `dtype`, measured against |ref|, max|ref| and `terms`.

    `terms` is the size of the summands a result is built from: where they cancel (d/dx of
    a norm over D = 1 is ``eps``-small), no float32 evaluation can be closer than that.
    """
    actual = _f64(actual) if isinstance(actual, mx.array) else actual
    assert actual.shape == ref.shape, f"{what}: shape {actual.shape} != {ref.shape}"
    scale = np.abs(ref).max() if ref.size else 0.0
    err = np.abs(actual - ref)
    bound = TOL[dtype] * (np.abs(ref) + scale + terms)
    worst = np.unravel_index(np.argmax(err - bound), err.shape) if err.size else ()
    assert np.all(err <= bound + 1e-30), (
        f"{what} [{dtype}]: max err {err.max():.3g} at {worst} (ref {ref[worst]:.6g}, "
        f"got {actual[worst]:.6g}); allowed {TOL[dtype]} * (|ref| + {scale:.3g})")


def _run_case(case, dims, leading, dtype_name, seed=0):
    name, options, ref, ref_options = CASES[case]
    dtype = DTYPES[dtype_name]
    rng = np.random.default_rng(seed)
    module = ln.make_norm(name, dims, **options)
    _randomize(module, dims, rng)
    module.set_dtype(dtype)
    x = mx.array(rng.normal(0, 1, leading + (dims,)).astype(np.float32)).astype(dtype)
    g = mx.array(rng.normal(0, 1, leading + (dims,)).astype(np.float32)).astype(dtype)

    def loss(params, x):
        module.update(params)
        return (module(x).astype(mx.float32) * g.astype(mx.float32)).sum()

    params = module.trainable_parameters()
    y = module(x)
    dparams, dx = mx.grad(loss, argnums=(0, 1))(params, x)
    mx.eval(y, dparams, dx)

    p64 = {k: _f64(v) for k, v in tree_flatten(params)}
    eps = getattr(module, "eps", None)
    y_ref, dx_ref, grads_ref = ref(_f64(x), p64, _f64(g), eps, **ref_options)
    assert y.dtype == dtype and dx.dtype == dtype
    _assert_close(y, y_ref, dtype_name, f"{case} forward")
    x64, g64 = _f64(x), _f64(g)
    w_max = max([1.0] + [np.abs(v).max() for v in p64.values()])
    terms = np.abs(g64).max(-1, keepdims=True) * w_max / np.sqrt(
        np.mean(x64 * x64, -1, keepdims=True) + 1e-6)
    _assert_close(dx, dx_ref, dtype_name, f"{case} d/dx", terms)
    got = dict(tree_flatten(dparams))
    assert sorted(got) == sorted(grads_ref), f"{case}: gradient keys {sorted(got)}"
    for key, expected in grads_ref.items():
        _assert_close(got[key], expected, dtype_name, f"{case} d/d{key}")


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("dims", SIZES)
@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_gradients(case, dims, dtype):
    for leading in LEADING:
        _run_case(case, dims, leading, dtype)


@pytest.mark.parametrize("dims", [8, 32, 4096])
@pytest.mark.parametrize("heads", [2, 4])
@pytest.mark.parametrize("head_rms", [False, True])
@pytest.mark.parametrize("dot_scale", ["none", "rsqrt_d"])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_seednorm_multi_head(dims, heads, head_rms, dot_scale, dtype):
    options = {"num_heads": heads, "head_rms": head_rms, "dot_scale": dot_scale}
    CASES["_mh"] = ("seednorm", options, ref_seednorm, options)
    try:
        _run_case("_mh", dims, (3, 5), dtype)
    finally:
        del CASES["_mh"]


@pytest.mark.parametrize("mode", ["rms", "affine"])
@pytest.mark.parametrize("size", [1, 2, 3])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_patchnorm_2d_images(mode, size, dtype):
    CASES["_2d"] = ("patchnorm", {"patch_size": size, "patch_ndim": 2, "mode": mode,
                                  "weight": "full"},
                    ref_patchnorm, {"patch_size": size, "patch_ndim": 2, "mode": mode})
    try:
        _run_case("_2d", 6, (2, 5, 4), dtype)
    finally:
        del CASES["_2d"]


@pytest.mark.parametrize("patch_ndim", [1, 2])
def test_patchnorm_window_wider_than_the_input(patch_ndim):
    """A patch of 10**6 positions covers the whole input: prefix sums (causal 1-D) or whole-axis
    sums (centred 2-D), divided by the full count. Must not loop over a million offsets."""
    k, d, eps = 10**6, 4, 1e-6
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 5, 3, d)) if patch_ndim == 2 else rng.normal(size=(2, 7, d))
    ss = (x * x).sum(-1, keepdims=True)
    if patch_ndim == 1:
        ss = np.cumsum(ss, axis=-2)
    else:
        ss = np.broadcast_to(ss.sum(axis=(-3, -2), keepdims=True), ss.shape)
    want = x / np.sqrt(ss / (d * k**patch_ndim) + eps)
    norm = ln.PatchNorm(d, eps=eps, patch_size=k, patch_ndim=patch_ndim)
    got = norm(mx.array(x.astype(np.float32)))
    np.testing.assert_allclose(np.array(got), want, rtol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_compile_equals_eager(case):
    name, options, _, _ = CASES[case]
    rng = np.random.default_rng(1)
    module = ln.make_norm(name, 33, **options)
    _randomize(module, 33, rng)
    x = mx.array(rng.normal(0, 1, (2, 9, 33)).astype(np.float32))

    def loss(params, x):
        module.update(params)
        return (module(x) ** 2).sum()

    eager = mx.value_and_grad(loss, argnums=(0, 1))
    params = module.trainable_parameters()
    (l_e, g_e), (l_c, g_c) = eager(params, x), mx.compile(eager)(params, x)
    module.update(params)  # the traced call left placeholders in the module
    np.testing.assert_allclose(np.array(l_c), np.array(l_e), rtol=1e-6)
    for (k, a), (_, b) in zip(tree_flatten(g_e), tree_flatten(g_c)):
        np.testing.assert_allclose(np.array(b), np.array(a), rtol=1e-5, atol=1e-6, err_msg=k)
    np.testing.assert_allclose(np.array(mx.compile(module)(x)), np.array(module(x)),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", [c for c in CASES if CASES[c][2] is not ref_angpt])
def test_references_match_finite_differences(case):
    """The hand-written VJPs above equal central differences of the forward (float64)."""
    name, options, ref, ref_options = CASES[case]
    rng = np.random.default_rng(2)
    dims = 5
    module = ln.make_norm(name, dims, **options)
    _randomize(module, dims, rng)
    p = {k: _f64(v) for k, v in tree_flatten(module.parameters())}
    x = rng.normal(0, 1, (3, 4, dims))
    g = rng.normal(0, 1, x.shape)
    eps = getattr(module, "eps", 1e-6)
    _, dx, grads = ref(x, p, g, eps, **ref_options)

    def objective(x, p):
        return (ref(x, p, g, eps, **ref_options)[0] * g).sum()

    h = 1e-6
    for target, analytic in [("x", dx)] + list(grads.items()):
        base = x if target == "x" else p[target]
        numeric = np.zeros_like(base)
        for i in np.ndindex(base.shape):
            for sign in (1, -1):
                moved = base.copy()
                moved[i] += sign * h
                args = (moved, p) if target == "x" else (x, {**p, target: moved})
                numeric[i] += sign * objective(*args) / (2 * h)
        np.testing.assert_allclose(analytic, numeric, rtol=1e-5, atol=1e-7, err_msg=target)


# ----------------------------------------------------------------------------- properties
def test_seednorm_equals_rmsnorm_at_init_and_differs_once_beta_moves():
    x = mx.random.normal((4, 10, 64), key=mx.random.key(3))
    seed, rms = ln.SeeDNorm(64), ln.RMSNorm(64)
    np.testing.assert_allclose(np.array(seed(x)), np.array(rms(x)), rtol=1e-6, atol=1e-6)
    def loss(params):
        seed.update(params)
        return (seed(x) * x).sum()

    params = seed.trainable_parameters()
    grad = mx.grad(loss)(params)
    seed.update(params)
    assert float(mx.abs(grad["beta"]).max()) > 1e-3  # beta learns from step 0
    seed.beta = 0.1 * mx.ones((64,))
    assert float(mx.abs(seed(x) - rms(x)).max()) > 1e-2


def test_patchnorm_rms_equals_rmsnorm_at_init():
    x = mx.random.normal((3, 7, 48), key=mx.random.key(4))
    for weight in ("diagonal", "full"):
        pn = ln.PatchNorm(48, weight=weight)
        np.testing.assert_allclose(np.array(pn(x)), np.array(ln.RMSNorm(48)(x)),
                                   rtol=1e-5, atol=1e-6)


def test_patchnorm_is_not_scale_invariant():
    x = mx.random.normal((5, 16), key=mx.random.key(5))
    pn = ln.PatchNorm(16, mode="affine")
    gap = float(mx.abs(pn(2 * x) - pn(x)).max())
    assert gap > 1e-2
    # ... but nearly so for large inputs: ||x||^2 dominates the +1.
    big = 100 * x
    assert float(mx.abs(pn(2 * big) - pn(big)).max()) < 1e-3 * gap
    x64 = np.array(x, dtype=np.float64)
    expected = x64 / np.sqrt((x64**2).sum(-1, keepdims=True) + 1)
    np.testing.assert_allclose(np.array(pn(x)), expected, rtol=1e-5, atol=1e-6)


def test_patchnorm_linear_and_conv_layers():
    rng = np.random.default_rng(6)
    x64 = rng.normal(0, 1, (2, 9, 5))
    x = mx.array(x64.astype(np.float32))
    lin = ln.PatchNormLinear(5, 3)
    w, b = np.array(lin.weight, np.float64), np.array(lin.bias, np.float64)
    expected = (x64 @ w.T + b) / np.sqrt((x64**2).sum(-1, keepdims=True) + 1)
    np.testing.assert_allclose(np.array(lin(x)), expected, rtol=1e-5, atol=1e-6)

    conv = ln.PatchNormConv1d(5, 4, kernel_size=3)
    w, b = np.array(conv.weight, np.float64), np.array(conv.bias, np.float64)
    padded = np.pad(x64, ((0, 0), (2, 0), (0, 0)))
    out = np.zeros((2, 9, 4))
    for p in range(9):
        patch = padded[:, p:p + 3, :]  # positions p-2 .. p, causal
        out[:, p] = (np.einsum("nkc,okc->no", patch, w) + b) / np.sqrt(
            (patch**2).sum((1, 2))[:, None] + 1)
    np.testing.assert_allclose(np.array(conv(x)), out, rtol=1e-5, atol=1e-6)

    img64 = rng.normal(0, 1, (2, 4, 5, 3))
    conv2 = ln.PatchNormConv2d(3, 2, kernel_size=3, mode="rms")
    w, b = np.array(conv2.weight, np.float64), np.array(conv2.bias, np.float64)
    padded = np.pad(img64, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.zeros((2, 4, 5, 2))
    for i in range(4):
        for j in range(5):
            patch = padded[:, i:i + 3, j:j + 3, :]
            rms = np.sqrt((patch**2).mean((1, 2, 3)) + 1e-6)[:, None]
            out[:, i, j] = np.einsum("nhwc,ohwc->no", patch, w) / rms + b
    np.testing.assert_allclose(np.array(conv2(mx.array(img64.astype(np.float32)))), out,
                               rtol=1e-5, atol=1e-5)


def test_l2norm_output_has_unit_norm():
    x = 10 * mx.random.normal((6, 3, 100), key=mx.random.key(7))
    norms = mx.linalg.norm(ln.L2Norm(100)(x), axis=-1)
    np.testing.assert_allclose(np.array(norms), 1.0, rtol=1e-6)
    assert float(mx.abs(ln.L2Norm(4)(mx.zeros((2, 4)))).max()) == 0.0  # zero rows stay zero


def test_dyt_matches_formula():
    rng = np.random.default_rng(8)
    x64 = rng.normal(0, 2, (4, 12))
    dyt = ln.DyT(12, alpha_init=0.7)
    dyt.weight = mx.array(rng.normal(1, 0.2, 12).astype(np.float32))
    dyt.bias = mx.array(rng.normal(0, 0.2, 12).astype(np.float32))
    expected = np.array(dyt.weight) * np.tanh(0.7 * x64) + np.array(dyt.bias)
    np.testing.assert_allclose(np.array(dyt(mx.array(x64.astype(np.float32)))), expected,
                               rtol=1e-5, atol=1e-6)


def test_approx_norm_constants():
    assert ln.norms.nu_linear(256, 1024) == pytest.approx(0.5)
    assert ln.norms.nu_lerp(0.5) == pytest.approx(math.sqrt(2))
    # E[silu(z)^2] for z ~ N(0,1) by plain Monte Carlo, independent of the quadrature.
    z = np.random.default_rng(9).standard_normal(4_000_000)
    mc = 1 / math.sqrt(np.mean((z / (1 + np.exp(-z))) ** 2))
    assert ln.norms.nu_activation("silu") == pytest.approx(mc, rel=2e-3)
    assert ln.norms.nu_activation("silu") == pytest.approx(1.68, abs=0.01)


def test_qk_norm_normalizes_each_head():
    q = mx.random.normal((2, 4, 5, 16), key=mx.random.key(10))
    k = 3 * mx.random.normal((2, 4, 5, 16), key=mx.random.key(11))
    qn, kn = ln.QKNorm(16)(q, k)
    for a, b in ((q, qn), (k, kn)):
        a64 = np.array(a, np.float64)
        ref = a64 / np.sqrt((a64**2).mean(-1, keepdims=True) + 1e-6)
        np.testing.assert_allclose(np.array(b), ref, rtol=1e-5, atol=1e-6)
    qn, _ = ln.QKNorm(16, norm="l2norm")(q, k)
    np.testing.assert_allclose(np.array(mx.linalg.norm(qn, axis=-1)), 1.0, rtol=1e-5)


def test_registry_and_make_norm():
    assert sorted(ln.NORMS) == ["angpt", "dyt", "l2norm", "layernorm", "patchnorm",
                                "rmsnorm", "seednorm"]
    for name, cls in ln.NORMS.items():
        norm = ln.make_norm(name, 8, eps=1e-5)  # eps is dropped for norms without one
        assert isinstance(norm, cls)
        assert "arXiv" in cls.__doc__
    assert ln.make_norm("seednorm", 8, num_heads=2).num_heads == 2


def test_nan_and_inf_behaviour_is_as_documented():
    x = mx.array([[1.0, float("nan"), 2.0, 3.0], [1.0, float("inf"), 2.0, 3.0],
                  [1.0, 2.0, 3.0, 4.0]])
    for name in ("rmsnorm", "layernorm", "seednorm", "patchnorm", "l2norm"):
        y = np.array(ln.make_norm(name, 4)(x))
        assert np.isnan(y[0]).all(), name  # NaN anywhere: the whole row is NaN
        if name in ("layernorm", "seednorm"):
            assert np.isnan(y[1]).all(), name
        else:  # x / inf: NaN at the inf entry, 0 elsewhere
            assert np.isnan(y[1, 1]) and (y[1, [0, 2, 3]] == 0).all(), name
        assert np.isfinite(y[2]).all(), name  # other rows are untouched
    y = np.array(ln.DyT(4)(x))
    assert np.isnan(y[0, 1]) and y[1, 1] == pytest.approx(1.0) and np.isfinite(y[2]).all()


def test_modules_run_the_fused_kernels():
    """SeeDNorm and PatchNorm layers call ln.kernels: the emulated Metal kernel agrees."""
    rng = np.random.default_rng(12)
    x = mx.array(rng.normal(0, 1, (3, 5, 64)).astype(np.float32))
    seed = ln.SeeDNorm(64, num_heads=2, beta_init_std=0.1, backend="emulate")
    with ln.kernels.record_traffic() as launches:
        y = seed(x)
    assert launches, "SeeDNorm(backend='emulate') did not launch a kernel"
    seed.backend = "ops"
    np.testing.assert_allclose(np.array(y), np.array(seed(x)), rtol=1e-5, atol=1e-6)
    patch = ln.PatchNorm(64, patch_size=2, mode="affine", backend="emulate")
    with ln.kernels.record_traffic() as launches:
        z = patch(x)
    assert launches, "PatchNorm(backend='emulate') did not launch a kernel"
    patch.backend = "ops"
    np.testing.assert_allclose(np.array(z), np.array(patch(x)), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'metal', 'ops', "
                                         r"'emulate'\), got 'cuda'"):
        ln.SeeDNorm(8, backend="cuda")


# ----------------------------------------------------------------------------- bad input
def test_wrong_last_axis_names_the_sizes():
    for name in ln.NORMS:
        with pytest.raises(ValueError, match=r"dims=512\) got input with last axis 384"):
            ln.make_norm(name, 512)(mx.zeros((2, 384)))


def test_integer_input_is_a_type_error():
    for name in ln.NORMS:
        with pytest.raises(TypeError, match=r"floating input.*got mlx.core.int32"):
            ln.make_norm(name, 4)(mx.zeros((2, 4), dtype=mx.int32))
    with pytest.raises(TypeError, match="mx.array"):
        ln.RMSNorm(4)(np.zeros((2, 4), np.float32))


@pytest.mark.parametrize("eps", [0, -1e-6, float("nan"), float("inf")])
def test_non_positive_eps(eps):
    for name in ("rmsnorm", "layernorm", "seednorm", "patchnorm", "l2norm"):
        with pytest.raises(ValueError, match=r"eps must be a positive finite number, got"):
            ln.make_norm(name, 4, eps=eps)
    with pytest.raises(ValueError, match="eps"):
        ln.norms.seednorm(mx.ones((2, 4)), mx.ones(4), mx.ones(4), mx.ones(4), eps=0.0)


def test_unknown_norm_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown norm 'batchnorm'; valid names: angpt, dyt, "
                                         r"l2norm, layernorm, patchnorm, rmsnorm, seednorm"):
        ln.make_norm("batchnorm", 8)
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['heads'\]; SeeDNorm takes"):
        ln.make_norm("seednorm", 8, heads=2)


def test_heads_must_divide_dims():
    with pytest.raises(ValueError, match=r"num_heads=3 must divide dims=8"):
        ln.SeeDNorm(8, num_heads=3)
    with pytest.raises(ValueError, match=r"num_heads=3 must divide dims=8"):
        ln.norms.seednorm(mx.ones((2, 8)), mx.ones(8), mx.ones(8), mx.ones(8), num_heads=3)


def test_other_bad_options():
    with pytest.raises(ValueError, match=r"dims must be a positive int \(at most 2147483647\), "
                                         r"got 0"):
        ln.RMSNorm(0)
    with pytest.raises(ValueError, match=r"mode must be one of \('rms', 'affine'\), got 'l1'"):
        ln.PatchNorm(8, mode="l1")
    with pytest.raises(ValueError, match=r"needs an input with at least 2 axes"):
        ln.PatchNorm(8, patch_size=3)(mx.ones((8,)))
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\), got \(7,\)"):
        ln.norms.seednorm(mx.ones((2, 8)), mx.ones(7), mx.ones(8), mx.ones(8))
    with pytest.raises(ValueError, match=r"nu must be a positive finite number, got -1"):
        ln.ApproxNorm(8, nu=-1)


def test_params_survive_dtype_casts():
    """A model cast to bfloat16 keeps bfloat16 outputs and parameters."""
    norm = ln.SeeDNorm(16)
    norm.set_dtype(mx.bfloat16)
    assert all(v.dtype == mx.bfloat16 for _, v in tree_flatten(norm.parameters()))
    assert norm(mx.ones((2, 16), mx.bfloat16)).dtype == mx.bfloat16
    assert tree_map(lambda v: v.shape, norm.parameters()) == {
        "weight": (16,), "alpha": (16,), "beta": (16,)}


# Every norm class and every bad value of its arguments: (class, base arguments, argument, bad
# value, error). Wrong types are TypeErrors, wrong values ValueErrors; sizes must fit MLX's
# int32 shapes.
NAN, INF, HUGE = float("nan"), float("inf"), 2**31
_DIMS = [("dims", v, e) for v, e in (("8", TypeError), (8.0, TypeError), (True, TypeError),
                                       (None, TypeError), (0, ValueError), (HUGE, ValueError),
                                       (10**30, ValueError))]
_EPS = [("eps", v, e) for v, e in (("1e-6", TypeError), ([1e-6], TypeError), (None, TypeError),
                                     (NAN, ValueError), (-1.0, ValueError))]
_BACKEND = [("backend", v, ValueError) for v in ("gpu", None)]
BAD_ARGUMENTS = {
    ln.RMSNorm: _DIMS + _EPS + [("zero_centered", v, TypeError) for v in ("no", "True", 1, None)],
    ln.LayerNorm: _DIMS + _EPS + [(name, v, TypeError) for name in ("affine", "bias")
                                  for v in ("no", 0)],
    ln.SeeDNorm: _DIMS + _EPS + _BACKEND + [
        ("alpha_init", "1", TypeError), ("alpha_init", [1.0], TypeError),
        ("alpha_init", None, TypeError), ("alpha_init", NAN, ValueError),
        ("alpha_init", INF, ValueError), ("beta_init_std", "0.1", TypeError),
        ("beta_init_std", NAN, ValueError), ("beta_init_std", INF, ValueError),
        ("beta_init_std", -0.1, ValueError), ("num_heads", "2", TypeError),
        ("num_heads", 2.0, TypeError), ("num_heads", 0, ValueError),
        ("num_heads", HUGE, ValueError), ("dot_scale", "sqrt", ValueError),
        ("head_rms", "yes", TypeError)],
    ln.PatchNorm: _DIMS + _EPS + _BACKEND + [
        ("patch_size", "3", TypeError), ("patch_size", 2.0, TypeError),
        ("patch_size", 0, ValueError), ("patch_size", HUGE, ValueError),
        ("patch_ndim", True, TypeError), ("patch_ndim", 1.0, TypeError),
        ("patch_ndim", 3, ValueError), ("mode", "l1", ValueError), ("mode", ["rms"], ValueError),
        ("weight", "dense", ValueError), ("bias", "no", TypeError)],
    ln.DyT: _DIMS + [("alpha_init", "0.5", TypeError), ("alpha_init", [0.5], TypeError),
                     ("alpha_init", NAN, ValueError), ("alpha_init", -INF, ValueError),
                     ("bias", "no", TypeError)],
    ln.L2Norm: _DIMS + _EPS + [("scale", "no", TypeError)],
    ln.ApproxNorm: _DIMS + [("nu", "1", TypeError), ("nu", NAN, ValueError),
                            ("nu", 0.0, ValueError)],
    ln.PatchNormLinear: [(name, v, e) for name in ("input_dims", "output_dims")
                         for _, v, e in _DIMS] + _EPS + [("bias", "no", TypeError),
                                                         ("mode", "l1", ValueError)],
    ln.PatchNormConv1d: [(name, v, e) for name in ("in_channels", "out_channels", "kernel_size")
                         for _, v, e in _DIMS] + _EPS + [("bias", "no", TypeError)],
    ln.PatchNormConv2d: [("kernel_size", v, e) for _, v, e in _DIMS] + [("bias", 1, TypeError)],
    ln.QKNorm: [("head_dim", v, e) for _, v, e in _DIMS]
               + [("norm", ["rmsnorm"], TypeError), ("norm", None, TypeError)],
}
BASE_ARGUMENTS = {ln.PatchNormLinear: {"input_dims": 8, "output_dims": 4},
                  ln.PatchNormConv1d: {"in_channels": 8, "out_channels": 4, "kernel_size": 3},
                  ln.PatchNormConv2d: {"in_channels": 8, "out_channels": 4, "kernel_size": 3},
                  ln.QKNorm: {"head_dim": 8}}


def _named(argument, value) -> str:
    """The message must name the argument and show the value given."""
    return rf"\b{argument}\b.* must be .*got {re.escape(repr(value))}"


@pytest.mark.parametrize("cls,argument,value,error", [
    pytest.param(cls, *case, id=f"{cls.__name__}-{case[0]}={case[1]!r}")
    for cls, cases in BAD_ARGUMENTS.items() for case in cases])
def test_bad_arguments_name_the_argument_expected_and_given(cls, argument, value, error):
    kwargs = dict(BASE_ARGUMENTS.get(cls, {"dims": 8}), **{argument: value})
    with pytest.raises(error, match=_named(argument, value)):
        cls(**kwargs)
    name = next((n for n, c in ln.NORMS.items() if c is cls), None)
    if name is not None and argument != "dims":
        with pytest.raises(error, match=_named(argument, value)):
            ln.make_norm(name, 8, **{argument: value})


@pytest.mark.parametrize("name", [["rmsnorm"], None, 3])
def test_make_norm_name_must_be_a_string(name):
    for call in (lambda: ln.make_norm(name, 8), lambda: ln.norms.norm_options(name)):
        with pytest.raises(TypeError, match=r"name must be a str, one of .*rmsnorm.*; got "
                                            + re.escape(repr(name))):
            call()


def test_a_full_patchnorm_weight_must_fit_mlx():
    with pytest.raises(ValueError, match=r"weight='full' needs dims\*\*2 = 2500000000 entries"):
        ln.PatchNorm(50_000, weight="full")


# The pure functions with a bad parameter: (function, argument, value).
_X = mx.ones((2, 4))
BAD_PARAMETERS = [
    (lambda v: ln.norms.seednorm(_X, v, _X[0], _X[0]), "weight"),
    (lambda v: ln.norms.seednorm(_X, _X[0], v, _X[0]), "alpha"),
    (lambda v: ln.norms.seednorm(_X, _X[0], _X[0], v), "beta"),
    (lambda v: ln.norms.patchnorm(_X, v), "weight"),
    (lambda v: ln.norms.dyt(_X, v), "alpha"),
]


@pytest.mark.parametrize("value", [[1.0, 1.0, 1.0, 1.0], None, np.ones(4, np.float32)])
@pytest.mark.parametrize("call,argument", BAD_PARAMETERS)
def test_pure_functions_need_array_parameters(call, argument, value):
    given = type(value).__name__
    with pytest.raises(TypeError, match=rf"\b{argument} must be an mx.array, got {given}"):
        call(value)


@pytest.mark.parametrize("value", [[1.0, 1.0, 1.0, 1.0], np.ones(4, np.float32)])
@pytest.mark.parametrize("fn", [ln.norms.rms_norm, ln.norms.layer_norm, ln.norms.l2_norm])
def test_optional_weights_are_arrays_or_none(fn, value):
    assert fn(_X, None).shape == _X.shape
    given = type(value).__name__
    with pytest.raises(TypeError, match=rf"weight must be an mx.array or None, got {given}"):
        fn(_X, value)
