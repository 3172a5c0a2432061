"""Normalized optimizers against float64 NumPy references written here from SPEC.md."""

import re
from functools import partial

import mlx.core as mx
import mlx.optimizers as mlx_optim
import numpy as np
import pytest
from mlx import nn
from mlx.utils import tree_flatten, tree_map, tree_merge, tree_unflatten
from mlx_lm.models import llama
from mlx_lm.tuner.lora import LoRALinear
from mlx_lm.tuner.utils import linear_to_lora_layers

import mlx_localnorm as ln
from mlx_localnorm import optim as O

# ---------------------------------------------------------------- float64 references (SPEC)

NS = (3.4445, -4.7750, 2.0315)
PE = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]


def ref_orth(u, method="newton_schulz", steps=5):
    x = np.asarray(u, np.float64)
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = np.swapaxes(x, -1, -2)
    fro = np.sqrt((x * x).sum(axis=(-2, -1), keepdims=True))
    if method == "newton_schulz":
        x, coeffs = x / (fro + 1e-7), [NS] * steps
    else:
        x, coeffs = x / (fro * 1.02 + 1e-6), PE[:steps]
    for a, b, c in coeffs:
        A = x @ np.swapaxes(x, -1, -2)
        x = a * x + (b * A + c * A @ A) @ x
    return np.swapaxes(x, -1, -2) if tall else x


def ref_muon(w, grads, lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.0,
             cautious=False, lr_scale="spectral", method="newton_schulz", normuon=None):
    """Weights after each gradient; ``normuon=(beta2, eps)`` adds NorMuon's row moment."""
    w = np.asarray(w, np.float64)
    m_rows, n_cols = w.shape[-2:]
    scale = max(1, m_rows / n_cols) ** 0.5 if lr_scale == "spectral" else \
        0.2 * max(m_rows, n_cols) ** 0.5
    M = np.zeros_like(w)
    v = np.zeros(w.shape[:-1] + (1,))
    out = []
    for g in grads:
        g = np.asarray(g, np.float64)
        M = momentum * M + (1 - momentum) * g
        U = (1 - momentum) * g + momentum * M if nesterov else M
        Ot = ref_orth(U, method)
        if normuon is not None:
            beta2, eps = normuon
            v = beta2 * v + (1 - beta2) * (Ot**2).mean(axis=-1, keepdims=True)
            On = Ot / (np.sqrt(v) + eps)
            fro = np.sqrt((Ot**2).sum(axis=(-2, -1), keepdims=True))
            fro_n = np.sqrt((On**2).sum(axis=(-2, -1), keepdims=True))
            Ot = On * fro / (fro_n + eps)
        step = scale * Ot
        # Cautious decay (arXiv 2510.12402): only where the applied update agrees with W.
        decay = lr * weight_decay * ((step * w >= 0) if cautious else 1.0)
        w = w * (1 - decay) - lr * step
        out.append(w)
    return out


def ref_scion(w, grads, lr, norm, rho, momentum, constrained):
    w = np.asarray(w, np.float64)
    m_rows, n_cols = w.shape[-2:]
    d = np.zeros_like(w)
    out = []
    for g in grads:
        d = momentum * d + (1 - momentum) * np.asarray(g, np.float64)
        if norm == "spectral":
            lmo = -rho * np.sqrt(m_rows / n_cols) * ref_orth(d)
        elif norm == "colnorm":  # token vectors = stored rows of an Embedding (vocab, D)
            lmo = -rho * np.sqrt(n_cols) * d / (np.linalg.norm(d, axis=-1, keepdims=True) + 1e-8)
        else:
            lmo = -(rho / n_cols) * np.sign(d)
        w = ((1 - lr) * w if constrained else w) + lr * lmo
        out.append(w)
    return out


def ref_adamw(w, grads, lr, b1, b2, eps, wd):
    """Decoupled weight decay (arXiv 1711.05101), bias-corrected moments."""
    w = np.asarray(w, np.float64)
    m, v = np.zeros_like(w), np.zeros_like(w)
    out = []
    for t, g in enumerate(grads, start=1):
        g = np.asarray(g, np.float64)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        w = w * (1 - lr * wd) - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
        out.append(w)
    return out


def ratio(num, den):
    return num / den if num > 0 and den > 0 else 1.0


def ref_lars(w, grads, lr, momentum, wd, eta):
    w = np.asarray(w, np.float64)
    v = np.zeros_like(w)
    out = []
    for g in grads:
        g = np.asarray(g, np.float64)
        wn, gn = np.linalg.norm(w), np.linalg.norm(g)
        trust = eta * ratio(wn, gn + wd * wn)
        v = momentum * v + lr * trust * (g + wd * w)
        w = w - v
        out.append(w)
    return out


