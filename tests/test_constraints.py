"""Weight constraints (nGPT normalize, anGPT constrain) and the nGPT/anGPT residual updates
with negative eigen learning rates, against float64 NumPy references."""

import math

import mlx.core as mx
import numpy as np
import pytest
from mlx import nn
from mlx.utils import tree_flatten
from mlx_lm.models import llama

from mlx_localnorm import constraints as C
from mlx_localnorm.optim import Constrained
from mlx_localnorm.placements import ANGPTBlock, NGPTBlock


def tiny_llama(layers: int = 2) -> llama.Model:
    mx.random.seed(0)
    args = llama.ModelArgs(
        model_type="llama", hidden_size=16, num_hidden_layers=layers, intermediate_size=24,
        num_attention_heads=2, rms_norm_eps=1e-5, vocab_size=32, num_key_value_heads=1,
        tie_word_embeddings=False,
    )
    return llama.Model(args)


# SPEC "ngpt": the D axis of each weight, written out for the tiny llama above (D = 16).
EXPECTED_AXIS = {
    "model.embed_tokens.weight": -1,
    "lm_head.weight": -1,
    "self_attn.q_proj.weight": -1,
    "self_attn.k_proj.weight": -1,
    "self_attn.v_proj.weight": -1,
    "mlp.gate_proj.weight": -1,
    "mlp.up_proj.weight": -1,
    "self_attn.o_proj.weight": -2,
    "mlp.down_proj.weight": -2,
    "input_layernorm.weight": None,
    "post_attention_layernorm.weight": None,
    "model.norm.weight": None,
}


def expected_axis(path: str):
    for suffix, axis in EXPECTED_AXIS.items():
        if path.endswith(suffix):
            return axis
    raise KeyError(path)


def ref_project(w: np.ndarray, axis: int, mode: str, eps: float = 1e-6) -> np.ndarray:
    w = w.astype(np.float64)
    norm = np.sqrt((w * w).sum(axis=axis, keepdims=True))
    return w / np.maximum(norm, eps if mode == "normalize" else 1.0)


def test_residual_axis_follows_mlx_lm_names():
    model = tiny_llama()
    seen = set()
    for path, w in tree_flatten(model.parameters()):
        assert C.residual_axis(path, w.shape) == expected_axis(path), path
        seen.add(C.residual_axis(path, w.shape))
    assert seen == {-1, -2, None}
    # The D axis really has D = hidden_size entries for every constrained weight.
    for path, w in tree_flatten(model.parameters()):
        axis = C.residual_axis(path, w.shape)
        if axis is not None:
            assert w.shape[axis] == 16, path


def test_residual_axis_stacked_experts_and_non_weights():
    # mlx-lm SwitchLinear weights are (experts, out, in).
    assert C.residual_axis("model.layers.0.mlp.switch_mlp.gate_proj.weight", (4, 24, 16)) == -1
    assert C.residual_axis("model.layers.0.mlp.switch_mlp.down_proj.weight", (4, 16, 24)) == -2
    assert C.residual_axis("model.layers.0.self_attn.q_proj.bias", (16,)) is None
    assert C.residual_axis("model.layers.0.mlp.gate.weight", (4, 16)) is None
    assert C.residual_axis("weight", (4, 4)) is None
    assert C.residual_axis("model.layers.0.self_attn.q_proj.weight", (16,)) is None
    with pytest.raises(TypeError, match="path must be a str"):
        C.residual_axis(3, (4, 4))


