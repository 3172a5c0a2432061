"""Fused Peri-LN norm-add-norm: ``h = x + N_out(b)``, ``y = N_in(h)`` and its backward.

The kernel's Metal source runs in the CPU emulator and the ops twin runs as is; both are checked
against a float64 NumPy reference composed here from SPEC.md's RMSNorm/SeeDNorm formulas (the
single-norm reference of test_kernels.py), forward and every gradient. Tolerances are
test_kernels.py's per-dtype table (relative to the element and to the RMS of the reference:
float32 2e-5, float16 3e-3, bfloat16 2.5e-2). The emulator's byte counts check the traffic
targets; a Peri-LN model gives the same loss and gradients with and without the fused path.
"""

import importlib
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx import nn
from mlx.utils import tree_flatten
from test_kernels import assert_close, cast, f64, ref_seednorm, run_vjp

import mlx_localnorm  # noqa: F401  (first: swaps MLX's CPU BLAS before mlx.core loads)
from mlx_localnorm import kernels, placements
from mlx_localnorm.models import Model, ModelArgs
from mlx_localnorm.norms import RMSNorm, SeeDNorm

METAL_DIR = Path(__file__).resolve().parents[1] / "metal"
# Large enough eps (and different per norm) that a dropped or swapped eps shows.
EPS_OUT, EPS_IN = 0.05, 0.2


def ref_norm_add_norm(b, x, p_out, p_in, g_h, g_y, eps_out=EPS_OUT, eps_in=EPS_IN, scale=1.0):
    """float64: y1 = N_out(b), h = x + y1, y = N_in(h); with cotangents g_h (of h) and g_y (of y):
    dx = g_h + dN_in/dh^T g_y, db = dN_out/db^T dx, and each norm's parameter gradients.
    RMSNorm is SeeDNorm with alpha = beta = 0 (its params are (w,))."""
    n = len(p_out)
    zero = np.zeros_like(p_out[0])
    full = [list(p) + [zero] * (3 - n) for p in (p_out, p_in)]
    y1 = ref_seednorm(b, *full[0], eps=eps_out, scale=scale)
    h = x + y1
    y, (dh, *g_in) = ref_seednorm(h, *full[1], eps=eps_in, scale=scale, g=g_y)
    dx = g_h + dh
    _, (db, *g_out) = ref_seednorm(b, *full[0], eps=eps_out, scale=scale, g=dx)
    return [h, y], [db, dx] + g_out[:n] + g_in[:n]


def inputs(rows, dims, dtype, kind, seed=0):
    """(mx primals, mx cotangents, their float64 values): b, x, out params, in params. beta
    keeps <h, beta> below 1 or so (tanh not saturated, where 1 - s^2 amplifies float32 rounding)."""
    rng = np.random.default_rng(seed)
    n = 3 if kind == "seednorm" else 1

    def params():
        return [1 + 0.3 * rng.normal(size=dims), 0.5 + 0.3 * rng.normal(size=dims),
                0.5 * rng.normal(size=dims) / np.sqrt(dims)][:n]

    values = [rng.normal(size=(rows, dims)), rng.normal(size=(rows, dims))]
    values += params() + params()
    cot = [rng.normal(size=(rows, dims)) for _ in range(2)]
    primals, cotangents = [cast(v, dtype) for v in values], [cast(v, dtype) for v in cot]
    return primals, cotangents, [f64(v) for v in primals], [f64(v) for v in cotangents]


def flat(result):
    """outputs + gradients of run_vjp, as one list."""
    return result[0] + result[1]


def fused_fn(backend, n, out_eps=EPS_OUT, in_eps=EPS_IN, **kw):
    def fn(b, x, *p):
        return kernels.norm_add_norm(b, x, p[:n], p[n:], out_eps, in_eps, backend=backend, **kw)
    return fn


NAMES = {1: ["db", "dx", "dweight_out", "dweight_in"],
         3: ["db", "dx"] + [f"d{p}_{s}" for s in ("out", "in") for p in ("weight", "alpha", "beta")]}


