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
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

import mlx_localnorm as ln
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


# ---- from_hf: exact logits ----------------------------------------------------------------------

FIXTURES = Path(__file__).parent / "fixtures" / "hf"
CASES = sorted(p.name for p in FIXTURES.iterdir() if (p / "config.json").is_file())
RMSNORM_CASES = [c for c in CASES if c != "gpt2"]
# transformers and MLX sum in different orders: measured <= 2e-5 on logits of size ~20.
LOGIT_ATOL = 1e-4


def test_every_model_type_has_a_fixture():
    types = {json.loads((FIXTURES / c / "config.json").read_text())["model_type"] for c in CASES}
    assert types == set(ln.convert.SUPPORTED_MODEL_TYPES)


def converted_logits(directory, tokens, **options) -> np.ndarray:
    model, _ = ln.convert.from_hf(directory, **options)
    return f64(model(mx.array(tokens)))


@pytest.mark.parametrize("case", CASES)
def test_logits_equal_transformers(case):
    reference = np.load(FIXTURES / case / "reference.npz")
    got = converted_logits(FIXTURES / case, reference["tokens"])
    np.testing.assert_allclose(got, reference["logits"], rtol=0, atol=LOGIT_ATOL)


# Dynamic NTK RoPE changes its base with the length, so cached keys keep an older base (as in
# transformers); every other case must decode through the cache exactly as in one pass.
@pytest.mark.parametrize("case", [c for c in CASES if c != "llama_dynamic"])
def test_converted_model_decodes_through_the_cache(case):
    model, _ = ln.convert.from_hf(FIXTURES / case)
    tokens = mx.array(np.load(FIXTURES / case / "reference.npz")["tokens"])
    cache = model.make_cache()
    steps = [model(tokens[:, :3], cache=cache)]
    steps += [model(tokens[:, t:t + 1], cache=cache) for t in range(3, tokens.shape[1])]
    np.testing.assert_allclose(f64(mx.concatenate(steps, axis=1)), f64(model(tokens)),
                               rtol=0, atol=LOGIT_ATOL)


def test_transformers_4_config_keys_convert_the_same(tmp_path):
    """Most published configs predate rope_parameters; Gemma's say hidden_act "gelu" (tanh)."""
    llama, gemma = editable_copy(tmp_path, "llama_llama3"), editable_copy(tmp_path, "gemma")
    rope = json.loads((llama / "config.json").read_text()).pop("rope_parameters")
    config = json.loads((llama / "config.json").read_text())
    del config["rope_parameters"]
    (llama / "config.json").write_text(json.dumps(
        {**config, "rope_theta": rope.pop("rope_theta"), "rope_scaling": rope}))
    edit_config(gemma, hidden_act="gelu")
    for directory in (llama, gemma):
        reference = np.load(directory / "reference.npz")
        np.testing.assert_allclose(converted_logits(directory, reference["tokens"]),
                                   reference["logits"], rtol=0, atol=LOGIT_ATOL)


# ---- directories written by mlx-lm ---------------------------------------------------------

def mlx_lm_copy(source: Path, target: Path, **config_changes) -> Path:
    """What `mlx_lm.convert` (float) writes: mlx-lm's model loaded and saved by mlx-lm."""
    from mlx_lm.utils import load, save

    shutil.copytree(source, target / "hf")
    edit_config(target / "hf", **config_changes)
    # mlx-lm reads GPT-2 as the original checkpoints name it (h.0..., no transformer.).
    edit_tensors(target / "hf", lambda t: t.update(
        {k.removeprefix("transformer."): t.pop(k) for k in list(t)}))
    model, tokenizer, config = load(str(target / "hf"), return_config=True)
    save(target / "mlx", str(target / "hf"), model, tokenizer, config)
    return target / "mlx"


@pytest.mark.parametrize("case, changes", [("llama_llama3", {}), ("gpt2", {"n_ctx": 16})])
def test_float_directory_written_by_mlx_lm_converts_the_same(case, changes, tmp_path):
    """GPT-2 in mlx-lm's naming: ``model.h.*``, weights already (out, in) (mlx-lm needs n_ctx)."""
    directory = mlx_lm_copy(FIXTURES / case, tmp_path, **changes)
    if case == "gpt2":
        assert "model.h.0.attn.c_attn.weight" in mx.load(str(directory / "model.safetensors"))
    reference = np.load(FIXTURES / case / "reference.npz")
    np.testing.assert_allclose(converted_logits(directory, reference["tokens"]),
                               reference["logits"], rtol=0, atol=LOGIT_ATOL)


WIDE = {  # wide enough for mlx-lm to quantize every layer in groups of 32
    "llama": dict(model_type="llama", vocab_size=48, hidden_size=64, intermediate_size=96,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  rms_norm_eps=1e-5, tie_word_embeddings=False, eos_token_id=1),
    "gpt2": dict(model_type="gpt2", vocab_size=48, n_embd=32, n_layer=2, n_head=4, n_ctx=16,
                 n_positions=16, layer_norm_epsilon=1e-5, eos_token_id=1),
}


