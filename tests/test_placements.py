"""Every placement of SPEC against its block equations, written here in float64 NumPy.

A 2-layer LocalNorm model gets fixed random weights (gains away from 1, SeeDNorm's beta away
from 0, so each norm's parameters matter); its logits must equal the NumPy forward pass.
The reference reads the weights by their documented mlx-lm names and nothing else.
"""

import math

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

import mlx_localnorm  # noqa: F401  (must load before mlx.core)
from mlx_localnorm.models import Model, ModelArgs
from mlx_localnorm.placements import PLACEMENTS, check_placement

EPS = 1e-6
BASE = dict(vocab_size=37, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=48, norm_eps=EPS, rope_theta=10000.0)
TOKENS = np.array([[3, 17, 5, 0, 36, 11, 8, 2, 29], [1, 1, 30, 7, 22, 14, 9, 33, 4]])


# ---- float64 references, from SPEC.md -------------------------------------------------------

def rms(x):
    return np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + EPS)


def l2(x):
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), EPS)


def silu(z):
    return z / (1 + np.exp(-z))


def sigmoid(z):
    return 1 / (1 + np.exp(-z))


def norm_ref(kind, P, name, x):
    """N(x) for the norm kind with the parameters stored under ``name``."""
    g = P.get(f"{name}.weight")
    if kind == "rmsnorm":
        return g * x / rms(x)
    if kind == "layernorm":
        mu = x.mean(-1, keepdims=True)
        return g * (x - mu) / np.sqrt(x.var(-1, keepdims=True) + EPS) + P[f"{name}.bias"]
    if kind == "seednorm":
        s = np.tanh(np.sum(x * P[f"{name}.beta"], axis=-1, keepdims=True))
        return (g + P[f"{name}.alpha"] * s) * x / rms(x)
    if kind == "dyt":
        return g * np.tanh(P[f"{name}.alpha"] * x) + P[f"{name}.bias"]
    if kind == "l2norm":
        return l2(x)
    if kind in ("patchnorm", "patchnorm-affine"):  # patch_size 1: the patch is the row itself
        z = x @ g.T if g.ndim == 2 else g * x
        if kind == "patchnorm":
            return z / rms(x) + P[f"{name}.bias"]
        return (z + P[f"{name}.bias"]) / np.sqrt(np.sum(x * x, axis=-1, keepdims=True) + 1)
    raise AssertionError(kind)


def rope(x, base=10000.0):
    """Non-interleaved RoPE on [B, H, T, hd]: rotate (x_i, x_{i+hd/2}) by t * base^(-2i/hd)."""
    hd = x.shape[-1]
    freqs = base ** (-np.arange(0, hd, 2) / hd)
    ang = np.arange(x.shape[-2])[:, None] * freqs[None]
    cos, sin = np.cos(ang), np.sin(ang)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return np.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