def check(rows, dims, dtype, kind, dot_scale="none", seed=0):
    primals, cots, p64, c64 = inputs(rows, dims, dtype, kind, seed)
    n = (len(primals) - 2) // 2
    scale = dims**-0.5 if dot_scale == "rsqrt_d" else 1.0
    outs_ref, grads_ref = ref_norm_add_norm(p64[0], p64[1], p64[2:2 + n], p64[2 + n:], *c64,
                                            scale=scale)
    results = {}
    for backend in ("ops", "emulate"):
        outs, grads = results[backend] = run_vjp(
            fused_fn(backend, n, dot_scale=dot_scale), primals, cots)
        for name, got, ref in zip(["h", "y"] + NAMES[n], outs + grads, outs_ref + grads_ref):
            assert got.dtype == primals[0 if name in ("h", "y", "db", "dx") else 2].dtype
            assert_close(got, ref, dtype, f"{kind} {name} ({backend})")
    for name, got, twin in zip(["h", "y"] + NAMES[n], flat(results["emulate"]),
                               flat(results["ops"])):
        assert_close(got, f64(twin), dtype, f"{kind} {name} kernel vs ops twin", factor=2)


# Widths: non-multiples of 4 and of 32, several register-tile iterations (4099: 5, 12291: 13).
CASES = [
    (3, 7, "float32", "seednorm"), (3, 7, "float16", "rmsnorm"), (1, 31, "bfloat16", "seednorm"),
    (2, 33, "float16", "seednorm"), (5, 100, "float32", "rmsnorm"),
    (300, 33, "float32", "seednorm"), (70, 1030, "float16", "rmsnorm"),
    (2, 1030, "bfloat16", "seednorm"), (2, 4099, "float32", "seednorm"),
    (2, 4099, "bfloat16", "rmsnorm"), (1, 12291, "float32", "rmsnorm"),
]


@pytest.mark.parametrize("rows,dims,dtype,kind", CASES)
def test_values_and_gradients_match_float64(rows, dims, dtype, kind):
    check(rows, dims, dtype, kind)