def ref_lamb(w, grads, lr, b1, b2, eps, wd):
    w = np.asarray(w, np.float64)
    m, v = np.zeros_like(w), np.zeros_like(w)
    out = []
    for t, g in enumerate(grads, start=1):
        g = np.asarray(g, np.float64)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        r = (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
        u = r + wd * w
        w = w - lr * ratio(np.linalg.norm(w), np.linalg.norm(u)) * u
        out.append(w)
    return out


# SPEC "ngpt": the residual-stream axis of each weight, by the name of its module.
RESIDUAL_AXIS = {"embed_tokens": -1, "lm_head": -1, "q_proj": -1, "k_proj": -1, "v_proj": -1,
                 "gate_proj": -1, "up_proj": -1, "o_proj": -2, "down_proj": -2}


def ref_project(w, axis, mode, eps=1e-6):
    """nGPT "normalize" ``w / max(||w||, eps)``, anGPT "constrain" ``w / max(1, ||w||)``."""
    norm = np.sqrt((w * w).sum(axis=axis, keepdims=True))
    return w / np.maximum(norm, eps if mode == "normalize" else 1.0)


# ---------------------------------------------------------------- helpers

# Max abs error of the float32 *update direction*, relative to its largest entry: 5 polynomial
# steps amplify float32 rounding (6e-8) to about 1e-5 (measured), PE's first step the most.
DIR_TOL = 5e-5
# bfloat16 iterations (8-bit mantissa) move entries by about 3% of the largest, so bfloat16 is
# also checked on what it must keep: the polar factor U V^T (0.007 measured) and the
# singular-value interval (left by at most 0.0015 measured), both with this slack.
BF16_SLACK = 0.02
# One rounding of the stored weight.
STORE_RTOL = {mx.float32: 1e-6, mx.float16: 2**-11, mx.bfloat16: 2**-8}


def rand(shape, seed, scale=1.0):
    return (scale * np.random.default_rng(seed).normal(size=shape)).astype(np.float32)


def run(opt, w0, grads, dtype=mx.float32):
    """Apply ``grads`` one step at a time to a single parameter; the weights after each step.
    The updated weight must keep its dtype."""
    params = {"w": mx.array(w0).astype(dtype)}
    out = []
    for g in grads:
        params = opt.apply_gradients({"w": mx.array(g).astype(dtype)}, params)
        mx.eval(params)
        assert params["w"].dtype == dtype, f"{type(opt).__name__} returned {params['w'].dtype}"
        out.append(np.array(params["w"].astype(mx.float32), dtype=np.float64))
    return out


def assert_steps_close(got, want, w0, lr, dir_tol, store_rtol):
    for k, (g, r) in enumerate(zip(got, want)):
        # Direction error times the step's lr, per step taken, plus the storage rounding.
        atol = lr * dir_tol * (k + 1) + store_rtol * np.abs(r).max()
        np.testing.assert_allclose(g, r, rtol=0, atol=atol, err_msg=f"step {k + 1}")
    assert not np.allclose(got[-1], w0), "the optimizer did not move the weights"


def tiny_llama(seed=0):
    mx.random.seed(seed)
    args = llama.ModelArgs(
        model_type="llama", hidden_size=16, num_hidden_layers=2, intermediate_size=24,
        num_attention_heads=2, rms_norm_eps=1e-5, vocab_size=32, num_key_value_heads=1,
        tie_word_embeddings=False,
    )
    return llama.Model(args)


def lm_loss(model, tokens):
    logits = model(tokens[:, :-1])
    return nn.losses.cross_entropy(logits, tokens[:, 1:]).mean()


TOKENS = mx.array(np.random.default_rng(7).integers(0, 32, size=(2, 9)))


# ---------------------------------------------------------------- orthogonalization

@pytest.mark.parametrize("method", O.ORTH_METHODS)
@pytest.mark.parametrize("shape", [(8, 8), (20, 8), (8, 24), (3, 6, 10), (2, 2, 12, 5), (1, 7)])
def test_orthogonalize_matches_reference(method, shape):
    u = rand(shape, 1)
    got = np.array(O.orthogonalize(mx.array(u), method, 5), dtype=np.float64)
    want = ref_orth(u, method)
    assert got.shape == shape
    np.testing.assert_allclose(got, want, rtol=0, atol=DIR_TOL * np.abs(want).max())


def polar_factor(x):
    u, _, vt = np.linalg.svd(np.asarray(x, np.float64), full_matrices=False)
    return u @ vt


@pytest.mark.parametrize("method", O.ORTH_METHODS)
@pytest.mark.parametrize("shape", [(8, 8), (20, 8), (8, 24), (64, 32)])
def test_bfloat16_orthogonalization_keeps_polar_factor_and_interval(method, shape):
    u = spread_matrix(*shape, 3, smin=0.05)
    got = np.array(O.orthogonalize(mx.array(u), method, 5, mx.bfloat16), dtype=np.float64)
    np.testing.assert_allclose(polar_factor(got), polar_factor(u), rtol=0, atol=BF16_SLACK)
    lo, hi = schedule_interval(method)
    s = np.linalg.svd(got, compute_uv=False)
    assert lo - BF16_SLACK <= s.min() and s.max() <= hi + BF16_SLACK, (s.min(), s.max())


# Relative Frobenius error of bfloat16 orthogonalization against the float64 iteration with the
# same, exact coefficients, mean over 4 Gaussian matrices. Measured (mlx 0.32.4, CPU) on these
# shapes: 0.015-0.019 with exact coefficients (addmm alpha/beta), 0.055-0.062 (NS5) and
# 0.099-0.105 (Polar Express) with the coefficients rounded to bfloat16 first. 0.03 sits
# between with a margin of 1.6x on the exact side and 1.8x on the rounded side.
BF16_ORTH_FRO = 0.03


@pytest.mark.parametrize("method", O.ORTH_METHODS)
@pytest.mark.parametrize("shape", [(64, 32), (32, 96)])
def test_bfloat16_orthogonalization_keeps_exact_coefficients(method, shape):
    errors = []
    for seed in range(4):
        u = rand(shape, 100 + seed)
        want = ref_orth(u, method)
        got = np.array(O.orthogonalize(mx.array(u), method, 5, mx.bfloat16), dtype=np.float64)
        errors.append(np.linalg.norm(got - want) / np.linalg.norm(want))
    assert np.mean(errors) < BF16_ORTH_FRO, errors


def quintic_interval(a, b, c):
    """The interval the NS quintic maps [0, 1] into and keeps: [p(s2), p(s1)], with s1 < s2
    the critical points of p(s) = a s + b s^3 + c s^5."""
    s1, s2 = np.sqrt(np.sort(np.roots([5 * c, 3 * b, a]).real))
    p = lambda s: a * s + b * s**3 + c * s**5
    return p(s2), p(s1)


def matrix_with_singular_values(m, n, s, seed):
    rng = np.random.default_rng(seed)
    q1, _ = np.linalg.qr(rng.normal(size=(m, m)))
    q2, _ = np.linalg.qr(rng.normal(size=(n, n)))
    return ((q1[:, : len(s)] * s) @ q2[: len(s)]).astype(np.float32)


def spread_matrix(m, n, seed, smin):
    """Singular values spread log-uniformly over [smin, 1]."""
    return matrix_with_singular_values(m, n, np.geomspace(smin, 1, min(m, n)), seed)


def schedule_interval(method):
    """Where 5 steps put singular values from (0, 1]: NS's invariant interval, or Polar
    Express composed over the worst case it is designed for (sigma in [1e-3, 1], / 1.02)."""
    if method == "newton_schulz":
        return quintic_interval(*NS)
    s = np.geomspace(1e-3, 1, 100_001) / 1.02
    for a, b, c in PE:
        s = a * s + b * s**3 + c * s**5
    return s.min(), s.max()


def singular_values(method, u, steps):
    o = O.orthogonalize(mx.array(u), method, steps)
    return np.linalg.svd(np.array(o, dtype=np.float64), compute_uv=False)


def test_newton_schulz_singular_values_in_spec_interval():
    lo, hi = quintic_interval(*NS)
    assert 0.68 < lo < 0.69 and 1.20 < hi < 1.21  # SPEC: "about [0.7, 1.2]"
    for u in (rand((64, 32), 2), rand((32, 96), 3), spread_matrix(48, 48, 4, smin=1e-2)):
        s = singular_values("newton_schulz", u, 5)
        assert lo - 1e-4 <= s.min() and s.max() <= hi + 1e-4, (s.min(), s.max())


def test_polar_express_interval_and_iterations_vs_newton_schulz():
    pe_lo, pe_hi = schedule_interval("polar_express")
    ns_lo, ns_hi = quintic_interval(*NS)
    assert max(1 - pe_lo, pe_hi - 1) < max(1 - ns_lo, ns_hi - 1)  # closer to 1
    # Gradient-like spectrum: one dominant direction and a tail down to 1.2e-3, so after the
    # Frobenius scaling sigma_min is just inside Polar Express's design range [1e-3, 1].
    u = matrix_with_singular_values(64, 48, np.r_[1.0, np.geomspace(1.2e-3, 0.05, 47)], 5)
    s_pe = singular_values("polar_express", u, 5)
    assert pe_lo - 1e-3 <= s_pe.min() and s_pe.max() <= pe_hi + 1e-3

    def iterations_to_reach(method):
        for k in range(1, 12):
            s = singular_values(method, u, k)
            if ns_lo - 1e-3 <= s.min() and s.max() <= ns_hi + 1e-3:
                return k
        return 99

    k_pe, k_ns = iterations_to_reach("polar_express"), iterations_to_reach("newton_schulz")
    assert k_pe <= k_ns, (k_pe, k_ns)
    assert k_pe == 5 and k_ns > 5  # NS needs more than 5 steps for sigma_min = 1e-3


def test_batched_orthogonalization_equals_per_matrix():
    u = mx.array(rand((4, 3, 12, 7), 6))
    for method in O.ORTH_METHODS:
        batched = O.orthogonalize(u, method)
        for i in range(4):
            for j in range(3):
                # Equal up to float32 summation order (batched vs single BLAS calls).
                single = np.array(O.orthogonalize(u[i, j], method))
                np.testing.assert_allclose(np.array(batched[i, j]), single, rtol=0,
                                           atol=DIR_TOL * np.abs(single).max())


# ---------------------------------------------------------------- Muon and NorMuon

MUON_CASES = [
    {},
    {"nesterov": False},
    {"weight_decay": 0.1},
    {"weight_decay": 0.1, "cautious": True},
    {"lr_scale": "adamw_rms"},
    {"method": "polar_express", "momentum": 0.9},
]


@pytest.mark.parametrize("options", MUON_CASES, ids=lambda o: ",".join(o) or "default")
@pytest.mark.parametrize("shape", [(12, 8), (3, 6, 10)])
@pytest.mark.parametrize("nsteps", [1, 3])
def test_muon_matches_reference(options, shape, nsteps):
    w0, grads = rand(shape, 10), [rand(shape, 11 + k) for k in range(nsteps)]
    got = run(O.Muon(learning_rate=0.05, **options), w0, grads)
    want = ref_muon(w0, grads, lr=0.05, **options)
    assert_steps_close(got, want, w0, 0.05, DIR_TOL, STORE_RTOL[mx.float32])


# name -> (optimizer, its float64 reference (w0, grads) -> weights, lr, direction tolerance).
HALF_PRECISION_CASES = {
    "muon": (lambda: O.Muon(learning_rate=0.05, weight_decay=0.1),
             lambda w0, gs: ref_muon(w0, gs, lr=0.05, weight_decay=0.1), 0.05, DIR_TOL),
    "normuon": (lambda: O.NorMuon(learning_rate=0.05, beta2=0.9),
                lambda w0, gs: ref_muon(w0, gs, lr=0.05, normuon=(0.9, 1e-8)), 0.05, DIR_TOL),
    **{f"scion_{norm}": (
        lambda norm=norm: O.Scion(learning_rate=0.05, norm=norm, rho=2.0, momentum=0.8,
                                  constrained=True),
        lambda w0, gs, norm=norm: ref_scion(w0, gs, 0.05, norm, 2.0, 0.8, True), 0.05,
        DIR_TOL * 2.0 * np.sqrt(16 / 8)) for norm in O.SCION_NORMS},
    "lars": (lambda: O.LARS(learning_rate=2.0, momentum=0.9, weight_decay=0.01,
                            trust_coefficient=0.01),
             lambda w0, gs: ref_lars(w0, gs, 2.0, 0.9, 0.01, 0.01), 2.0, 0.0),
    "adamw": (lambda: O.AdamW(learning_rate=0.01, betas=[0.9, 0.95], eps=1e-8, weight_decay=0.1,
                              bias_correction=True),
              lambda w0, gs: ref_adamw(w0, gs, 0.01, 0.9, 0.95, 1e-8, 0.1), 0.01, 0.0),
    "lamb": (lambda: O.LAMB(learning_rate=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05),
             lambda w0, gs: ref_lamb(w0, gs, 0.01, 0.8, 0.99, 1e-6, 0.05), 0.01, 0.0),
}


@pytest.mark.parametrize("param_dtype", [mx.float16, mx.bfloat16])
@pytest.mark.parametrize("name", sorted(HALF_PRECISION_CASES))
def test_half_precision_parameters(name, param_dtype):
    make_opt, reference, lr, dir_tol = HALF_PRECISION_CASES[name]

    def stored(x):
        return np.array(mx.array(x).astype(param_dtype).astype(mx.float32))

    w0 = stored(rand((16, 8), 20))
    grads = [stored(rand((16, 8), 21 + k)) for k in range(3)]
    for g in grads:  # zero entries (e.g. unused embedding rows): float16 math gives 0/0 there
        g[0, :3] = 0
    opt = make_opt()
    got = run(opt, w0, grads, param_dtype)  # checks the weight keeps param_dtype
    assert all(v.dtype == mx.float32 for v in opt.state["w"].values())  # state stays float32
    # The weight is rounded to its dtype after every step (the float32 math's own error is
    # far below that, except the orthogonalization's): roundings add up per step.
    assert_steps_close(got, reference(w0, grads), w0, lr, dir_tol, 3 * STORE_RTOL[param_dtype])


def test_muon_bfloat16_orthogonalization_step():
    w0, g = rand((16, 8), 22), rand((16, 8), 23)
    got = run(O.Muon(learning_rate=0.05, ortho_dtype=mx.bfloat16), w0, [g])[0]
    step = (w0 - got) / (0.05 * np.sqrt(16 / 8))  # = orth(U) by SPEC
    u = (1 - 0.95) * g + 0.95 * (1 - 0.95) * g  # Nesterov direction after one step
    np.testing.assert_allclose(polar_factor(step), polar_factor(u), rtol=0, atol=BF16_SLACK)
    lo, hi = schedule_interval("newton_schulz")
    s = np.linalg.svd(step, compute_uv=False)
    assert lo - BF16_SLACK <= s.min() and s.max() <= hi + BF16_SLACK


@pytest.mark.parametrize("shape", [(12, 8), (8, 12), (2, 6, 10)])
@pytest.mark.parametrize("nsteps", [1, 3])
@pytest.mark.parametrize("cautious", [False, True])
def test_normuon_matches_reference(shape, nsteps, cautious):
    w0, grads = rand(shape, 30), [rand(shape, 31 + k) for k in range(nsteps)]
    got = run(O.NorMuon(learning_rate=0.05, beta2=0.9, weight_decay=0.1, cautious=cautious),
              w0, grads)
    want = ref_muon(w0, grads, lr=0.05, weight_decay=0.1, cautious=cautious,
                    normuon=(0.9, 1e-8))
    assert_steps_close(got, want, w0, 0.05, DIR_TOL, STORE_RTOL[mx.float32])


@pytest.mark.parametrize("cls", [O.Muon, O.NorMuon])
def test_cautious_weight_decay_masks_on_the_orthogonalized_update(cls):
    """arXiv 2510.12402 and modded-nanogpt: decay only where ``O * W >= 0``, ``O`` the
    orthogonalized update actually applied, not the momentum ``U`` before it."""
    w0, g = rand((12, 8), 24), rand((12, 8), 25)
    u = (1 - 0.95) * g + 0.95 * (1 - 0.95) * g  # Nesterov direction after one step
    o = ref_orth(u)
    if cls is O.NorMuon:  # beta2 = 0: v is this step's row mean of O^2
        normed = o / (np.sqrt((o**2).mean(axis=1, keepdims=True)) + 1e-8)
        o = normed * np.linalg.norm(o) / (np.linalg.norm(normed) + 1e-8)
    mask = o * w0 >= 0
    assert (mask != (u * w0 >= 0)).sum() >= 10  # the two masks really differ here
    extra = {"beta2": 0.0} if cls is O.NorMuon else {}
    got = run(cls(learning_rate=0.05, weight_decay=0.5, cautious=True, **extra), w0, [g])[0]
    want = w0 * (1 - 0.05 * 0.5 * mask) - 0.05 * np.sqrt(12 / 8) * o
    np.testing.assert_allclose(got, want, rtol=0, atol=0.05 * DIR_TOL + 1e-6 * np.abs(want).max())


def test_normuon_keeps_frobenius_norm_and_equalizes_rows():
    opt = O.NorMuon(beta2=0.0)  # v = this step's row mean of O^2: rows come out equal RMS
    u = mx.array(rand((10, 6), 32) * np.linspace(0.1, 3, 10)[:, None].astype(np.float32))
    state = {"v": mx.zeros((10, 1))}
    o = np.array(O.orthogonalize(u), dtype=np.float64)
    out = np.array(opt.direction(u, state), dtype=np.float64)
    np.testing.assert_allclose(np.linalg.norm(out), np.linalg.norm(o), rtol=1e-5)
    rms = np.sqrt((out**2).mean(axis=1))
    np.testing.assert_allclose(rms, rms.mean(), rtol=1e-4)


def test_muon_3d_equals_per_matrix():
    w0, grads = rand((3, 6, 4), 40), [rand((3, 6, 4), 41 + k) for k in range(2)]
    stacked = run(O.Muon(weight_decay=0.1), w0, grads)[-1]
    for i in range(3):
        single = run(O.Muon(weight_decay=0.1), w0[i], [g[i] for g in grads])[-1]
        np.testing.assert_allclose(stacked[i], single, rtol=1e-5, atol=1e-6)


def test_our_muon_matches_mlx_muon_at_the_same_settings():
    # MLX's Muon has coupled decay; with weight_decay=0 both compute the same update.
    w0, grads = rand((12, 8), 50), [rand((12, 8), 51 + k) for k in range(3)]
    ours = run(O.Muon(learning_rate=0.02), w0, grads)
    theirs = run(mlx_optim.Muon(learning_rate=0.02, weight_decay=0.0), w0, grads)
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


# ---------------------------------------------------------------- Scion, LARS, LAMB

@pytest.mark.parametrize("norm", O.SCION_NORMS)
@pytest.mark.parametrize("constrained", [False, True])
@pytest.mark.parametrize("nsteps", [1, 3])
def test_scion_matches_reference(norm, constrained, nsteps):
    shape = (12, 8)
    w0, grads = rand(shape, 60), [rand(shape, 61 + k) for k in range(nsteps)]
    opt = O.Scion(learning_rate=0.05, norm=norm, rho=2.0, momentum=0.8, constrained=constrained)
    got = run(opt, w0, grads)
    want = ref_scion(w0, grads, 0.05, norm, 2.0, 0.8, constrained)
    # rho * sqrt(m/n) scales the direction; sign and colnorm are exact up to float32 rounding.
    dir_tol = DIR_TOL * 2.0 * np.sqrt(12 / 8) if norm == "spectral" else 1e-6
    assert_steps_close(got, want, w0, 0.05, dir_tol, STORE_RTOL[mx.float32])


@pytest.mark.parametrize("shape", [(12, 8), (7,), ()])
@pytest.mark.parametrize("nsteps", [1, 3])
def test_lars_matches_reference(shape, nsteps):
    w0, grads = rand(shape, 70), [rand(shape, 71 + k) for k in range(nsteps)]
    got = run(O.LARS(learning_rate=2.0, momentum=0.9, weight_decay=0.01,
                     trust_coefficient=0.01), w0, grads)
    want = ref_lars(w0, grads, 2.0, 0.9, 0.01, 0.01)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)
    assert not np.allclose(got[-1], w0)