def mlx_lm_quantized(model_type: str, bits: int | None, directory: Path):
    """A random mlx-lm model written as `mlx_lm.convert -q` does; returns mlx-lm's model."""
    import importlib

    from mlx.utils import tree_map_with_path
    from mlx_lm.utils import quantize_model, save_config, save_model

    config = dict(WIDE[model_type])
    module = importlib.import_module(f"mlx_lm.models.{model_type}")
    mx.random.seed(3)
    model = module.Model(module.ModelArgs.from_dict(config))
    # Norm gains and biases away from 1 and 0, so one that is lost shows in the logits.
    model.update(tree_map_with_path(
        lambda path, p: p + 0.3 * mx.random.normal(p.shape) if p.ndim == 1 else p,
        model.parameters()))
    if bits is not None:
        model, config = quantize_model(model, config, group_size=32, bits=bits)
    directory.mkdir()
    save_model(directory, model)
    save_config(config, directory / "config.json")
    for file in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(FIXTURES / "gpt2" / file, directory / file)
    return model


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_quantized_mlx_lm_directory_stays_quantized(model_type, bits, tmp_path):
    mlx_model = mlx_lm_quantized(model_type, bits, tmp_path / "q")
    model, _ = ln.convert.from_hf(tmp_path / "q")
    kinds = {path: type(m).__name__ for path, m in model.named_modules()}
    assert kinds["model.embed_tokens"] == "QuantizedEmbedding"
    for name in ("self_attn.q_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.up_proj",
                 "mlp.down_proj"):
        assert kinds[f"model.layers.1.{name}"] == "QuantizedLinear", name
    assert kinds["model.layers.0.input_layernorm"] in ("RMSNorm", "LayerNorm")
    assert {m.bits for m in model.modules() if hasattr(m, "bits")} == {bits}
    # Packed weights, scales and biases exactly as saved (GPT-2's fused c_attn split in 3).
    saved = mx.load(str(tmp_path / "q" / "model.safetensors"))
    ours = dict(tree_flatten(model.parameters()))
    for kind in ("weight", "scales", "biases"):
        if model_type == "gpt2":
            fused = np.concatenate([np.array(ours[f"model.layers.0.self_attn.{p}_proj.{kind}"])
                                    for p in "qkv"])
            np.testing.assert_array_equal(fused, np.array(saved[f"model.h.0.attn.c_attn.{kind}"]))
        else:
            name = f"model.layers.0.self_attn.k_proj.{kind}"
            np.testing.assert_array_equal(np.array(ours[name]), np.array(saved[name]))
    np.testing.assert_allclose(f64(model(TOKENS)), f64(mlx_model(TOKENS)), rtol=0,
                               atol=LOGIT_ATOL)


def test_float_mlx_lm_model_converts_to_its_logits(tmp_path):
    mlx_model = mlx_lm_quantized("llama", None, tmp_path / "f")
    model, _ = ln.convert.from_hf(tmp_path / "f")
    np.testing.assert_allclose(f64(model(TOKENS)), f64(mlx_model(TOKENS)), rtol=0,
                               atol=LOGIT_ATOL)


def test_mlx_lm_convert_q_output_converts(tmp_path):
    """`mlx_lm.convert -q` on a fixture: only down_proj's width (32) fits a group of 32."""
    from mlx_lm import convert, load

    convert(str(FIXTURES / "qwen3"), str(tmp_path / "q"), quantize=True, q_group_size=32,
            q_bits=4)
    model, _ = ln.convert.from_hf(tmp_path / "q")
    assert type(model.layers[0].mlp.down_proj).__name__ == "QuantizedLinear"
    mlx_model, _ = load(str(tmp_path / "q"))
    np.testing.assert_allclose(f64(model(TOKENS)), f64(mlx_model(TOKENS)), rtol=0,
                               atol=LOGIT_ATOL)


@pytest.mark.parametrize("norm", ["seednorm", "dyt"])
def test_norm_swap_on_a_4_bit_model_keeps_it_quantized(norm, tmp_path):
    mlx_model = mlx_lm_quantized("llama", 4, tmp_path / "q")
    quantized, _ = ln.convert.from_hf(tmp_path / "q")
    swapped, _ = ln.convert.from_hf(tmp_path / "q", norm=norm)
    assert type(swapped.layers[1].mlp.gate_proj).__name__ == "QuantizedLinear"
    assert type(swapped.layers[1].input_layernorm).__name__ == {"seednorm": "SeeDNorm",
                                                                "dyt": "DyT"}[norm]
    np.testing.assert_array_equal(np.array(swapped.layers[1].mlp.gate_proj.scales),
                                  np.array(quantized.layers[1].mlp.gate_proj.scales))
    if norm == "seednorm":
        np.testing.assert_allclose(f64(swapped(TOKENS)), f64(mlx_model(TOKENS)), rtol=0,
                                   atol=LOGIT_ATOL)