def attention_ref(cfg, P, pre, x, window=None):
    B, T, D = x.shape
    H, KV = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = cfg.head_dim
    q = (x @ P[f"{pre}.q_proj.weight"].T).reshape(B, T, H, hd)
    k = (x @ P[f"{pre}.k_proj.weight"].T).reshape(B, T, KV, hd)
    v = (x @ P[f"{pre}.v_proj.weight"].T).reshape(B, T, KV, hd)
    hyper = cfg.placement in ("ngpt", "angpt")
    if hyper:  # SPEC nGPT: q, k unit per head, times s_qk (stored at 1/sqrt(D), used * sqrt(D))
        q = l2(q) * (P[f"{pre}.s_q"] * math.sqrt(D)).reshape(H, hd)
        k = l2(k) * (P[f"{pre}.s_k"] * math.sqrt(D)).reshape(KV, hd)
    elif cfg.qk_norm:
        q = norm_ref(cfg.qk_norm, P, f"{pre}.q_norm", q)
        k = norm_ref(cfg.qk_norm, P, f"{pre}.k_norm", k)
    q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
    q, k = rope(q, cfg.rope_theta), rope(k, cfg.rope_theta)
    k, v = np.repeat(k, H // KV, axis=1), np.repeat(v, H // KV, axis=1)
    scale = math.sqrt(hd) if hyper else 1 / math.sqrt(hd)
    scores = q @ k.transpose(0, 1, 3, 2) * scale
    i, j = np.arange(T)[:, None], np.arange(T)[None]
    allowed = j <= i if window is None else (j <= i) & (j > i - window)
    scores = np.where(allowed, scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    out = (p / p.sum(-1, keepdims=True)) @ v
    out = out.transpose(0, 2, 1, 3).reshape(B, T, H * hd)
    if cfg.attention_gate:
        out = out * sigmoid(x @ P[f"{pre}.g_proj.weight"].T)
    return out @ P[f"{pre}.o_proj.weight"].T


def swiglu_ref(gate, up, down, x, s_u=None, s_v=None):
    u, v = x @ up.T, x @ gate.T
    if s_u is not None:  # SPEC nGPT: u *= s_u, v *= s_v * sqrt(D)
        u, v = u * s_u, v * s_v * math.sqrt(x.shape[-1])
    return (silu(v) * u) @ down.T


def mlp_ref(cfg, P, pre, x):
    if cfg.num_experts:  # SPEC MoE: softmax router, top-k, gates renormalized over the top-k
        logits = x @ P[f"{pre}.gate.weight"].T
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        top = np.argsort(-probs, axis=-1)[..., : cfg.num_experts_per_tok]
        gates = np.take_along_axis(probs, top, -1)
        gates /= gates.sum(-1, keepdims=True)
        y = np.zeros_like(x)
        for e in range(cfg.num_experts):
            out_e = swiglu_ref(*(P[f"{pre}.switch_mlp.{n}_proj.weight"][e]
                                 for n in ("gate", "up", "down")), x)
            y += (gates * (top == e)).sum(-1, keepdims=True) * out_e
        return y
    if cfg.placement in ("ngpt", "angpt"):
        return swiglu_ref(P[f"{pre}.gate_proj.weight"], P[f"{pre}.up_proj.weight"],
                          P[f"{pre}.down_proj.weight"], x, P[f"{pre}.s_u"], P[f"{pre}.s_v"])
    return swiglu_ref(P[f"{pre}.gate_proj.weight"], P[f"{pre}.up_proj.weight"],
                      P[f"{pre}.down_proj.weight"], x)


def forward_ref(cfg, P, tokens):
    """SPEC "Placements": a block applies the rule to attention, then to the MLP."""
    D, L, kind = cfg.hidden_size, cfg.num_hidden_layers, cfg.norm_type
    if cfg.norm_options.get("mode") == "affine":
        kind = "patchnorm-affine"
    x = P["model.embed_tokens.weight"][tokens]
    for layer in range(L):
        b = f"model.layers.{layer}"
        window = cfg.sliding_window if cfg.layer_types[layer] == "sliding_attention" else None

        def A(h, b=b, window=window):
            return attention_ref(cfg, P, f"{b}.self_attn", h, window)

        def M(h, b=b):
            return mlp_ref(cfg, P, f"{b}.mlp", h)

        def N(name, h, b=b):
            return norm_ref(kind, P, f"{b}.{name}", h)

        post = cfg.placement == "post" or (
            cfg.placement == "mix" and layer < math.floor(cfg.mix_ratio * L))
        if post:  # x = N(x + F(x))
            x = N("post_attention_layernorm", x + A(x))
            x = N("post_feedforward_layernorm", x + M(x))
        elif cfg.placement in ("pre", "mix", "lnscaling"):  # x = x + F(N(x)) [/ sqrt(l)]
            s = 1 / math.sqrt(layer + 1) if cfg.placement == "lnscaling" else 1.0
            x = x + A(N("input_layernorm", x) * s)
            x = x + M(N("post_attention_layernorm", x) * s)
        elif cfg.placement in ("peri", "sandwich"):  # x = x + N_out(F(N_in(x)))
            if cfg.placement == "peri" and layer == 0:  # x0 = N(embed)
                x = N("embed_layernorm", x)
            x = x + N("post_attention_layernorm", A(N("input_layernorm", x)))
            x = x + N("post_feedforward_layernorm", M(N("pre_feedforward_layernorm", x)))
        elif cfg.placement == "ngpt":  # h = L2(h + |alpha| (L2(F(h)) - h)), alpha used * sqrt(D)
            for F, a in ((A, "alpha_attn"), (M, "alpha_mlp")):
                alpha = np.abs(P[f"{b}.{a}"] * cfg.ngpt_alpha_init * math.sqrt(D))
                x = l2(x + alpha * (l2(F(x)) - x))
        elif cfg.placement == "angpt":  # the L2s of nGPT become constants nu
            nu_silu = 1.6765  # 1/sqrt(E[silu(z)^2]), z ~ N(0, 1), by quadrature below
            nus = (math.sqrt(D / (cfg.num_attention_heads * cfg.head_dim)),
                   nu_silu * math.sqrt(D / cfg.intermediate_size))
            for F, a, nu_f in ((A, "alpha_attn", nus[0]), (M, "alpha_mlp", nus[1])):
                alpha = np.abs(P[f"{b}.{a}"] * cfg.ngpt_alpha_init * math.sqrt(D))
                nu = 1 / np.sqrt((1 - alpha) ** 2 + alpha**2)
                x = nu * (x + alpha * (nu_f * F(x) - x))
        else:
            raise AssertionError(cfg.placement)
    if cfg.placement not in ("post", "ngpt", "angpt"):
        x = norm_ref(kind, P, "model.norm", x)
    head = P.get("lm_head.weight", P["model.embed_tokens.weight"])
    logits = x @ head.T
    if cfg.placement in ("ngpt", "angpt"):  # logits * s_z, s_z stored at 1/sqrt(D)
        logits = logits * P["s_z"] * math.sqrt(D)
    return logits


def test_silu_constant_of_the_reference():
    z = np.linspace(-12, 12, 200001)
    second_moment = np.sum(silu(z) ** 2 * np.exp(-z * z / 2)) * (z[1] - z[0]) / math.sqrt(2 * math.pi)
    assert abs(1 / math.sqrt(second_moment) - 1.6765) < 5e-4


# ---- the model with fixed weights -----------------------------------------------------------

def fixed_model(seed=0, **overrides):
    """A Model whose every parameter is drawn from a seeded NumPy generator (float32)."""
    cfg = ModelArgs(**{**BASE, **overrides})
    model = Model(cfg)
    rng = np.random.default_rng(seed)
    params = []
    for path, p in tree_flatten(model.parameters()):
        v = np.array(p)
        if v.ndim >= 2:
            new = rng.normal(size=v.shape) / math.sqrt(v.shape[-1])
        elif not v.any():  # biases, SeeDNorm beta: away from 0
            new = 0.3 * rng.normal(size=v.shape)
        else:  # gains, alpha, nGPT scales: random around their init value
            new = v * (1 + 0.2 * rng.normal(size=v.shape))
        params.append((path, mx.array(new.astype(np.float32))))
    model.update(tree_unflatten(params))
    P = {k: np.array(v, dtype=np.float64) for k, v in tree_flatten(model.parameters())}
    return cfg, model, P


def check_against_reference(**overrides):
    cfg, model, P = fixed_model(**overrides)
    got = np.array(model(mx.array(TOKENS)), dtype=np.float64)
    want = forward_ref(cfg, P, TOKENS)
    assert got.shape == (2, TOKENS.shape[1], cfg.vocab_size)
    # float32 forward vs float64 reference: a few ulps per op over ~60 ops.
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4 * np.abs(want).max())


NORM_PLACEMENTS = [p for p in PLACEMENTS if p not in ("ngpt", "angpt")]


@pytest.mark.parametrize("placement", NORM_PLACEMENTS)
@pytest.mark.parametrize("norm", ["rmsnorm", "seednorm"])
def test_norm_placements_match_spec(placement, norm):
    check_against_reference(placement=placement, norm_type=norm, mix_ratio=0.5)


@pytest.mark.parametrize("placement,norm", [("pre", "layernorm"), ("post", "layernorm"),
                                            ("pre", "dyt"), ("peri", "dyt"),
                                            ("sandwich", "l2norm"), ("mix", "layernorm"),
                                            ("pre", "patchnorm"), ("post", "patchnorm")])
def test_other_norms_in_placements(placement, norm):
    check_against_reference(placement=placement, norm_type=norm, mix_ratio=0.5)


@pytest.mark.parametrize("options", [{"weight": "full"}, {"mode": "affine"}])
def test_patchnorm_options_in_peri(options):
    check_against_reference(placement="peri", norm_type="patchnorm", norm_options=options)


@pytest.mark.parametrize("placement", ["ngpt", "angpt"])
def test_hypersphere_placements_match_spec(placement):
    check_against_reference(placement=placement)


def test_mix_uses_post_ln_for_the_first_quarter():
    _, model, _ = fixed_model(placement="mix", num_hidden_layers=8)
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds == ["PostLN"] * 2 + ["PreLN"] * 6


def test_attention_options_match_spec():
    check_against_reference(placement="pre", norm_type="seednorm", num_key_value_heads=2,
                            qk_norm="rmsnorm", attention_gate=True,
                            layer_types=["sliding_attention", "full_attention"],
                            sliding_window=4)


def test_moe_matches_spec():
    check_against_reference(placement="peri", num_experts=4, num_experts_per_tok=2,
                            moe_intermediate_size=24, tie_word_embeddings=False)


def test_moe_load_balance_loss_matches_spec():
    cfg, model, P = fixed_model(placement="pre", num_experts=4, num_experts_per_tok=2,
                                num_hidden_layers=1, router_aux_loss_coef=0.1)
    model(mx.array(TOKENS))
    got = model.aux_loss().item()
    # Router input of layer 0: N(embed), the Pre-LN post-attention norm of x + Attn(N(x)).
    x = P["model.embed_tokens.weight"][TOKENS]
    b = "model.layers.0"
    x = x + attention_ref(cfg, P, f"{b}.self_attn", norm_ref("rmsnorm", P, f"{b}.input_layernorm", x))
    h = norm_ref("rmsnorm", P, f"{b}.post_attention_layernorm", x).reshape(-1, cfg.hidden_size)
    logits = h @ P[f"{b}.mlp.gate.weight"].T
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    top = np.argsort(-probs, axis=-1)[:, :2]
    f = np.array([(top == e).sum() for e in range(4)]) / top.size
    want = 0.1 * 4 * np.sum(f * probs.mean(0))
    assert got == pytest.approx(want, rel=1e-5)


def test_check_placement_errors_name_the_choices():
    with pytest.raises(ValueError, match="valid placements: post, pre, mix, peri"):
        check_placement("prenorm", "rmsnorm")
    with pytest.raises(ValueError, match="norm_type must be 'l2norm'"):
        check_placement("ngpt", "rmsnorm")
    with pytest.raises(ValueError, match="only works in placement 'angpt'"):
        check_placement("pre", "angpt")