@pytest.mark.parametrize("shape", [(12, 8), (7,)])
@pytest.mark.parametrize("nsteps", [1, 3])
def test_lamb_matches_reference(shape, nsteps):
    w0, grads = rand(shape, 80), [rand(shape, 81 + k) for k in range(nsteps)]
    got = run(O.LAMB(learning_rate=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05),
              w0, grads)
    want = ref_lamb(w0, grads, 0.01, 0.8, 0.99, 1e-6, 0.05)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)
    assert not np.allclose(got[-1], w0)


def test_trust_ratio_is_one_for_zero_weights():
    grads = [rand((4, 4), 90)]
    got = run(O.LAMB(learning_rate=0.01, weight_decay=0.0), np.zeros((4, 4), np.float32), grads)
    want = ref_lamb(np.zeros((4, 4)), grads, 0.01, 0.9, 0.999, 1e-6, 0.0)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-7)
    assert np.abs(got[0]).max() > 0  # zero weights still move (ratio 1, not 0)
    lars = run(O.LARS(learning_rate=1.0), np.zeros((4, 4), np.float32), grads)
    np.testing.assert_allclose(lars[0], ref_lars(np.zeros((4, 4)), grads, 1.0, 0.9, 0.0, 1e-3)[0],
                               rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- groups and make_optimizer

class DynamicNormModel(nn.Module):
    """mlx-lm naming with a SeeDNorm, stacked experts and a bias, to exercise every group."""

    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(32, 8)
        self.layers = [nn.Module()]
        self.layers[0].norm = ln.SeeDNorm(8)
        self.layers[0].proj = nn.Linear(8, 8, bias=True)
        self.layers[0].experts = mx.zeros((4, 8, 8))
        self.lm_head = nn.Linear(8, 32, bias=False)


def test_param_groups_and_split_params():
    groups = O.param_groups(DynamicNormModel())
    assert groups == {
        "embed_tokens.weight": "embedding",
        "layers.0.norm.weight": "no_decay",
        "layers.0.norm.alpha": "decay",
        "layers.0.norm.beta": "decay",
        "layers.0.proj.weight": "matrix",
        "layers.0.proj.bias": "no_decay",
        "layers.0.experts": "matrix",
        "lm_head.weight": "head",
    }
    model = tiny_llama()
    matrix, other = O.split_params(model)
    matrix_keys = {k for k, _ in tree_flatten(matrix)}
    other_keys = {k for k, _ in tree_flatten(other)}
    assert len(matrix_keys) == 14 and all(".layers." in k for k in matrix_keys)
    assert other_keys == {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} | {
        f"model.layers.{i}.{n}.weight" for i in range(2)
        for n in ("input_layernorm", "post_attention_layernorm")
    }


def test_make_optimizer_routes_groups_and_hparams():
    model = tiny_llama()
    opt = O.make_optimizer("muon", model, learning_rate=0.05, weight_decay=0.01,
                           adamw_learning_rate=3e-3)
    muon, adamw, adamw_nd = opt.optimizers
    assert isinstance(muon, O.Muon) and muon.weight_decay == 0.01
    assert muon.learning_rate.item() == pytest.approx(0.05)
    assert adamw.learning_rate.item() == pytest.approx(3e-3) and adamw.weight_decay == 0.1
    assert adamw_nd.weight_decay == 0.0
    opt.init(model.trainable_parameters())
    assert {k.rsplit(".", 1)[0] for k, _ in tree_flatten(muon.state) if k.endswith(".m")} == {
        k for k, _ in tree_flatten(O.split_params(model)[0])
    }
    assert set(adamw.state["model"]) == {"embed_tokens"} and "lm_head" in adamw.state
    assert set(adamw_nd.state["model"]) == {"layers", "norm"}
    scion = O.make_optimizer("scion", model, rho_head=10.0)
    assert [o.norm for o in scion.optimizers[:3]] == ["spectral", "colnorm", "sign"]
    assert scion.optimizers[2].rho == 10.0


def test_mlx_tree_merge_empty_slot_bug_reproduction_and_workaround():
    """Upstream MLX bug (seen in mlx 0.32.4): ``tree_merge({}, None)`` raises "Trees contain
    elements at the same locations but no merge function was provided", and
    ``mlx.optimizers.MultiOptimizer`` merges its groups' updates with ``tree_merge``, so it
    fails when one group's list is shorter than another's that has an empty slot past its
    end. Passes (and says which) whether or not MLX has fixed it; ours must work either way."""
    try:
        tree_merge({}, None)
        mlx_fixed = True
    except ValueError as err:
        assert "no merge function" in str(err)
        mlx_fixed = False
    one = mx.ones((2,))
    params = {"layers": [{"a": one}, {"b": one}, {"c": one}, {"b": one}]}
    grads = tree_map(lambda p: 2 * p, params)
    # Groups "a" -> [{a}], "c" -> [{}, {}, {c}]: index 1 pairs None with the empty slot {}.
    filters = [lambda path, _: path.endswith(".a"), lambda path, _: path.endswith(".c")]

    def sgds():
        return [mlx_optim.SGD(learning_rate=0.1) for _ in range(3)]

    upstream = mlx_optim.MultiOptimizer(sgds(), filters)
    if mlx_fixed:
        upstream.apply_gradients(grads, params)
    else:
        with pytest.raises(ValueError, match="no merge function"):
            upstream.apply_gradients(grads, params)
    got = O.MultiOptimizer(sgds(), filters).apply_gradients(grads, params)
    assert [k for k, _ in tree_flatten(got)] == [k for k, _ in tree_flatten(params)]
    for key, value in tree_flatten(got):
        np.testing.assert_allclose(np.array(value), [0.8, 0.8], err_msg=key)  # 1 - 0.1 * 2


def issue_sequential():
    """The model of the bug report: its groups' lists of layers have different lengths."""
    mx.random.seed(3)
    return nn.Sequential(nn.Embedding(50, 32), nn.Linear(32, 32), nn.RMSNorm(32),
                         nn.Linear(32, 50))


def test_param_groups_sequential_output_layer_is_the_head():
    """A Sequential's last matrix layer maps to the outputs: AdamW's head group, not Muon's."""
    assert O.param_groups(issue_sequential()) == {
        "layers.0.weight": "embedding",
        "layers.1.weight": "matrix",
        "layers.1.bias": "no_decay",
        "layers.2.weight": "no_decay",
        "layers.3.weight": "head",
        "layers.3.bias": "no_decay",
    }
    lora = O.param_groups(sequential_lora_last_layer())
    assert {k: v for k, v in lora.items() if k.startswith("layers.3.")} == {
        "layers.3.linear.weight": "head", "layers.3.linear.bias": "no_decay",
        "layers.3.lora_a": "head", "layers.3.lora_b": "head"}
    trailing_norm = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4), nn.LayerNorm(4))
    assert O.param_groups(trailing_norm)["layers.1.weight"] == "head"