@pytest.mark.parametrize("kind", ["seednorm", "rmsnorm"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_h_adds_the_branch_norm_rounded_to_the_dtype(kind, dtype):
    """h = x + y1 with y1 rounded to the dtype first, as the unfused modules return it: equal
    to that rounded sum but for rare ties (adding the unrounded y1 changes about 28%)."""
    primals, _, p64, c64 = inputs(16, 1030, dtype, kind, seed=4)
    n = (len(primals) - 2) // 2
    (h_ref, _), _ = ref_norm_add_norm(p64[0], p64[1], p64[2:2 + n], p64[2 + n:], *c64)
    expected = primals[1] + cast(h_ref - p64[1], dtype)  # x + y1, each rounded to the dtype
    h, _ = fused_fn("emulate", n)(*primals)
    assert (h == expected).astype(mx.float32).mean().item() >= 0.99


@pytest.mark.parametrize("rows,dims,dtype", [(3, 33, "float32"), (20, 257, "bfloat16")])
def test_seednorm_dot_scale(rows, dims, dtype):
    check(rows, dims, dtype, "seednorm", dot_scale="rsqrt_d", seed=5)


@pytest.mark.parametrize("backend", ["ops", "emulate"])
@pytest.mark.parametrize("kind,dims,dtype", [("seednorm", 33, "float16"),
                                             ("rmsnorm", 1030, "float32")])
def test_frozen_parameters_get_zero_gradients_and_no_partials(kind, dims, dtype, backend):
    primals, cots, p64, c64 = inputs(4, dims, dtype, kind, seed=3)
    n = (len(primals) - 2) // 2
    outs_ref, grads_ref = ref_norm_add_norm(p64[0], p64[1], p64[2:2 + n], p64[2 + n:], *c64)
    with kernels.record_traffic() as launches:
        outs, grads = run_vjp(fused_fn(backend, n, frozen=True), primals, cots)
    for name, got, ref in zip(("h", "y", "db", "dx"), outs + grads, outs_ref + grads_ref):
        assert_close(got, ref, dtype, name)
    assert all(not f64(g).any() for g in grads[2:]) and len(grads) == 2 + 2 * n
    norm = "seednorm" if kind == "seednorm" else "rmsnorm"
    assert [s.kernel.split("__")[0] for s in launches] == ([] if backend == "ops" else [
        f"custom_kernel_mlx_localnorm_{norm}_add_norm_fwd",
        f"custom_kernel_mlx_localnorm_{norm}_add_norm_bwd_frozen"])
    assert all(buf.name != "param_partials" for s in launches for buf in s.buffers)


def second_order(primals, c, backend):
    """d/dprimals of |d<(h, y), c>/d(b, x)|^2."""
    fn = fused_fn(backend, (len(primals) - 2) // 2)

    def first(*p):
        return mx.grad(lambda b, x: sum((o * c).sum() for o in fn(b, x, *p[2:])),
                       argnums=(0, 1))(*p[:2])

    return mx.grad(lambda *p: sum((g * g).sum() for g in first(*p)),
                   argnums=tuple(range(len(primals))))(*primals)


@pytest.mark.parametrize("kind", ["seednorm", "rmsnorm"])
def test_second_order_gradients_match_the_ops_twin(kind):
    """The backward kernel's own VJP differentiates the ops twin's VJP."""
    primals, _, _, _ = inputs(5, 40, "float32", kind, seed=9)
    c = mx.random.normal(primals[0].shape, key=mx.random.key(1))
    for got, twin in zip(second_order(primals, c, "emulate"), second_order(primals, c, "ops")):
        assert_close(got, f64(twin), "float32", f"{kind} second order", factor=5)


def test_ops_backend_is_the_unfused_sequence():
    primals, _, _, _ = inputs(4, 64, "bfloat16", "seednorm")
    b, x, *p = primals
    h, y = kernels.norm_add_norm(b, x, p[:3], p[3:], 1e-6, 1e-5, backend="ops")
    h_ref = x + kernels.seednorm(b, *p[:3], eps=1e-6, backend="ops")
    assert mx.array_equal(h, h_ref)
    assert mx.array_equal(y, kernels.seednorm(h_ref, *p[3:], eps=1e-5, backend="ops"))


# ----------------------------------------------------------------- launch limits, schedules

@pytest.mark.parametrize("limit", [512, 64])
def test_kernels_run_under_a_lower_pipeline_thread_limit(limit, monkeypatch):
    from mlx_localnorm.emulate.kernel import MAX_THREADS_ENV

    monkeypatch.setenv(MAX_THREADS_ENV, str(limit))
    for kind, dims in (("seednorm", 4096), ("rmsnorm", 1000)):
        if 4 * 32 * limit < dims:
            continue
        primals, cots, p64, c64 = inputs(3, dims, "float32", kind, seed=31)
        n = (len(primals) - 2) // 2
        outs_ref, grads_ref = ref_norm_add_norm(p64[0], p64[1], p64[2:2 + n], p64[2 + n:],
                                                *c64)
        with kernels.record_traffic() as launches:
            outs, grads = run_vjp(fused_fn("emulate", n), primals, cots)
        assert len(launches) == 3 and all(s.threadgroup[0] <= limit for s in launches)
        for got, ref in zip(outs + grads, outs_ref + grads_ref):
            assert_close(got, ref, "float32", f"{kind} at {limit} threads")


def test_too_wide_rows_fall_back_to_the_ops_twin_once_with_a_warning(monkeypatch):
    from mlx_localnorm.emulate.kernel import MAX_THREADS_ENV

    monkeypatch.setenv(MAX_THREADS_ENV, "64")  # register tiles of 64 threads cover 8192
    primals, _, p64, _ = inputs(2, 8196, "float32", "rmsnorm")
    with pytest.warns(UserWarning, match="norm_add_norm: last axis 8196 is wider than 8192"), \
            kernels.record_traffic() as launches:
        _, y = fused_fn("emulate", 1)(*primals)
    assert not launches
    zero = np.zeros((2, 8196))
    outs_ref, _ = ref_norm_add_norm(*p64[:2], p64[2:3], p64[3:], zero, zero)
    assert_close(y, outs_ref[1], "float32", "fallback y")


@pytest.fixture
def three_schedules(monkeypatch):
    """Each emulated launch runs in three seeded thread orders that must agree bitwise."""
    from mlx_localnorm.emulate.kernel import SCHEDULES_ENV, SEED_ENV

    caches = [importlib.import_module("mlx_localnorm.kernels.norm_add_norm")._fused,
              importlib.import_module("mlx_localnorm.kernels._launch").kernel]
    monkeypatch.setenv(SCHEDULES_ENV, "3")
    monkeypatch.setenv(SEED_ENV, "17")
    for cache in caches:
        cache.cache_clear()
    yield
    monkeypatch.delenv(SCHEDULES_ENV)
    monkeypatch.delenv(SEED_ENV)
    for cache in caches:
        cache.cache_clear()


@pytest.mark.parametrize("kind", ["seednorm", "rmsnorm"])
def test_kernels_agree_under_several_thread_schedules(kind, three_schedules):
    """Three simdgroups per threadgroup, several threadgroups forward, one block backward."""
    primals, cots, _, _ = inputs(8, 300, "float32", kind, seed=21)
    n = (len(primals) - 2) // 2
    emu = run_vjp(fused_fn("emulate", n), primals, cots)
    ops = run_vjp(fused_fn("ops", n), primals, cots)
    for got, twin in zip(flat(emu), flat(ops)):
        assert_close(got, f64(twin), "float32", kind, factor=2)


# ----------------------------------------------------------------- memory traffic

@pytest.mark.parametrize("kind,dtype", [("seednorm", "bfloat16")])
def test_traffic_near_the_minimum_and_below_the_unfused_sequence(kind, dtype):
    """At 8192 rows (full 64-row blocks), emulator counts: the fused op moves <= 1.10x its
    minimum (b, x read, h, y written; backward b, h, dh, dy read, db, dx written; parameters
    once) and <= 0.6x the unfused sequence forward (two norm kernels and an add, the add
    counted as its own minimum). Backward the floor is 6 tensors against 9 (N_in's backward,
    the add of h's two cotangents, N_out's backward), 0.667x; asserted <= 0.70x."""
    rows, dims = 8192, 256
    primals, cots, _, _ = inputs(rows, dims, dtype, kind)
    b, _, *p = primals
    n = len(p) // 2
    t, vec = b.nbytes, p[0].nbytes

    def unfused(b, x, *q):
        h = x + kernels.seednorm(b, *q[:n], eps=EPS_OUT, backend="emulate")
        return h, kernels.seednorm(h, *q[n:], eps=EPS_IN, backend="emulate")

    moved = {}
    for label, fn, add in (("fused", fused_fn("emulate", n), 0), ("unfused", unfused, 3 * t)):
        with kernels.record_traffic() as forward:
            mx.eval(fn(*primals))
        with kernels.record_traffic() as both:
            run_vjp(fn, primals, cots)
        backward = both[len(forward):]
        moved[label] = [sum(s.bytes_moved for s in launches) + add
                        for launches in (forward, backward)]
        if label == "fused":
            (launch,) = forward
            assert launch["branch"].bytes_read == launch["stream"].bytes_read == t
            assert launch["h"].bytes_written == launch["y"].bytes_written == t
            assert [s["grad_branch"].bytes_written for s in backward[:1]] == [t]
    fwd, bwd = moved["fused"]
    assert fwd <= 1.10 * (4 * t + 2 * n * vec), f"forward {fwd / (4 * t + 2 * n * vec):.3f}x"
    assert bwd <= 1.10 * (6 * t + 4 * n * vec), f"backward {bwd / (6 * t + 4 * n * vec):.3f}x"
    assert fwd <= 0.60 * moved["unfused"][0], f"forward {fwd / moved['unfused'][0]:.3f}x unfused"
    assert bwd <= 0.70 * moved["unfused"][1], f"backward {bwd / moved['unfused'][1]:.3f}x"


def test_bench_rows_compare_fused_and_unfused():
    from mlx_localnorm.bench.kernels import norm_add_norm_rows

    rows = {(r["kernel"], r["pass"]): r for r in norm_add_norm_rows(128, 64, "float32")}
    assert len(rows) == 8
    for kind in ("seednorm", "rms_norm"):
        for pass_name, tensors in (("forward", (4, 7)), ("backward", (6, 9))):
            fused = rows[(f"{kind} add norm (fused)", pass_name)]
            unfused = rows[(f"{kind} add norm (unfused)", pass_name)]
            assert fused["min_bytes_per_element"] == unfused["min_bytes_per_element"]
            assert fused["ratio"] >= 1.0
            # float32 tensors of the fused op, and of the unfused passes (adds included)
            assert fused["min_bytes_per_element"] >= 4 * tensors[0]
            assert unfused["bytes_per_element"] >= 4 * tensors[1]
    assert rows[("seednorm add norm (fused)", "forward")]["launches"] == 1
    assert rows[("seednorm add norm (unfused)", "backward")]["launches"] == 4


# ----------------------------------------------------------------- the Peri-LN model

TINY = {"vocab_size": 32, "hidden_size": 40, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 64}


def perturbed_model(placement, norm, options):
    mx.random.seed(0)
    model = Model(ModelArgs(**TINY, placement=placement, norm_type=norm, norm_options=options))
    # Norm parameters away from their init, so that a swapped or dropped one shows.
    keys = iter(mx.random.split(mx.random.key(1), 100))
    for _, module in model.named_modules():
        if isinstance(module, (RMSNorm, SeeDNorm)):
            module.update({name: value + 0.2 * mx.random.normal(value.shape, key=next(keys))
                           for name, value in module.parameters().items()})
    return model


def loss_and_grads(model):
    tokens = mx.array(np.random.default_rng(2).integers(0, 32, size=(3, 9)))

    def loss(m):
        return nn.losses.cross_entropy(m(tokens[:, :-1]), tokens[:, 1:]).mean()

    value, grads = nn.value_and_grad(model, loss)(model)
    mx.eval(value, grads)
    return value, dict(tree_flatten(grads))


@pytest.mark.parametrize("placement,norm,options", [
    ("peri", "seednorm", {"beta_init_std": 0.3, "backend": "emulate"}),
    ("sandwich", "seednorm", {"beta_init_std": 0.3, "dot_scale": "rsqrt_d", "backend": "emulate"}),
    ("peri", "rmsnorm", {"zero_centered": True}),
])
def test_peri_ln_model_same_loss_and_gradients_with_and_without_fusion(
        placement, norm, options, monkeypatch):
    monkeypatch.setenv(kernels.BACKEND_ENV, "emulate")  # RMSNorm's fused path: backend "auto"
    model = perturbed_model(placement, norm, options)
    with kernels.record_traffic() as launches:
        fused_loss, fused_grads = loss_and_grads(model)
    names = [s.kernel for s in launches]
    assert sum("add_norm_fwd" in k for k in names) == TINY["num_hidden_layers"]
    assert sum("add_norm_bwd" in k for k in names) == TINY["num_hidden_layers"]

    monkeypatch.setattr(placements, "fused_norms", lambda out_norm, in_norm: None)
    with kernels.record_traffic() as launches:
        loss, grads = loss_and_grads(model)
    assert not any("add_norm" in s.kernel for s in launches)
    assert abs(fused_loss.item() - loss.item()) <= 1e-5 * abs(loss.item())
    assert fused_grads.keys() == grads.keys()
    for name, g in grads.items():
        assert_close(fused_grads[name], f64(g), "float32", name, factor=5)


def test_which_norm_pairs_fuse():
    seed = SeeDNorm(8, backend="emulate")
    assert placements.fused_norms(RMSNorm(8), RMSNorm(8, eps=1e-5)) == {
        "dot_scale": "none", "backend": "auto", "frozen": False}
    assert placements.fused_norms(seed, SeeDNorm(8, backend="emulate")) == {
        "dot_scale": "none", "backend": "emulate", "frozen": False}
    for pair in ((RMSNorm(8), seed), (SeeDNorm(8, num_heads=2), SeeDNorm(8, num_heads=2)),
                 (seed, SeeDNorm(8, dot_scale="rsqrt_d", backend="emulate")),
                 (seed, SeeDNorm(8, backend="ops")), (nn.LayerNorm(8), nn.LayerNorm(8))):
        assert placements.fused_norms(*pair) is None
    frozen = [SeeDNorm(8), SeeDNorm(8)]
    for module in frozen:
        module.freeze()
    assert placements.fused_norms(*frozen)["frozen"]
    assert not placements.fused_norms(frozen[0], SeeDNorm(8))["frozen"]


# ----------------------------------------------------------------- errors

@pytest.mark.parametrize("call,error,match", [
    (lambda b, w: kernels.norm_add_norm(b, b[:1], (w,), (w,)), ValueError,
     r"stream must match branch \(shape \(2, 8\)"),
    (lambda b, w: kernels.norm_add_norm(b, b, (w,), (w, w, w)), ValueError,
     "both norms must be of one type"),
    (lambda b, w: kernels.norm_add_norm(b, b, (w[:4],), (w,)), ValueError,
     r"out_params weight must have shape \(8,\), got \(4,\)"),
    (lambda b, w: kernels.norm_add_norm(b, b, w, (w,)), TypeError, "out_params must be"),
    (lambda b, w: kernels.norm_add_norm(b, b, (w,), (w, w)), TypeError, "in_params must be"),
    (lambda b, w: kernels.norm_add_norm(b, b, (w,), (w,), in_eps=0.0), ValueError, "eps"),
    (lambda b, w: kernels.norm_add_norm(b, b, (w,) * 3, (w,) * 3, dot_scale="d"), ValueError,
     "dot_scale must be one of"),
    (lambda b, w: kernels.norm_add_norm(b, b, (w,), (w,), backend="gpu"), ValueError,
     "backend must be one of"),
])
def test_bad_arguments_raise_clear_errors(call, error, match):
    with pytest.raises(error, match=match):
        call(mx.ones((2, 8)), mx.ones((8,)))


# ----------------------------------------------------------------- hygiene

def test_metal_sources_are_ascii():
    """MLX compiles kernel source as ASCII: a stray Unicode character breaks it on a Mac."""
    files = sorted(METAL_DIR.iterdir())
    assert any(f.name == "norm_add_norm_fwd.metal" for f in files)
    for path in files:
        text = path.read_bytes()
        bad = [i for i, byte in enumerate(text) if byte > 127]
        assert not bad, f"{path.name}: non-ASCII byte at offset {bad[0]}"

