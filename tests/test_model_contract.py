"""The model's contract with its callers: clean errors on bad input, and mlx-lm's tools."""

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models import llama
from mlx_lm.models.switch_layers import QuantizedSwitchLinear
from mlx_lm.utils import quantize_model, sharded_load
from test_models import (TINY, TOKENS, VOCAB, max_rel_error, mlx_lm_model, tiny_model,
                         tiny_tokenizer)

from mlx_localnorm.models import Model, ModelArgs, localnorm, save_model, swap_norms


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


# ---- mlx-lm: quantized models -----------------------------------------------------------------

def quantized_layers(model) -> dict:
    return {path: (m.group_size, m.bits, m.mode) for path, m in model.named_modules()
            if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding, QuantizedSwitchLinear))}


def mixed_precision(path, module):
    if not hasattr(module, "to_quantized"):
        return False
    if path.endswith("q_proj"):
        return {"group_size": 32, "bits": 4, "mode": "mxfp4"}
    if path.endswith("embed_tokens"):
        return {"group_size": 32, "bits": 8}
    return not path.endswith("o_proj")  # o_proj stays in float; the rest: the call's default


QUANTIZE = {
    "affine": lambda m: nn.quantize(m, group_size=32, bits=4),
    "mixed": lambda m: nn.quantize(m, group_size=64, bits=6, class_predicate=mixed_precision),
    "nvfp4": lambda m: nn.quantize(m, group_size=16, bits=4, mode="nvfp4"),
    "mlx_lm": lambda m: quantize_model(m, {}, group_size=32, bits=3),
    "mlx_lm_nvfp4_global": lambda m: quantize_model(m, {}, None, None, mode="nvfp4",
                                                   global_scale=True),
}
METAL_ONLY = {"mlx_lm_nvfp4_global"}  # MLX runs nvfp4 experts with a global scale on GPU only
WIDE_MOE = dict(hidden_size=64, intermediate_size=128, num_experts=4, qk_norm="rmsnorm",
                tie_word_embeddings=False)


@pytest.mark.parametrize("how", [
    pytest.param(how, marks=pytest.mark.metal) if how in METAL_ONLY else how for how in QUANTIZE])
def test_a_quantized_model_saves_and_loads(tmp_path, how):
    model = tiny_model(**WIDE_MOE)
    config = QUANTIZE[how](model)
    path = save_model(model, tiny_tokenizer(), tmp_path / "m")
    loaded, _ = mlx_lm.load(str(path), trust_remote_code=True)
    assert quantized_layers(loaded) == quantized_layers(model) != {}
    got, want = (np.array(m(TOKENS).astype(mx.float32)) for m in (loaded, model))
    np.testing.assert_array_equal(got, want)
    saved = json.loads((path / "config.json").read_text())
    assert saved["quantization"] == saved["quantization_config"]
    if config is not None:  # written as mlx-lm's own quantize_model writes it
        written = {k: {"mode": "affine", **v} if isinstance(v, dict) else v
                   for k, v in config[1]["quantization"].items()}
        assert saved["quantization"] == written


def test_quant_predicate_keeps_moe_routers_at_8_bits():
    model, _ = quantize_model(tiny_model(**WIDE_MOE), {}, group_size=32, bits=4)
    got = quantized_layers(model)
    routers = {p for p in got if p.endswith(".mlp.gate")}
    assert routers == {f"model.layers.{i}.mlp.gate" for i in range(2)}
    assert {got[p] for p in routers} == {(64, 8, "affine")}
    assert {v for p, v in got.items() if p not in routers} == {(32, 4, "affine")}


# ---- mlx-lm: scaled RoPE ----------------------------------------------------------------------

ROPE_SCALING = {
    "default": {"rope_type": "default"},
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8,
             "beta_fast": 32, "beta_slow": 1},
    "deepseek_yarn": {"rope_type": "deepseek_yarn", "factor": 4.0, "mscale": 1.0,
                      "mscale_all_dim": 1.0, "original_max_position_embeddings": 8},
    "telechat3-yarn": {"rope_type": "telechat3-yarn", "factor": 4.0,
                       "original_max_position_embeddings": 8},
    "longrope": {"type": "longrope", "short_factor": [1.0, 1.5, 2.0, 3.0],
                 "long_factor": [2.0, 3.0, 4.0, 6.0], "original_max_position_embeddings": 8},
    "proportional": {"rope_type": "proportional", "factor": 2.0, "partial_rotary_factor": 0.5},
    "mrope": {"rope_type": "mrope", "mrope_section": [2, 1, 1]},
}


@pytest.mark.parametrize("kind", list(ROPE_SCALING))
def test_every_rope_scaling_type_loads_with_mlx_lm(tmp_path, kind):
    # TOKENS (11) run past original_max_position_embeddings (8): the scaled branch is used.
    model = tiny_model(rope_scaling=ROPE_SCALING[kind], max_position_embeddings=64)
    path = save_model(model, tiny_tokenizer(), tmp_path / "m")
    loaded, tokenizer = mlx_lm.load(str(path), trust_remote_code=True)
    assert type(loaded.layers[0].self_attn.rope) is type(model.layers[0].self_attn.rope)
    np.testing.assert_array_equal(np.array(loaded(TOKENS)), np.array(model(TOKENS)))
    assert tokenizer.encode("w3 w4") == [5, 6]