def sequential_lora_last_layer():
    """LoRA on the last layer only, and the embedding trained (e.g. for new tokens)."""
    model = issue_sequential()
    model.freeze()
    model.layers[3] = LoRALinear.from_base(model.layers[3], r=4)
    model.layers[0].unfreeze()
    return model


def sequential_first_linear_frozen():
    model = issue_sequential()
    model.layers[1].freeze()
    return model


def llama_lora_last_layer():
    model = tiny_llama()
    model.freeze()
    linear_to_lora_layers(model, 1, {"rank": 4, "scale": 10.0, "dropout": 0.0})
    return model


def sequential_loss(model, tokens):
    return nn.losses.cross_entropy(model(tokens[:, :-1]), tokens[:, 1:]).mean()


@pytest.mark.parametrize("name", sorted(O.OPTIMIZERS))
@pytest.mark.parametrize("make_model", [issue_sequential, sequential_lora_last_layer,
                                        sequential_first_linear_frozen, llama_lora_last_layer],
                         ids=lambda f: f.__name__)
def test_make_optimizer_updates_any_model(make_model, name):
    model = make_model()
    loss_fn = sequential_loss if isinstance(model, nn.Sequential) else lm_loss
    dtypes = {k: v.dtype for k, v in tree_flatten(model.parameters())}
    before = {k: np.array(v.astype(mx.float32)) for k, v in tree_flatten(model.parameters())}
    trainable = {k for k, _ in tree_flatten(model.trainable_parameters())}
    opt = O.make_optimizer(name, model)
    # Two steps: LoRA's B starts at 0, so A has no gradient before B has moved once.
    for _ in range(2):
        _, grads = nn.value_and_grad(model, loss_fn)(model, TOKENS)
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state)
    after = dict(tree_flatten(model.parameters()))
    assert after.keys() == before.keys()
    for key, value in after.items():
        assert value.dtype == dtypes[key], f"{key}: {dtypes[key]} became {value.dtype}"
        value = np.array(value.astype(mx.float32))
        assert value.shape == before[key].shape and np.isfinite(value).all(), key
        if key in trainable:
            assert not np.array_equal(value, before[key]), f"{key} did not move"
        else:
            np.testing.assert_array_equal(value, before[key], err_msg=f"frozen {key} moved")


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
@pytest.mark.parametrize("name", sorted(O.OPTIMIZERS))
def test_make_optimizer_keeps_half_precision_dtypes(name, dtype):
    model = tiny_llama()
    model.set_dtype(dtype)
    groups = O.param_groups(model)
    before = {k: np.array(v.astype(mx.float32)) for k, v in tree_flatten(model.parameters())}
    opt = O.make_optimizer(name, model, constraint="normalize" if name == "adamw" else None)
    _, grads = nn.value_and_grad(model, lm_loss)(model, TOKENS)
    opt.update(model, grads)
    mx.eval(model.parameters())
    for key, value in tree_flatten(model.parameters()):
        assert value.dtype == dtype, f"{key}: {dtype} became {value.dtype}"
        value = np.array(value.astype(mx.float32))
        assert np.isfinite(value).all(), key
        # Gains at 1 may not move: a 1e-3 step is below half a bfloat16 ulp there.
        if groups[key] == "matrix":
            assert not np.array_equal(value, before[key]), f"{key} did not move"


