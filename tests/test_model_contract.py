"""The model's contract with its callers: clean errors on bad input, and mlx-lm's tools."""

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from mlx_lm.models import llama
from test_models import TINY, TOKENS, VOCAB, tiny_model, tiny_tokenizer

from mlx_localnorm.models import ModelArgs, localnorm, swap_norms


def tiny_llama() -> llama.Model:
    mx.random.seed(0)
    return llama.Model(llama.ModelArgs(
        model_type="llama", hidden_size=32, num_hidden_layers=2, intermediate_size=64,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, vocab_size=VOCAB))


# ---- token ids --------------------------------------------------------------------------------

@pytest.mark.parametrize("ids", [[1, VOCAB], [-1, 2], [1, 2**30]])
def test_out_of_range_token_ids_name_vocab_size(ids):
    model = tiny_model()
    with pytest.raises(ValueError, match=rf"token ids must be in \[0, vocab_size={VOCAB}\)"):
        model(mx.array([ids]))


def test_out_of_range_token_ids_with_a_warm_cache():
    model, cache = tiny_model(), tiny_model().make_cache()
    model(TOKENS[:1], cache=cache)
    with pytest.raises(ValueError, match=rf"vocab_size={VOCAB}"):
        model(mx.array([[3, VOCAB + 5]]), cache=cache)
    with pytest.raises(ValueError, match=rf"vocab_size={VOCAB}"):
        model(mx.array([[VOCAB]]), cache=cache)  # one user token, e.g. a prompt's last


def test_in_range_ids_of_every_integer_dtype_pass():
    model = tiny_model()
    want = np.array(model(TOKENS))
    for dtype in (mx.int32, mx.uint32, mx.int64, mx.uint8, mx.int16):
        np.testing.assert_array_equal(np.array(model(TOKENS.astype(dtype))), want)


def test_the_check_stays_out_of_compiled_and_differentiated_calls():
    model = tiny_model()
    want = np.array(model(TOKENS))
    np.testing.assert_array_equal(np.array(mx.compile(model)(TOKENS)), want)
    grad = mx.grad(lambda e: model(TOKENS, input_embeddings=e).sum())(
        model.model.embed_tokens(TOKENS))
    assert grad.shape == (*TOKENS.shape, TINY["hidden_size"])


def test_generation_never_waits_to_check_its_own_samples(monkeypatch):
    """mlx-lm checks the prompt, then feeds back samples it is still computing: not read."""
    skipped, real = [], localnorm._sampled_tokens
    monkeypatch.setattr(localnorm, "_sampled_tokens",
                        lambda inputs, cache: skipped.append(real(inputs, cache)) or skipped[-1])
    list(mlx_lm.stream_generate(tiny_model(), tiny_tokenizer(), "w1 w2 w3", max_tokens=6))
    prompt_calls = skipped.index(True)
    assert 1 <= prompt_calls <= 3 and all(skipped[prompt_calls:]), skipped


@pytest.mark.parametrize("shape", [(1, 0), (0, 3)])
def test_an_empty_token_array_gets_our_message(shape):
    with pytest.raises(ValueError, match=r"at least one token.*got shape"):
        tiny_model()(mx.zeros(shape, dtype=mx.int32))


# ---- configuration ----------------------------------------------------------------------------

@pytest.mark.parametrize("overrides,error,message", [
    (dict(rope_theta=0.0), ValueError, r"rope_theta must be a positive number, got 0\.0"),
    (dict(rope_theta=-1e4), ValueError, r"rope_theta must be a positive number, got -10000\.0"),
    (dict(rope_theta=float("nan")), ValueError, r"rope_theta must be a positive number, got nan"),
    (dict(rope_theta="1e4"), ValueError, r"rope_theta must be a positive number, got '1e4'"),
    (dict(head_dim=7), ValueError, r"head_dim must be even .*RoPE.*got 7"),
    (dict(hidden_size=28), ValueError, r"head_dim must be even .*RoPE.*got 7"),
    (dict(num_experts=2, moe_intermediate_size=0), ValueError,
     r"moe_intermediate_size must be a positive int, got 0"),
    (dict(norm_options=["num_heads", 2]), TypeError, r"norm_options must be a dict.*got list"),
    (dict(norm_options=None), TypeError, r"norm_options must be a dict.*got NoneType"),
])
def test_bad_model_args_name_the_field(overrides, error, message):
    with pytest.raises(error, match=message):
        ModelArgs(**{**TINY, **overrides})


@pytest.mark.parametrize("mix_ratio", [-0.1, 1.5, float("nan")])
def test_swap_norms_checks_mix_ratio(mix_ratio):
    with pytest.raises(ValueError, match=r"swap_norms: mix_ratio must be in \[0, 1\]"):
        swap_norms(tiny_llama(), norm="rmsnorm", placement="mix", mix_ratio=mix_ratio)