# ---- mlx-lm: models whose norms were swapped ---------------------------------------------------

SWAPS = [("seednorm", "pre", {}), ("dyt", "peri", {}), ("layernorm", "mix", {"bias": False}),
         ("seednorm", "sandwich", {"num_heads": 2, "beta_init_std": 0.1, "eps": 1e-3})]


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("norm,placement,options", SWAPS)
def test_a_swapped_model_saves_as_a_localnorm_model(tmp_path, kind, norm, placement, options):
    model = swap_norms(mlx_lm_model(kind), norm=norm, placement=placement, mix_ratio=0.5,
                       **options)
    path = save_model(model, tiny_tokenizer(), tmp_path / "m")
    loaded, _ = mlx_lm.load(str(path), trust_remote_code=True)
    assert isinstance(loaded, Model)
    assert (loaded.args.norm_type, loaded.args.placement) == (norm, placement)
    # Same weights, same math; float32 sums may be ordered differently (bias-free vs zero bias).
    assert max_rel_error(loaded(TOKENS), model(TOKENS)) < 1e-6


def test_a_quantized_swapped_model_saves_as_a_localnorm_model(tmp_path):
    model = swap_norms(mlx_lm_model("qwen3"), norm="seednorm", placement="peri")
    nn.quantize(model, group_size=32, bits=4)
    path = save_model(model, tiny_tokenizer(), tmp_path / "m")
    loaded, _ = mlx_lm.load(str(path), trust_remote_code=True)
    assert quantized_layers(loaded) == quantized_layers(model) != {}
    assert max_rel_error(loaded(TOKENS), model(TOKENS)) < 1e-6


# ---- mlx-lm: tensor parallelism ----------------------------------------------------------------

SHARDABLE = {
    "dense": dict(attention_bias=True, mlp_bias=True, attention_gate=True, qk_norm="rmsnorm"),
    "moe": dict(num_experts=4, moe_intermediate_size=32, mlp_bias=True),
    "ngpt": dict(placement="ngpt"),
    "seednorm_sandwich": dict(placement="sandwich", norm_type="seednorm",
                              norm_options={"num_heads": 4, "beta_init_std": 0.1}),
    "quantized_moe": dict(hidden_size=64, intermediate_size=128, num_experts=4,
                          moe_intermediate_size=64, qk_norm="rmsnorm"),
}


def shardable_model(kind) -> Model:
    """A model of SHARDABLE with random biases (they start at zero: a sum would hide them)."""
    model = tiny_model(**SHARDABLE[kind])
    rng = np.random.default_rng(0)
    model.load_weights([(k, mx.array(rng.normal(size=v.shape).astype(np.float32)))
                        for k, v in tree_flatten(model.parameters()) if k.endswith(".bias")],
                       strict=False)
    if kind.startswith("quantized"):  # each rank's half of a row still holds whole groups
        nn.quantize(model, group_size=32, bits=4)
    return model


@pytest.mark.parametrize("kind", list(SHARDABLE))
def test_sharded_load_on_a_group_of_one(tmp_path, kind):
    model = shardable_model(kind)
    path = save_model(model, tiny_tokenizer(), tmp_path / "m")
    sharded, _ = sharded_load(str(path), trust_remote_code=True)
    np.testing.assert_array_equal(np.array(sharded(TOKENS)), np.array(model(TOKENS)))


SHARD_SCRIPT = """
import sys
import mlx_localnorm
import mlx.core as mx
import numpy as np
from mlx_lm.utils import sharded_load

tokens, *paths = sys.argv[1:]
tokens = mx.array(np.load(tokens))
rank = mx.distributed.init().rank()
for path in paths:
    model, _ = sharded_load(path, trust_remote_code=True)
    cache = model.make_cache()  # prefill, then one token at a time through the KV cache
    steps = [model(tokens[:, :5], cache=cache)]
    steps += [model(tokens[:, t:t + 1], cache=cache) for t in range(5, tokens.shape[1])]
    np.save(f"{path}.{rank}.npy", np.array(mx.concatenate(steps, axis=1)))
"""


def test_tensor_parallel_on_two_processes_matches_one(tmp_path):
    np.save(tmp_path / "tokens.npy", np.array(TOKENS))
    (tmp_path / "shard.py").write_text(SHARD_SCRIPT)
    models = {kind: shardable_model(kind) for kind in SHARDABLE}
    paths = [str(save_model(model, tiny_tokenizer(), tmp_path / kind))
             for kind, model in models.items()]
    launch = [str(Path(sys.executable).parent / "mlx.launch"), "-n", "2", sys.executable,
              str(tmp_path / "shard.py"), str(tmp_path / "tokens.npy"), *paths]
    run = subprocess.run(launch, capture_output=True, text=True, timeout=600)
    for path, model in zip(paths, models.values()):
        want = model(TOKENS)
        for rank in (0, 1):
            assert Path(f"{path}.{rank}.npy").exists(), run.stdout + run.stderr
            got = mx.array(np.load(f"{path}.{rank}.npy"))
            # Each rank sums half of every o_proj/down_proj product: float32 reordering only.
            assert max_rel_error(got, want) < 1e-5, (path, rank)