def shard(source: Path, target: Path, parts: int = 3) -> None:
    """Copy checkpoint ``source`` to ``target`` with its tensors split over ``parts`` files."""
    shutil.copytree(source, target)
    tensors = mx.load(str(target / "model.safetensors"))
    (target / "model.safetensors").unlink()
    names = sorted(tensors)
    weight_map = {}
    for i in range(parts):
        file = f"model-{i + 1:05d}-of-{parts:05d}.safetensors"
        mx.save_safetensors(str(target / file), {n: tensors[n] for n in names[i::parts]})
        weight_map |= {n: file for n in names[i::parts]}
    (target / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.mark.parametrize("case", ["gpt2", "llama_llama3"])
def test_sharded_checkpoint_converts_identically(case, tmp_path):
    shard(FIXTURES / case, tmp_path / case)
    tokens = np.load(FIXTURES / case / "reference.npz")["tokens"]
    np.testing.assert_array_equal(converted_logits(tmp_path / case, tokens),
                                  converted_logits(FIXTURES / case, tokens))


@pytest.mark.parametrize("norm", [None, "seednorm"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_dtype_sets_every_weight(dtype, norm):
    model, _ = ln.convert.from_hf(FIXTURES / "qwen3", norm=norm, dtype=dtype)
    assert {v.dtype for _, v in tree_flatten(model.parameters())} == {getattr(mx, dtype)}


def test_tokenizer_comes_from_the_checkpoint():
    _, tokenizer = ln.convert.from_hf(FIXTURES / "gpt2")
    assert tokenizer.encode("w3 w4") == [5, 6]
    assert tokenizer.eos_token_id == 1


@pytest.mark.parametrize("case", RMSNORM_CASES)
def test_seednorm_swap_keeps_the_logits(case):
    """SeeDNorm equals RMSNorm at init; gains carry over (Gemma's as 1 + w)."""
    reference = np.load(FIXTURES / case / "reference.npz")
    model, _ = ln.convert.from_hf(FIXTURES / case, norm="seednorm")
    norms = tuple(ln.NORMS.values())
    assert {type(m) for _, m in model.named_modules() if isinstance(m, norms)} == {ln.SeeDNorm}
    np.testing.assert_allclose(f64(model(mx.array(reference["tokens"]))), reference["logits"],
                               rtol=0, atol=LOGIT_ATOL)


def test_placement_swap_keeps_every_other_weight():
    model, _ = ln.convert.from_hf(FIXTURES / "llama_llama3", placement="peri")
    source = dict(tree_flatten(ln.convert.from_hf(FIXTURES / "llama_llama3")[0].parameters()))
    swapped = dict(tree_flatten(model.parameters()))
    assert "model.layers.0.embed_layernorm.weight" in swapped
    for key in ("model.embed_tokens.weight", "lm_head.weight",
                "model.layers.1.self_attn.k_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        np.testing.assert_array_equal(np.array(swapped[key]), np.array(source[key]))


@pytest.mark.parametrize("options, message", [
    (dict(placement="ngpt"), "placement must be None or one of post, pre, .*got 'ngpt'"),
    (dict(placement="angpt"), "placement must be None or one of .*got 'angpt'"),
    (dict(norm="nope"), "norm must be None or one of angpt, dyt, .*got 'nope'"),
    (dict(norm="angpt"), "norm 'angpt' .* only works in placement 'angpt'"),
])
def test_bad_swap_is_refused_before_reading_weights(options, message, tmp_path):
    directory = editable_copy(tmp_path)
    (directory / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=message):
        ln.convert.from_hf(directory, **options)


# ---- from_hf: bad input -------------------------------------------------------------------------

def editable_copy(tmp_path, case="llama_llama3") -> Path:
    target = tmp_path / case
    shutil.copytree(FIXTURES / case, target)
    return target


def edit_tensors(directory: Path, edit) -> None:
    tensors = mx.load(str(directory / "model.safetensors"))
    edit(tensors)
    mx.save_safetensors(str(directory / "model.safetensors"), tensors)


def edit_config(directory: Path, **changes) -> None:
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, **changes}))


def test_unsupported_model_type_lists_the_supported_ones(tmp_path):
    directory = editable_copy(tmp_path)
    edit_config(directory, model_type="falcon")
    with pytest.raises(ValueError, match="model_type must be one of llama, mistral, qwen2, "
                                         "qwen3, gemma, gpt2;.* has 'falcon'"):
        ln.convert.from_hf(directory)


def test_missing_tensor_is_named(tmp_path):
    directory = editable_copy(tmp_path)
    edit_tensors(directory, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensor\(s\) model.layers.1.mlp.up_proj.weight"):
        ln.convert.from_hf(directory)


def test_missing_untied_head_is_named(tmp_path):
    directory = editable_copy(tmp_path)
    edit_tensors(directory, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(ValueError, match=r"missing tensor\(s\) lm_head.weight"):
        ln.convert.from_hf(directory)


def test_shape_mismatch_names_the_tensor_and_both_shapes(tmp_path):
    directory = editable_copy(tmp_path)
    edit_config(directory, intermediate_size=24)
    with pytest.raises(ValueError, match=r"tensor '(model\.layers\.\d\.mlp\.[\w.]+)' in "
                                         r"model.safetensors has shape \((32, 16|16, 32)\), "
                                         r"but config.json makes '\1' \((24, 16|16, 24)\)"):
        ln.convert.from_hf(directory)


def test_gpt2_fused_qkv_of_the_wrong_width_is_a_shape_error(tmp_path):
    directory = editable_copy(tmp_path, "gpt2")
    name = "transformer.h.0.attn.c_attn.weight"
    edit_tensors(directory, lambda t: t.update({name: t[name][:, :40]}))
    with pytest.raises(ValueError, match=rf"'{name}'.*got shape \(16, 40\)"):
        ln.convert.from_hf(directory)


def test_unexpected_tensor_is_named(tmp_path):
    directory = editable_copy(tmp_path)
    edit_tensors(directory, lambda t: t.update({"model.layers.0.extra.weight": mx.zeros(3)}))
    with pytest.raises(ValueError, match="tensor 'model.layers.0.extra.weight', which this "
                                         "architecture does not have"):
        ln.convert.from_hf(directory)


def test_path_that_does_not_exist(tmp_path):
    with pytest.raises(ValueError, match=f"path '{tmp_path / 'nothing'}' does not exist"):
        ln.convert.from_hf(tmp_path / "nothing")


def test_directory_without_weights(tmp_path):
    directory = editable_copy(tmp_path)
    (directory / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="has no weights: expected model.safetensors"):
        ln.convert.from_hf(directory)


def test_index_naming_a_missing_shard(tmp_path):
    shard(FIXTURES / "gpt2", tmp_path / "gpt2")
    (tmp_path / "gpt2" / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(ValueError, match="names shard\\(s\\) model-00002-of-00003.safetensors "
                                         "that are not in"):
        ln.convert.from_hf(tmp_path / "gpt2")


def test_unsupported_rope_type_and_bad_dtype(tmp_path):
    directory = editable_copy(tmp_path)
    edit_config(directory, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4,
                                            "factor": 2.0})
    with pytest.raises(ValueError, match="rope_type must be one of .*got 'yarn'"):
        ln.convert.from_hf(directory)
    with pytest.raises(ValueError, match="dtype must be one of .*got 'float64'"):
        ln.convert.from_hf(FIXTURES / "gpt2", dtype="float64")


def test_quantized_source_in_another_format_is_refused_by_name(tmp_path):
    directory = editable_copy(tmp_path)
    edit_config(directory, quantization_config={"quant_method": "gptq", "bits": 4})
    with pytest.raises(ValueError, match="is quantized by 'gptq'; only float checkpoints and "
                                         "mlx-lm quantized ones"):
        ln.convert.from_hf(directory)


def test_conversion_writes_nothing(tmp_path):
    directory = editable_copy(tmp_path)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    ln.convert.from_hf(directory)
    edit_tensors(directory, lambda t: t.pop("model.norm.weight"))
    with pytest.raises(ValueError):
        ln.convert.from_hf(directory)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


# ---- calibration of swaps that change the function ---------------------------------------------

def sample(model, batch: int, length: int, seed: int) -> mx.array:
    """Text the source model itself writes (temperature 1): held-out data it predicts well."""
    mx.random.seed(seed)
    tokens = [mx.random.randint(0, model.args.vocab_size, (batch, 1))]
    cache = model.make_cache()
    logits = model(tokens[0], cache=cache)
    for _ in range(length - 1):
        tokens.append(mx.random.categorical(logits[:, -1])[:, None])
        logits = model(tokens[-1], cache=cache)
    return mx.concatenate(tokens, axis=1)


def log_perplexity(model, tokens: mx.array) -> float:
    """Mean next-token negative log-likelihood, in float64 NumPy."""
    logits = f64(model(tokens[:, :-1]))
    logits -= logits.max(axis=-1, keepdims=True)
    log_p = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
    targets = np.array(tokens[:, 1:])
    return -np.take_along_axis(log_p, targets[..., None], axis=-1).mean()


class Spy(nn.Module):
    """Records what a module is called with and returns."""

    def __init__(self, module):
        super().__init__()
        self.module, self.seen = module, []

    def __call__(self, x, *args):
        out = self.module(x, *args)
        self.seen.append((f64(x).reshape(-1, x.shape[-1]), f64(out).reshape(-1, out.shape[-1])))
        return out


def spied(model, layer: int, name: str, tokens) -> tuple[np.ndarray, np.ndarray]:
    """Input and output rows of ``model.layers[layer].<name>`` on ``tokens``."""
    block = model.layers[layer]
    block[name] = spy = Spy(block[name])
    model(tokens)
    block[name] = spy.module
    return spy.seen[0]


def swapped(case: str, norm=None, placement=None):
    from mlx_localnorm.convert.swap import swap_model_norms

    source, _ = ln.convert.from_hf(FIXTURES / case)
    return source, swap_model_norms(source, norm, placement)


def np_channel_fit(z, y, intercept=True):
    """Per-channel least squares of y on z (float64), with the residual sum of squares."""
    design = [np.stack([z[:, j], np.ones(len(z))] if intercept else [z[:, j]], axis=1)
              for j in range(z.shape[1])]
    coef = [np.linalg.lstsq(d, y[:, j], rcond=None)[0] for j, d in enumerate(design)]
    w = np.array([c[0] for c in coef])
    b = np.array([c[1] for c in coef]) if intercept else np.zeros_like(w)
    return w, b, ((w * z + b - y) ** 2).sum()


def test_fitted_dyt_matches_a_float64_numpy_fit():
    """alpha minimizes sum (w tanh(alpha x) + b - y)^2 with per-channel least-squares w, b."""
    source, target = swapped("llama_llama3", norm="dyt")
    tokens = sample(source, 4, 32, seed=1)
    ln.convert.calibrate(source, target, [tokens])
    x, y = spied(source, 0, "input_layernorm", tokens)  # the embeddings, in both models
    alphas = np.exp(np.linspace(np.log(1e-3), np.log(1e3), 1201)) / x.std()
    losses = [np_channel_fit(np.tanh(a * x), y)[2] for a in alphas]
    best = int(np.argmin(losses))
    assert 0 < best < len(alphas) - 1  # an interior minimum
    fitted = target.layers[0].input_layernorm
    alpha = fitted.alpha.item()
    np.testing.assert_allclose(alpha, alphas[best], rtol=0.02)
    w, b, loss = np_channel_fit(np.tanh(alpha * x), y)
    assert loss <= losses[best] * (1 + 1e-3)
    np.testing.assert_allclose(f64(fitted.weight), w, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(f64(fitted.bias), b, rtol=1e-3, atol=1e-4)


def test_recording_a_module_the_forward_pass_never_calls_is_a_clear_error():
    from mlx_localnorm.convert.calibrate import record

    source, _ = swapped("llama_llama3", norm="dyt")
    source.spare = nn.RMSNorm(source.args.hidden_size)  # held by the model, never called
    with pytest.raises(ValueError, match="never calls spare; there is nothing to fit"):
        record(source, [sample(source, 2, 8, seed=1)], ["model.norm", "spare"])
    assert type(source.model.norm).__name__ != "_Recorder"  # the model is left as it was


def test_peri_output_norm_gain_fits_the_identity_on_the_branch_output():
    """RMSNorm gain w_j = <z_j, a_j> / <z_j, z_j>, z = a / RMS(a): about the output's RMS."""
    source, target = swapped("llama_llama3", placement="peri")
    tokens = sample(source, 4, 32, seed=1)
    ln.convert.calibrate(source, target, [tokens], sequential=False)
    _, attn = spied(source, 1, "self_attn", tokens)
    z = attn / np.sqrt((attn**2).mean(axis=-1, keepdims=True) + source.args.norm_eps)
    want = (z * attn).sum(axis=0) / (z * z).sum(axis=0)
    got = f64(target.layers[1].post_attention_layernorm.weight)
    np.testing.assert_allclose(got, want, rtol=1e-4)
    # The embedding norm is fitted to the identity on the embeddings, the input norm copies.
    x, _ = spied(source, 0, "input_layernorm", tokens)
    z = x / np.sqrt((x**2).mean(axis=-1, keepdims=True) + source.args.norm_eps)
    np.testing.assert_allclose(f64(target.layers[0].embed_layernorm.weight),
                               (z * x).sum(axis=0) / (z * z).sum(axis=0), rtol=1e-4)
    np.testing.assert_allclose(f64(target.layers[1].input_layernorm.weight),
                               f64(source.layers[1].input_layernorm.weight), rtol=1e-4)


# Measured gap ratios (calibrated / not): 0.35, 0.41, 0.37, 0.68, 0.43, 0.32, 0.19. LayerNorm
# cannot keep the mean of an RMSNorm model's input (it subtracts it): its gain is smaller.
@pytest.mark.parametrize("case, norm, placement, bound", [
    ("llama_llama3", "dyt", None, 0.5),
    ("qwen3", "dyt", None, 0.6),
    ("gpt2", "dyt", None, 0.5),
    ("qwen3", "layernorm", None, 0.8),
    ("qwen2", "layernorm", None, 0.6),
    ("gpt2", "rmsnorm", None, 0.5),
    ("llama_llama3", None, "peri", 0.3),
])
def test_calibration_closes_the_perplexity_gap(case, norm, placement, bound):
    """Held-out text (another seed) written by the source: log-perplexity gap to the source."""
    source, target = swapped(case, norm, placement)
    length = 16 if case == "gpt2" else 48
    held_out = sample(source, 16, length, seed=9)
    base = log_perplexity(source, held_out)
    uncalibrated = log_perplexity(target, held_out) - base
    ln.convert.calibrate(source, target, [sample(source, 8, length, seed=s) for s in (1, 2)])
    calibrated = log_perplexity(target, held_out) - base
    assert uncalibrated > 0.1
    assert 0 <= calibrated < bound * uncalibrated


def test_layernorm_bias_moves_into_the_next_layers_when_rmsnorm_has_none():
    """GPT-2 -> RMSNorm: y ~ w z + c per channel (z = x / RMS(x)); q/k/v take b + W c."""
    source, target = swapped("gpt2", norm="rmsnorm")
    tokens = sample(source, 4, 16, seed=1)
    ln.convert.calibrate(source, target, [tokens])
    x, y = spied(source, 0, "input_layernorm", tokens)
    z = x / np.sqrt((x**2).mean(axis=-1, keepdims=True) + source.args.norm_eps)
    w, c, _ = np_channel_fit(z, y)
    np.testing.assert_allclose(f64(target.layers[0].input_layernorm.weight), w, rtol=1e-3,
                               atol=1e-4)
    for name in ("q_proj", "k_proj", "v_proj"):
        old, new = source.layers[0].self_attn[name], target.layers[0].self_attn[name]
        np.testing.assert_allclose(f64(new.bias), f64(old.bias) + f64(old.weight) @ c,
                                   rtol=1e-3, atol=1e-4)
        np.testing.assert_array_equal(np.array(new.weight), np.array(old.weight))


@pytest.mark.parametrize("case", ["llama_llama3", "gemma"])
def test_calibration_makes_ln_scaling_exact(case):
    """N(x)/sqrt(l) matches the source's N(x) exactly with the gain times sqrt(l)."""
    source, target = swapped(case, placement="lnscaling")
    tokens = sample(source, 4, 16, seed=1)
    assert np.abs(f64(target(tokens)) - f64(source(tokens))).max() > 0.1
    ln.convert.calibrate(source, target, [tokens])
    np.testing.assert_allclose(f64(target(tokens)), f64(source(tokens)), rtol=0,
                               atol=LOGIT_ATOL)


def test_calibration_leaves_an_exact_seednorm_swap_alone():
    source, target = swapped("qwen3", norm="seednorm")
    before = dict(tree_flatten(target.parameters()))
    report = ln.convert.calibrate(source, target, [sample(source, 2, 8, seed=1)])
    assert set(report) >= {"model.layers.1.self_attn.k_norm", "model.norm"}
    assert not any(entry["fitted"] for entry in report.values())
    for key, value in tree_flatten(target.parameters()):
        np.testing.assert_array_equal(np.array(value), np.array(before[key]))


@pytest.mark.parametrize("batches", [[], TOKENS, [TOKENS[0]], [TOKENS.astype(mx.float32)]])
def test_calibration_needs_token_batches(batches):
    source, target = swapped("gpt2", norm="dyt")
    with pytest.raises(TypeError, match="batches must be a non-empty list of \\(B, L\\) integer"):
        ln.convert.calibrate(source, target, batches)


def test_calibration_refuses_a_placement_change_from_a_source_that_is_not_pre_ln():
    source, target = swapped("llama_llama3", placement="peri")
    with pytest.raises(ValueError, match="needs a Pre-LN source.*got 'peri' -> 'pre'"):
        ln.convert.calibrate(target, source, [TOKENS])


# Peri-LN's forward order, written out: embedding norm (block 0), then per block the input
# norm, the attention output norm, the MLP input norm, the MLP output norm; the final norm.
PERI_ORDER = ["model.layers.0.embed_layernorm"] + [
    f"model.layers.{i}.{name}" for i in range(2)
    for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm")] + ["model.norm"]


def peri_source():
    """The Llama fixture made Peri-LN and calibrated: a Peri-LN RMSNorm model whose norms
    compute something (a model this package saved is read the same way)."""
    from mlx_localnorm.convert.swap import swap_model_norms

    pre, peri = swapped("llama_llama3", placement="peri")
    ln.convert.calibrate(pre, peri, [sample(pre, 8, 48, seed=s) for s in (1, 2)])
    return peri, swap_model_norms


# Measured gap ratios (calibrated / not): DyT 0.33, LayerNorm 0.77 (it subtracts the mean
# the RMSNorm source keeps, as in the Pre-LN cases above).
@pytest.mark.parametrize("norm, bound", [("dyt", 0.5), ("layernorm", 0.9)])
def test_a_norm_swap_keeping_peri_ln_carries_the_gains_and_calibrates_in_forward_order(
        norm, bound):
    """Same placement, another norm: every norm takes the source norm at its path (gains
    carried over), is fitted in the order the forward pass meets it (a norm fitted before
    the ones feeding it sees stale inputs), and the perplexity gap closes."""
    source, swap_model_norms = peri_source()
    target = swap_model_norms(source, norm, None)
    assert target.args.placement == "peri"
    for path in ("model.layers.1.post_attention_layernorm", "model.layers.0.embed_layernorm"):
        old, new = (dict(m.named_modules())[path] for m in (source, target))
        np.testing.assert_array_equal(np.array(new.weight), np.array(old.weight))
    held_out = sample(source, 16, 48, seed=9)
    base = log_perplexity(source, held_out)
    uncalibrated = log_perplexity(target, held_out) - base
    report = ln.convert.calibrate(source, target,
                                  [sample(source, 8, 48, seed=s) for s in (1, 2)])
    assert list(report) == PERI_ORDER
    calibrated = log_perplexity(target, held_out) - base
    assert uncalibrated > 0.5
    assert 0 <= calibrated < bound * uncalibrated


# ---- export back to Hugging Face ----------------------------------------------------------------

BUFFERS = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")


@pytest.mark.parametrize("case", CASES)
def test_export_hf_writes_the_fixture_back(case, tmp_path):
    """Same model_type, the same tensors under the same names and layouts, same logits."""
    from mlx_localnorm.convert.export import export_hf

    model, tokenizer = ln.convert.from_hf(FIXTURES / case)
    export_hf(model, tokenizer, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == json.loads((FIXTURES / case / "config.json").read_text())[
        "model_type"]
    ours = mx.load(str(tmp_path / "hf" / "model.safetensors"))
    source = {k: v for k, v in mx.load(str(FIXTURES / case / "model.safetensors")).items()
              if not k.endswith(BUFFERS)}
    assert set(ours) == set(source)
    for name, value in source.items():
        np.testing.assert_array_equal(np.array(ours[name]), np.array(value), err_msg=name)
    tokens = np.load(FIXTURES / case / "reference.npz")["tokens"]
    np.testing.assert_array_equal(converted_logits(tmp_path / "hf", tokens),
                                  f64(model(mx.array(tokens))))
    text = "w3 w4 w40 w0"
    assert ln.convert.from_hf(tmp_path / "hf")[1].encode(text) == tokenizer.encode(text)


@pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                    reason="torch is not installed (optional: pip install torch==2.13.0)")
@pytest.mark.parametrize("case", ["llama_llama3", "gemma", "gpt2"])
def test_transformers_reads_the_export_to_our_logits(case, tmp_path):
    """A native LocalNorm model trained nowhere near a checkpoint: its Llama-family or GPT-2
    export computes in transformers what it computes here (randomized norms and biases)."""
    from mlx.utils import tree_map

    from mlx_localnorm.convert.export import export_hf

    model, tokenizer = ln.convert.from_hf(FIXTURES / case)
    mx.random.seed(5)
    model.update(tree_map(lambda p: p + 0.1 * mx.random.normal(p.shape), model.parameters()))
    export_hf(model, tokenizer, tmp_path / "hf")
    tokens = np.load(FIXTURES / case / "reference.npz")["tokens"]
    np.testing.assert_allclose(load_make_fixtures().reference_logits(tmp_path / "hf", tokens),
                               f64(model(mx.array(tokens))), rtol=0, atol=LOGIT_ATOL)


@pytest.mark.parametrize("case, options, reason", [
    ("llama_llama3", dict(norm="seednorm"), "norm 'seednorm' \\(transformers has RMSNorm"),
    ("qwen3", dict(norm="dyt"), "norm 'dyt'.*q/k norm 'dyt'"),
    ("llama_llama3", dict(placement="peri"), "placement 'peri' \\(transformers' models are "
                                             "Pre-LN\\)"),
    ("llama_llama3", dict(placement="lnscaling"), "placement 'lnscaling'"),
    ("llama_llama3", dict(norm="layernorm"), "LayerNorm outside GPT-2's form"),
    ("gpt2", dict(norm="rmsnorm"), "RMSNorm with learned positions or an ungated MLP"),
])
def test_export_hf_refuses_what_transformers_cannot_compute(case, options, reason, tmp_path):
    from mlx_localnorm.convert.export import export_hf

    model, tokenizer = ln.convert.from_hf(FIXTURES / case, **options)
    with pytest.raises(ValueError, match=f"transformers has no model with {reason}"):
        export_hf(model, tokenizer, tmp_path / "hf")
    assert list(tmp_path.iterdir()) == []


def test_export_hf_refuses_quantized_and_hypersphere_models(tmp_path):
    from mlx_lm.utils import quantize_model

    from mlx_localnorm.convert.export import export_hf

    model, tokenizer = ln.convert.from_hf(FIXTURES / "qwen3")
    quantize_model(model, {}, 32, 4)
    with pytest.raises(ValueError, match="quantized layers"):
        export_hf(model, tokenizer, tmp_path / "hf")
    with pytest.raises(ValueError, match="placement 'ngpt'.*norm 'l2norm'"):
        export_hf(tiny_model(placement="ngpt"), tokenizer, tmp_path / "hf")
    assert list(tmp_path.iterdir()) == []


def test_export_hf_failure_while_writing_leaves_nothing(tmp_path, monkeypatch):
    from mlx_localnorm.convert.export import export_hf

    model, tokenizer = ln.convert.from_hf(FIXTURES / "gpt2")

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tokenizer._tokenizer, "save_pretrained", full_disk)
    with pytest.raises(OSError, match="No space left"):
        export_hf(model, tokenizer, tmp_path / "hf")
    assert list(tmp_path.iterdir()) == []


def export_cli(*argv) -> int:
    from mlx_localnorm.cli import main

    return main(["export-hf", *map(str, argv)])


def test_cli_exports_a_saved_native_model_as_llama(tmp_path, capsys):
    """A model built here (as pretrain does), saved, exported and read back."""
    _, tokenizer = ln.convert.from_hf(FIXTURES / "gpt2")
    model = tiny_model(seed=2, vocab_size=48, tie_word_embeddings=False)
    ln.save_model(model, tokenizer, tmp_path / "run")
    assert export_cli(tmp_path / "run", "--out", tmp_path / "hf") == 0
    assert "model_type 'llama'" in capsys.readouterr().out
    np.testing.assert_allclose(converted_logits(tmp_path / "hf", np.array(TOKENS)),
                               f64(model(TOKENS)), rtol=0, atol=1e-6)
    assert export_cli(tmp_path / "run", "--out", tmp_path / "hf") == 1
    assert "exists and is not empty" in capsys.readouterr().err
    assert export_cli(tmp_path / "run", "--out", tmp_path / "hf", "--overwrite") == 0


def test_cli_export_refusal_is_one_line_and_writes_nothing(tmp_path, capsys):
    _, tokenizer = ln.convert.from_hf(FIXTURES / "gpt2")
    ln.save_model(tiny_model(vocab_size=48, norm_type="seednorm"), tokenizer, tmp_path / "run")
    assert export_cli(tmp_path / "run", "--out", tmp_path / "hf") == 1
    err = capsys.readouterr().err
    assert "norm 'seednorm'" in err and len(err.strip().splitlines()) == 1
    assert export_cli(FIXTURES / "gpt2", "--out", tmp_path / "hf") == 1
    assert "must have model_type 'localnorm', got 'gpt2'" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


# ---- live transformers reference (optional: needs torch) ----------------------------------------

def load_make_fixtures():
    spec = importlib.util.spec_from_file_location("make_fixtures", FIXTURES / "make_fixtures.py")
    make_fixtures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_fixtures)
    return make_fixtures


@pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                    reason="torch is not installed (optional: pip install torch==2.13.0)")
@pytest.mark.parametrize("case", CASES)
def test_logits_equal_transformers_live(case, tmp_path):
    """A fresh random checkpoint (another seed than the fixture's), referenced live."""
    make_fixtures = load_make_fixtures()
    make_fixtures.make_checkpoint(case, tmp_path, seed=7)
    tokens = make_fixtures.tokens(seed=7)
    np.testing.assert_allclose(converted_logits(tmp_path, tokens),
                               make_fixtures.reference_logits(tmp_path, tokens),
                               rtol=0, atol=LOGIT_ATOL)


# ---- mlx-localnorm convert ----------------------------------------------------------------------

def convert_cli(*argv) -> int:
    from mlx_localnorm.cli import main

    return main(["convert", *map(str, argv)])


@pytest.mark.parametrize("case, options", [("gpt2", []), ("gemma", ["--norm", "seednorm"])])
def test_cli_output_loads_in_mlx_lm_with_the_same_logits(case, options, tmp_path, capsys):
    import mlx_lm

    assert convert_cli("--hf-path", FIXTURES / case, "--out", tmp_path / "out", *options) == 0
    assert "mlx_lm.generate --model" in capsys.readouterr().out
    model, tokenizer = mlx_lm.load(str(tmp_path / "out"), trust_remote_code=True)
    reference = np.load(FIXTURES / case / "reference.npz")
    np.testing.assert_allclose(f64(model(mx.array(reference["tokens"]))), reference["logits"],
                               rtol=0, atol=LOGIT_ATOL)
    assert tokenizer.encode("w3 w4") == [5, 6]
    assert mlx_lm.generate(model, tokenizer, prompt="w3 w4", max_tokens=3)


def write_sample_text(directory: Path, model, tokenizer, rows: int, seed: int) -> list[str]:
    """Lines of fixture words the model itself writes, as sample.txt and train.jsonl."""
    lines = [tokenizer.decode(row) for row in np.array(sample(model, rows, 32, seed)).tolist()]
    directory.mkdir()
    (directory / "sample.txt").write_text("\n".join(lines))
    (directory / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n"
                                                   for t in lines))
    return lines


def test_cli_calibrates_and_heals_a_swap_and_prints_the_perplexity_table(tmp_path, capsys):
    import mlx_lm

    source, tokenizer = ln.convert.from_hf(FIXTURES / "llama_llama3")
    write_sample_text(tmp_path / "text", source, tokenizer, rows=24, seed=4)
    write_sample_text(tmp_path / "heal", source, tokenizer, rows=64, seed=11)
    text = tmp_path / "text" / "sample.txt"
    flags = ["--hf-path", FIXTURES / "llama_llama3", "--norm", "dyt", "--calib-data", text,
             "--calib-batches", "2", "--calib-batch-size", "4", "--calib-seq-len", "32"]
    assert convert_cli(*flags, "--heal-steps", "20", "--heal-data", tmp_path / "heal",
                       "--heal-dir", tmp_path / "run", "--out", tmp_path / "out") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"Held-out perplexity (256 tokens of {text}):"
    rows = {line[:46].strip(): float(line[46:]) for line in lines[1:5]}
    assert list(rows) == ["source (rmsnorm, pre)", "swapped to dyt, pre, not calibrated",
                          "swapped, calibrated", "healed (20 steps, norms)"]
    ppl = list(rows.values())  # 256 held-out tokens: the source need not be the best there
    assert ppl[3] < ppl[2] < ppl[1]
    assert (tmp_path / "run" / "metrics.jsonl").is_file()
    model, _ = mlx_lm.load(str(tmp_path / "out"), trust_remote_code=True)
    assert type(model.layers[0].input_layernorm).__name__ == "DyT"
    assert convert_cli(*flags, "--no-calibrate", "--out", tmp_path / "raw") == 0
    assert "swapped, calibrated" not in capsys.readouterr().out


def test_cli_swaps_the_norm_of_a_saved_localnorm_model_keeping_its_placement(tmp_path, capsys):
    """A model this package saved (here Peri-LN RMSNorm) is read as it is: --norm dyt keeps
    Peri-LN, calibrates (the gap closes) and writes a model mlx-lm loads."""
    import mlx_lm

    from mlx_localnorm.models import save_model

    source, _ = peri_source()
    tokenizer = ln.convert.from_hf(FIXTURES / "llama_llama3")[1]
    save_model(source, tokenizer, tmp_path / "peri")
    write_sample_text(tmp_path / "text", source, tokenizer, rows=24, seed=4)
    assert convert_cli("--hf-path", tmp_path / "peri", "--norm", "dyt", "--calib-data",
                       tmp_path / "text" / "sample.txt", "--calib-batches", "2",
                       "--calib-batch-size", "4", "--calib-seq-len", "32",
                       "--out", tmp_path / "out") == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line[:46].strip(): float(line[46:]) for line in lines[1:4]}
    assert list(rows) == ["source (rmsnorm, peri)", "swapped to dyt, peri, not calibrated",
                          "swapped, calibrated"]
    assert rows["swapped, calibrated"] < rows["swapped to dyt, peri, not calibrated"]
    model, _ = mlx_lm.load(str(tmp_path / "out"), trust_remote_code=True)
    assert model.args.placement == "peri"
    assert type(model.layers[1].post_attention_layernorm).__name__ == "DyT"