def compiled_and_eager_runs(make_model, make_opt, steps=3):
    """``(losses, model, optimizer)`` of the same training run, eager and ``mx.compile``d."""
    results = []
    for compiled in (False, True):
        model = make_model()
        opt = make_opt(model)
        opt.init(model.trainable_parameters())

        def step(tokens, model=model, opt=opt):
            loss, grads = nn.value_and_grad(model, lm_loss)(model, tokens)
            opt.update(model, grads)
            return loss

        if compiled:
            state = [model.state, opt.state]
            step = partial(mx.compile, inputs=state, outputs=state)(step)
        losses = []
        for _ in range(steps):
            losses.append(step(TOKENS).item())
            mx.eval(model.parameters(), opt.state)
        results.append((losses, model, opt))
    return results


@pytest.mark.parametrize("name", sorted(O.OPTIMIZERS))
def test_compiled_step_equals_eager_and_state_round_trips(name, tmp_path):
    (eager_losses, eager_model, eager_opt), (comp_losses, comp_model, _) = \
        compiled_and_eager_runs(tiny_llama, partial(O.make_optimizer, name))
    np.testing.assert_allclose(comp_losses, eager_losses, rtol=1e-5)
    assert eager_losses[-1] < eager_losses[0]
    for (k, a), (_, b) in zip(tree_flatten(eager_model.parameters()),
                              tree_flatten(comp_model.parameters())):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-4, atol=1e-5, err_msg=k)

    # Save after 3 steps, reload into a fresh optimizer, and take one more step with both.
    path = str(tmp_path / "opt.safetensors")
    mx.save_safetensors(path, dict(tree_flatten(eager_opt.state)))
    resumed = O.make_optimizer(name, eager_model)
    resumed.state = tree_unflatten(list(mx.load(path).items()))
    twin = tiny_llama()
    twin.update(tree_map(lambda x: x, eager_model.parameters()))
    for model, opt in ((eager_model, eager_opt), (twin, resumed)):
        _, grads = nn.value_and_grad(model, lm_loss)(model, TOKENS)
        opt.update(model, grads)
        mx.eval(model.parameters())
    for (k, a), (_, b) in zip(tree_flatten(eager_model.parameters()),
                              tree_flatten(twin.parameters())):
        np.testing.assert_array_equal(np.array(a), np.array(b), err_msg=k)