@pytest.mark.parametrize("mode", C.CONSTRAINT_MODES)
def test_project_weights_matches_reference(mode):
    model = tiny_llama()
    # Scale weights so some norms are above 1 and some below (constrain must keep the latter).
    model.update(
        {"model": {"layers": [{"mlp": {"down_proj": {"weight": 40 * layer.mlp.down_proj.weight}}}
                              for layer in model.model.layers]}}
    )
    before = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    C.project_weights(model, mode=mode)
    after = dict(tree_flatten(model.parameters()))
    changed_by_constrain = 0
    for path, w0 in before.items():
        axis = expected_axis(path)
        want = w0.astype(np.float64) if axis is None else ref_project(w0, axis, mode)
        np.testing.assert_allclose(np.array(after[path]), want, rtol=2e-6, atol=1e-7, err_msg=path)
        changed_by_constrain += axis is not None and not np.allclose(w0, want)
    if mode == "constrain":
        assert changed_by_constrain > 0  # the scaled down_proj columns were pulled in


def test_normalize_gives_unit_norms_and_constrain_caps_them():
    model = tiny_llama()
    C.project_weights(model, "normalize")
    o = np.array(model.model.layers[0].self_attn.o_proj.weight, dtype=np.float64)
    q = np.array(model.model.layers[0].self_attn.q_proj.weight, dtype=np.float64)
    np.testing.assert_allclose(np.linalg.norm(o, axis=0), 1.0, rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0, rtol=1e-6)
    w = mx.array(np.random.default_rng(0).normal(size=(3, 5, 7)).astype(np.float32))
    out = np.array(C.project(w, -2, "constrain"), dtype=np.float64)
    assert np.all(np.linalg.norm(out, axis=-2) <= 1 + 1e-6)


def test_stacked_experts_projected_per_matrix():
    w = mx.array(np.random.default_rng(1).normal(size=(4, 6, 5)).astype(np.float32))
    tree = {"mlp": {"switch_mlp": {"down_proj": {"weight": w}}}}
    out = C.project_tree(tree, "normalize")["mlp"]["switch_mlp"]["down_proj"]["weight"]
    for e in range(4):
        np.testing.assert_allclose(
            np.array(out[e]), ref_project(np.array(w[e]), 0, "normalize"), rtol=2e-6, atol=1e-7
        )


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
def test_dtype_kept_and_math_in_float32(dtype):
    w = mx.array(np.random.default_rng(2).normal(size=(8, 64)).astype(np.float32)).astype(dtype)
    out = C.project(w, -1, "normalize")
    assert out.dtype == dtype
    want = ref_project(np.array(w.astype(mx.float32)), -1, "normalize")
    # One rounding to the storage dtype: bfloat16 has 8 bits of mantissa, float16 11.
    tol = {mx.bfloat16: 2**-8, mx.float16: 2**-11}[dtype]
    np.testing.assert_allclose(np.array(out.astype(mx.float32)), want, rtol=tol, atol=1e-6)


def test_project_tree_compiles_and_equals_in_place():
    model = tiny_llama()
    params = model.parameters()
    compiled = mx.compile(lambda p: C.project_tree(p, "constrain"))(params)
    C.project_weights(model, "constrain")
    for (k1, a), (k2, b) in zip(tree_flatten(compiled), tree_flatten(model.parameters())):
        assert k1 == k2
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-6, atol=1e-7)


def test_frozen_weights_untouched():
    model = tiny_llama()
    model.model.layers[0].freeze()
    before = np.array(model.model.layers[0].self_attn.q_proj.weight)
    C.project_weights(model)
    np.testing.assert_array_equal(np.array(model.model.layers[0].self_attn.q_proj.weight), before)
    np.testing.assert_allclose(
        np.linalg.norm(np.array(model.model.layers[1].self_attn.q_proj.weight), axis=1), 1.0,
        rtol=1e-6,
    )


def test_bad_arguments_raise():
    model = tiny_llama(1)
    with pytest.raises(ValueError, match=r"mode must be one of .*'normalize'.*got 'unit'"):
        C.project_weights(model, mode="unit")
    with pytest.raises(ValueError, match="eps must be a positive number, got -1"):
        C.project_tree(model.parameters(), eps=-1)
    with pytest.raises(TypeError, match="floating array, got dtype"):
        C.project(mx.zeros((2, 2), dtype=mx.int32), -1)
    with pytest.raises(TypeError, match="Constrained: optimizer must be an "
                       "mlx.optimizers.Optimizer, got dict"):
        Constrained({})