def test_cli_refuses_a_norm_swap_of_an_ngpt_model_in_one_line(tmp_path, capsys):
    from test_models import tiny_model, tiny_tokenizer

    from mlx_localnorm.models import save_model

    save_model(tiny_model(norm_type=None, placement="ngpt"), tiny_tokenizer(), tmp_path / "n")
    assert convert_cli("--hf-path", tmp_path / "n", "--norm", "dyt",
                       "--out", tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert "is an ngpt model" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("config", ["[1, 2]", "{not json", '"localnorm"'])
def test_cli_a_config_that_is_not_a_json_object_exits_1_in_one_line(config, tmp_path, capsys):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text(config)
    assert convert_cli("--hf-path", tmp_path / "src", "--out", tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert "config.json" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_heal_trains_only_the_norms_of_a_4_bit_model(tmp_path):
    mlx_lm_quantized("llama", 4, tmp_path / "q")
    source, tokenizer = ln.convert.from_hf(tmp_path / "q")
    target = ln.convert.from_hf(tmp_path / "q", norm="dyt")[0]
    write_sample_text(tmp_path / "heal", source, tokenizer, rows=16, seed=1)
    before = dict(tree_flatten(target.parameters()))
    healed = ln.convert.heal(target, tokenizer, 3, tmp_path / "heal", progress=False)
    after = dict(tree_flatten(healed.parameters()))
    assert set(after) == set(before)
    changed = {k for k in after if not np.array_equal(np.array(after[k]), np.array(before[k]))}
    norms = {k for k in after if "layernorm" in k or k.startswith("model.norm")}
    assert changed and changed <= norms
    assert type(healed.layers[0].mlp.up_proj).__name__ == "QuantizedLinear"


def test_heal_norm_params_weight_moves_the_norm_gains_only(tmp_path):
    source, tokenizer = ln.convert.from_hf(FIXTURES / "llama_llama3")
    target = ln.convert.from_hf(FIXTURES / "llama_llama3", norm="dyt")[0]
    write_sample_text(tmp_path / "heal", source, tokenizer, rows=16, seed=1)
    before = dict(tree_flatten(target.parameters()))
    healed = ln.convert.heal(target, tokenizer, 3, tmp_path / "heal", norm_params="weight",
                             progress=False)
    after = dict(tree_flatten(healed.parameters()))
    changed = {k for k in after if not np.array_equal(np.array(after[k]), np.array(before[k]))}
    gains = {k for k in after if k.endswith("norm.weight") or k.endswith("layernorm.weight")}
    assert changed == gains  # every DyT gain moved; its alpha and shift did not


def test_cli_heal_norm_params_needs_heal_norms(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        convert_cli("--hf-path", FIXTURES / "llama_llama3", "--norm", "dyt", "--heal-steps",
                    "2", "--heal", "lora", "--heal-norm-params", "weight",
                    "--out", tmp_path / "out")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--heal-norm-params applies to --heal norms only" in err
    assert not (tmp_path / "out").exists()


def test_cli_sample_text_too_short_exits_1(tmp_path, capsys):
    (tmp_path / "short.txt").write_text("w1 w2 w3")
    assert convert_cli("--hf-path", FIXTURES / "gpt2", "--out", tmp_path / "out", "--norm",
                       "dyt", "--calib-data", tmp_path / "short.txt") == 1
    assert "is too short" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_quantizes_the_layers_that_fit_the_group(tmp_path, capsys):
    import mlx_lm

    out = tmp_path / "out"
    assert convert_cli("--hf-path", FIXTURES / "qwen3", "--out", out, "--quantize", "4",
                       "--group-size", "32") == 0
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["bits"] == 4 and config["quantization"]["group_size"] == 32
    model, _ = mlx_lm.load(str(out), trust_remote_code=True)
    mlp = model.layers[0].mlp
    # down_proj's input width 32 fits a group of 32; the hidden width 16 does not.
    assert type(mlp.down_proj).__name__ == "QuantizedLinear"
    assert type(mlp.up_proj).__name__ == "Linear"


@pytest.mark.parametrize("flag, value, message", [
    ("--norm", "nope", "argument --norm: invalid choice: 'nope'"),
    ("--quantize", "7", "argument --quantize: invalid choice: 7"),
    ("--placement", "ngpt", "argument --placement: invalid choice: 'ngpt'"),
])
def test_cli_bad_flags_exit_2_in_one_line(flag, value, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as raised:
        convert_cli("--hf-path", FIXTURES / "gpt2", "--out", tmp_path / "out", flag, value)
    err = capsys.readouterr().err
    assert raised.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_cli_bad_source_exits_1_in_one_line_and_writes_nothing(tmp_path, capsys):
    directory = editable_copy(tmp_path)
    edit_tensors(directory, lambda t: t.pop("model.norm.weight"))
    assert convert_cli("--hf-path", directory, "--out", tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert "missing tensor(s) model.norm.weight" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == [directory.name]


def test_cli_refuses_a_foreign_output_directory(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    assert convert_cli("--hf-path", FIXTURES / "gpt2", "--out", tmp_path / "out") == 1
    assert "is not empty and not a model saved by save_model" in capsys.readouterr().err
    assert [p.name for p in tmp_path.rglob("*")] == ["out", "notes.txt"]


# ---- mlx-localnorm bench convert ----------------------------------------------------------------

def test_bench_convert_exactness_rows():
    from mlx_localnorm.bench.convert import exactness_rows

    rows = exactness_rows(FIXTURES)
    ours = {r["case"]: float(r["max_abs_logit_diff"]) for r in rows if r["loader"] == "from_hf"}
    assert set(ours) == set(CASES) and max(ours.values()) < LOGIT_ATOL
    theirs = {r["case"]: r for r in rows if r["loader"] == "mlx_lm.load_model"}
    assert set(theirs) == set(CASES) and theirs["gpt2"]["note"].startswith("fails: ")


def test_bench_convert_streaming_rows_in_its_csv(tmp_path, capsys):
    import csv

    from mlx_localnorm.cli import main

    assert main(["bench", "convert", "--out", str(tmp_path), "--size", "tiny",
                 "--shard-mb", "0.05", "--sections", "streaming"]) == 0
    rows = list(csv.DictReader((tmp_path / "convert.csv").open()))
    assert [(r["section"], r["loader"]) for r in rows] == [
        ("streaming", "from_hf"), ("streaming", "mlx_lm.load_model")]
    for row in rows:  # several shards; the model is what stays in memory
        model, shard = float(row["model_mb"]), float(row["largest_shard_mb"])
        assert 0 < shard < model / 2
        assert model <= float(row["mlx_peak_mb"]) < model + 2 * shard