@pytest.mark.parametrize("mode", ["normalize", "constrain"])
def test_constrained_update_projects_after_the_step(mode):
    model = tiny_llama()
    w0 = {k: np.array(v, np.float64) for k, v in tree_flatten(model.parameters())}
    _, grads = nn.value_and_grad(model, lm_loss)(model, TOKENS)
    opt = O.make_optimizer("adamw", model, constraint=mode)
    opt.update(model, grads)
    got = dict(tree_flatten(model.parameters()))
    assert got.keys() == w0.keys()
    for k, g in tree_flatten(grads):
        # make_optimizer's AdamW defaults; nGPT/anGPT turn weight decay off.
        step = ref_adamw(w0[k], [np.array(g)], 1e-3, 0.9, 0.95, 1e-8, 0.0)[0]
        axis = RESIDUAL_AXIS.get(k.split(".")[-2])
        want = step if axis is None else ref_project(step, axis, mode)
        np.testing.assert_allclose(np.array(got[k]), want, rtol=1e-5, atol=1e-7, err_msg=k)
    o = np.array(model.model.layers[0].mlp.down_proj.weight, dtype=np.float64)
    col_norms = np.linalg.norm(o, axis=0)
    if mode == "normalize":
        np.testing.assert_allclose(col_norms, 1.0, rtol=1e-5)
    else:
        assert col_norms.max() <= 1 + 1e-6
    assert isinstance(opt.state, dict) and "states" in opt.state
    # nGPT/anGPT train without weight decay: the default becomes 0, explicit values still win.
    assert [o.weight_decay for o in opt.optimizer.optimizers] == [0.0, 0.0]
    explicit = O.make_optimizer("muon", model, constraint=mode, weight_decay=0.1)
    assert [o.weight_decay for o in explicit.optimizer.optimizers] == [0.1, 0.0, 0.0]


