"""Weight constraints (nGPT normalize, anGPT constrain) against float64 NumPy references."""

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models import llama

from mlx_localnorm import constraints as C


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