# ---- nGPT/anGPT residual updates with negative eigen learning rates --------------------------

class LinearAttention(nn.Module):
    """Stands in for attention: the blocks only need ``self_attn(x, mask, cache)``."""

    def __init__(self, w: np.ndarray):
        super().__init__()
        self.proj = nn.Linear(*w.shape[::-1], bias=False)
        self.proj.weight = mx.array(w.astype(np.float32))

    def __call__(self, x, mask=None, cache=None):
        return self.proj(x)


class TanhMLP(LinearAttention):
    def __call__(self, x):
        return mx.tanh(self.proj(x))


def silu_constant() -> float:
    """anGPT's ``1 / sqrt(E[silu(z)^2])``, z ~ N(0, 1) (SPEC: about 1.68)."""
    z = np.linspace(-12, 12, 200001)
    density = np.exp(-z * z / 2) / math.sqrt(2 * math.pi)
    return 1 / math.sqrt(np.sum((z / (1 + np.exp(-z))) ** 2 * density) * (z[1] - z[0]))


def ref_hypersphere_block(placement, x, w_attn, w_mlp, p_attn, p_mlp, alpha_init, nu_f):
    """SPEC: nGPT ``h = L2(h + |a| (L2(F(h)) - h))``; anGPT ``h = nu(a) (h + a (nu_F F(h) - h))``
    with ``a = |alpha|``, ``nu(a) = 1 / sqrt((1-a)^2 + a^2)``; ``alpha = p alpha_init sqrt(D)``."""
    d = x.shape[-1]

    def l2(v):
        return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-6)

    h = x.astype(np.float64)
    functions = (lambda v: v @ w_attn.T, lambda v: np.tanh(v @ w_mlp.T))
    for f, p, nu in zip(functions, (p_attn, p_mlp), nu_f):
        a = np.abs(p * alpha_init * math.sqrt(d))
        if placement == "ngpt":
            h = l2(h + a * (l2(f(h)) - h))
        else:
            h = (h + a * (nu * f(h) - h)) / np.sqrt((1 - a) ** 2 + a**2)
    return h


@pytest.mark.parametrize("placement", ["ngpt", "angpt"])
def test_negative_eigen_learning_rates_act_by_their_magnitude(placement):
    d, hidden, alpha_init = 8, 16, 0.3
    rng = np.random.default_rng(5)
    w_attn = rng.normal(size=(d, d)) / math.sqrt(d)
    w_mlp = rng.normal(size=(d, d)) / math.sqrt(d)
    # Stored eigen learning rates with every other entry negative (nothing keeps them >= 0
    # during training); |alpha| is in [0.15, 0.45].
    signs = np.where(np.arange(d) % 2, -1.0, 1.0)
    p_attn, p_mlp = (signs * rng.uniform(0.5, 1.5, d) / math.sqrt(d) for _ in range(2))
    attn, mlp = LinearAttention(w_attn), TanhMLP(w_mlp)
    if placement == "ngpt":
        block, nu_f = NGPTBlock(attn, mlp, d, alpha_init), (1.0, 1.0)
    else:  # the MLP-output constant assumes a SiLU MLP of width `hidden` (SPEC ApproxNorm)
        block = ANGPTBlock(attn, mlp, d, hidden, hidden, alpha_init)
        nu_f = (math.sqrt(d / hidden), silu_constant() * math.sqrt(d / hidden))
    block.alpha_attn = mx.array(p_attn.astype(np.float32))
    block.alpha_mlp = mx.array(p_mlp.astype(np.float32))
    x = rng.normal(size=(2, 3, d))
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    got = np.array(block(mx.array(x.astype(np.float32))), dtype=np.float64)
    want = ref_hypersphere_block(placement, x, w_attn, w_mlp, p_attn, p_mlp, alpha_init, nu_f)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