def localnorm_model(**options):
    from mlx_localnorm.models import Model, ModelArgs

    mx.random.seed(0)
    return Model(ModelArgs(vocab_size=32, hidden_size=16, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=24, **options))


def test_localnorm_model_seednorm_moe_groups_and_compiled_step():
    make = partial(localnorm_model, norm_type="seednorm", num_experts=4, qk_norm="rmsnorm")
    groups = O.param_groups(make())
    assert groups["model.layers.0.mlp.switch_mlp.down_proj.weight"] == "matrix"  # 3-D stack
    assert groups["model.layers.0.mlp.gate.weight"] == "decay"  # MoE router stays on AdamW
    assert groups["model.layers.0.input_layernorm.alpha"] == "decay"
    assert groups["model.layers.0.input_layernorm.beta"] == "decay"
    assert groups["model.layers.0.input_layernorm.weight"] == "no_decay"
    assert groups["model.layers.0.self_attn.q_norm.weight"] == "no_decay"
    (eager, m1, _), (comp, m2, _) = compiled_and_eager_runs(
        make, lambda m: O.make_optimizer("normuon", m, weight_decay=0.01))
    np.testing.assert_allclose(comp, eager, rtol=1e-5)
    assert eager[-1] < eager[0]
    for (k, a), (_, b) in zip(tree_flatten(m1.parameters()), tree_flatten(m2.parameters())):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-4, atol=1e-5, err_msg=k)


