"""Hugging Face checkpoints -> LocalNorm: the model options they need and exact logits.

References: float64 NumPy written here for the model options, and logits computed by
`transformers` (float32) stored in tests/fixtures/hf/ by make_fixtures.py (or computed live
when torch is installed).
"""

import importlib.util
import json
import math
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

import mlx_localnorm as ln  # noqa: F401  (must load before mlx.core)
from mlx_localnorm.models import Model, ModelArgs
from mlx_localnorm.models.layers import MLP

VOCAB = 32
TINY = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=64)
TOKENS = mx.array(np.random.default_rng(1).integers(0, VOCAB, size=(2, 9)))


def f64(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32), dtype=np.float64)


# ---- model options ----------------------------------------------------------------------------

def gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def gelu_erf(x):
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


NP_ACTIVATIONS = {"silu": lambda x: x / (1 + np.exp(-x)), "gelu_tanh": gelu_tanh,
                  "gelu": gelu_erf}


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("activation", list(NP_ACTIVATIONS))
def test_mlp_activation_and_gating_match_numpy(activation, gated):
    mx.random.seed(0)
    mlp = MLP(8, 16, bias=True, activation=activation, gated=gated)
    x = mx.random.normal((3, 8))
    w = {k: f64(v) for k, v in tree_flatten(mlp.parameters())}
    act = NP_ACTIVATIONS[activation]
    up = f64(x) @ w["up_proj.weight"].T + w["up_proj.bias"]
    if gated:
        hidden = act(f64(x) @ w["gate_proj.weight"].T + w["gate_proj.bias"]) * up
    else:
        assert "gate_proj.weight" not in w
        hidden = act(up)
    want = hidden @ w["down_proj.weight"].T + w["down_proj.bias"]
    np.testing.assert_allclose(f64(mlp(x)), want, rtol=1e-5, atol=1e-5)


def tiny_model(seed=0, **overrides) -> Model:
    mx.random.seed(seed)
    return Model(ModelArgs(**{**TINY, **overrides}))


GPT2_OPTIONS = dict(position_embedding="learned", max_position_embeddings=16,
                    mlp_activation="gelu_tanh", mlp_gated=False, attention_bias=True,
                    mlp_bias=True, norm_type="layernorm", norm_eps=1e-5)


def test_learned_positions_and_embed_scale_enter_the_first_block():
    """The first block sees embed_scale * E[x] + P[position] (checked by replacing it)."""
    model = tiny_model(**GPT2_OPTIONS, embed_scale=2.5)
    seen = []

    def spy(h, mask, cache):
        seen.append(h)
        return h

    model.model.layers[0] = spy
    model(TOKENS)
    E, P = f64(model.model.embed_tokens.weight), f64(model.model.embed_positions.weight)
    want = 2.5 * E[np.array(TOKENS)] + P[np.arange(TOKENS.shape[1])]
    np.testing.assert_allclose(f64(seen[0]), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("options", [GPT2_OPTIONS,
                                     dict(mlp_activation="gelu_tanh", embed_scale=32**0.5,
                                          norm_options={"zero_centered": True})])
def test_kv_cache_with_conversion_options(options):
    """Token-by-token decoding through the cache equals the full forward pass."""
    model = tiny_model(**options)
    cache = model.make_cache()
    steps = [model(TOKENS[:, :4], cache=cache)]
    steps += [model(TOKENS[:, t:t + 1], cache=cache) for t in range(4, TOKENS.shape[1])]
    np.testing.assert_allclose(f64(mx.concatenate(steps, axis=1)), f64(model(TOKENS)),
                               atol=1e-5)


def test_learned_positions_refuse_tokens_past_their_table():
    model = tiny_model(**GPT2_OPTIONS)
    with pytest.raises(ValueError, match="max_position_embeddings=16.*got 17 tokens after 0"):
        model(mx.zeros((1, 17), dtype=mx.int32))


def test_attention_out_bias_defaults_to_attention_bias():
    assert "bias" in tiny_model(attention_bias=True).layers[0].self_attn.o_proj
    qwen2_like = tiny_model(attention_bias=True, attention_out_bias=False).layers[0].self_attn
    assert "bias" in qwen2_like.q_proj and "bias" not in qwen2_like.o_proj


@pytest.mark.parametrize("options, message", [
    (dict(mlp_activation="relu"), "mlp_activation must be one of .*got 'relu'"),
    (dict(position_embedding="alibi"), "position_embedding must be one of .*got 'alibi'"),
    (dict(position_embedding="learned"), "max_position_embeddings .*learned.* got None"),
    (dict(embed_scale=0.0), "embed_scale must be a positive number, got 0.0"),
    (dict(num_experts=4, mlp_activation="gelu_tanh"), "MoE experts are SwiGLU"),
    (dict(placement="ngpt", mlp_gated=False), "placement 'ngpt'.*mlp_gated"),
])
def test_bad_conversion_options_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        ModelArgs(**{**TINY, **options})


def test_odd_head_dim_needs_rope_only():
    with pytest.raises(ValueError, match="head_dim must be even for RoPE"):
        ModelArgs(**TINY, head_dim=5)
    assert tiny_model(**GPT2_OPTIONS, head_dim=5)(TOKENS).shape == (2, 9, VOCAB)


def test_non_bool_flags_are_type_errors():
    with pytest.raises(TypeError, match="mlp_gated must be a bool, got 'no'"):
        ModelArgs(**TINY, mlp_gated="no")