@pytest.mark.parametrize(("placement", "mode"), [("ngpt", "normalize"), ("angpt", "constrain")])
def test_localnorm_hypersphere_model_constrained_compiled_step(placement, mode):
    make = partial(localnorm_model, placement=placement)
    (eager, m1, _), (comp, m2, _) = compiled_and_eager_runs(
        make, lambda m: O.make_optimizer("muon", m, constraint=mode))
    np.testing.assert_allclose(comp, eager, rtol=1e-5)
    for (k, a), (_, b) in zip(tree_flatten(m1.parameters()), tree_flatten(m2.parameters())):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-4, atol=1e-5, err_msg=k)
    down = np.linalg.norm(np.array(m2.model.layers[1].mlp.down_proj.weight, np.float64), axis=0)
    embed = np.linalg.norm(np.array(m2.model.embed_tokens.weight, np.float64), axis=1)
    for norms in (down, embed):
        if mode == "normalize":
            np.testing.assert_allclose(norms, 1.0, rtol=1e-5)
        else:
            assert norms.max() <= 1 + 1e-6


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize("cls", [O.Muon, O.NorMuon, O.Scion, O.LARS, O.LAMB])
def test_negative_learning_rate_raises(cls):
    with pytest.raises(ValueError, match=r"learning_rate must be a non-negative .* got -0\.1"):
        cls(learning_rate=-0.1)


@pytest.mark.parametrize("cls", [O.Muon, O.NorMuon, O.Scion, O.LARS])
@pytest.mark.parametrize("momentum", [1.0, -0.1, 1.5])
def test_momentum_outside_unit_interval_raises(cls, momentum):
    with pytest.raises(ValueError, match=rf"momentum must be in \[0, 1\), got {momentum}"):
        cls(momentum=momentum)


def test_other_bad_hyperparameters_raise():
    with pytest.raises(ValueError, match=r"betas must be in \[0, 1\), got 1\.0"):
        O.LAMB(betas=(0.9, 1.0))
    with pytest.raises(ValueError, match=r"method must be one of .*polar_express.*got 'svd'"):
        O.Muon(method="svd")
    with pytest.raises(ValueError, match=r"lr_scale must be one of"):
        O.Muon(lr_scale="rms")
    with pytest.raises(ValueError, match="ns_steps must be a positive int, got 0"):
        O.Muon(ns_steps=0)
    with pytest.raises(TypeError, match="ortho_dtype must be a floating mx dtype"):
        O.Muon(ortho_dtype=mx.int32)
    with pytest.raises(ValueError, match=r"norm must be one of .*got 'frobenius'"):
        O.Scion(norm="frobenius")
    with pytest.raises(ValueError, match="beta2 must be in"):
        O.NorMuon(beta2=1.0)


def test_unknown_optimizer_and_hparam_raise_with_valid_lists():
    model = tiny_llama()
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'; valid names: adamw, lamb, "
                                         "lars, muon, normuon, scion"):
        O.make_optimizer("sgd", model)
    with pytest.raises(TypeError, match=r"unknown hyperparameter\(s\) \['beta2'\].*accepts"):
        O.make_optimizer("muon", model, beta2=0.9)
    with pytest.raises(ValueError, match="mode must be one of"):
        O.make_optimizer("adamw", model, constraint="sphere")


@pytest.mark.parametrize(("name", "key", "value", "error", "message"), [
    ("muon", "adamw_learning_rate", -0.1, ValueError,
     r"adamw_learning_rate must be a non-negative number or a schedule, got -0\.1"),
    ("normuon", "adamw_learning_rate", float("nan"), ValueError,
     r"adamw_learning_rate must be a non-negative number or a schedule, got nan"),
    ("scion", "adamw_weight_decay", -0.1, ValueError,
     r"adamw_weight_decay must be a non-negative number, got -0\.1"),
    ("muon", "adamw_weight_decay", float("nan"), ValueError,
     r"adamw_weight_decay must be a non-negative number, got nan"),
    ("muon", "adamw_betas", (0.9, 1.0), ValueError, r"adamw_betas must be in \[0, 1\), got 1\.0"),
    ("muon", "adamw_betas", 0.9, ValueError, r"adamw_betas must be a pair \(b1, b2\), got 0\.9"),
    ("muon", "adamw_eps", 0.0, ValueError, r"adamw_eps must be a positive number, got 0\.0"),
    ("muon", "adamw_bias_correction", "no", TypeError,
     r"adamw_bias_correction must be True or False, got 'no'"),
    ("adamw", "learning_rate", float("nan"), ValueError,
     r"learning_rate must be a non-negative number or a schedule, got nan"),
    ("adamw", "learning_rate", -1e-3, ValueError,
     r"learning_rate must be a non-negative number or a schedule, got -0\.001"),
    ("adamw", "weight_decay", -0.1, ValueError,
     r"weight_decay must be a non-negative number, got -0\.1"),
    ("adamw", "betas", [0.9, -0.1], ValueError, r"betas must be in \[0, 1\), got -0\.1"),
    ("adamw", "eps", -1e-8, ValueError, r"eps must be a positive number, got -1e-08"),
])
def test_make_optimizer_checks_adamw_hyperparameters(name, key, value, error, message):
    with pytest.raises(error, match=rf"make_optimizer\('{name}'\): {message}"):
        O.make_optimizer(name, tiny_llama(), **{key: value})


@pytest.mark.parametrize("opt", [O.Muon(), O.NorMuon(), O.Scion(norm="sign")],
                         ids=lambda o: type(o).__name__)
@pytest.mark.parametrize("shape", [(5,), ()])
def test_vector_parameter_rejected_by_matrix_optimizers(opt, shape):
    with pytest.raises(ValueError, match=rf"takes matrices .* got a parameter of shape "
                                         rf"{re.escape(str(shape))}.*AdamW"):
        opt.init({"w": mx.zeros(shape)})


def test_optimizers_registry_lists_every_name():
    assert set(O.OPTIMIZERS) == {"adamw", "muon", "normuon", "scion", "lamb", "lars"}
    assert all(isinstance(v, str) and v for v in O.OPTIMIZERS.values())
