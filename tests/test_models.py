"""The LocalNorm transformer: KV cache, golden training losses, mlx-lm interop, norm swapping.

The block equations themselves are checked in test_placements.py.
"""

import math
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import mlx_lm
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models import llama, qwen2, qwen3
from mlx_lm.models.cache import KVCache, RotatingKVCache
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.tuner.lora import LoRALinear
from mlx_lm.tuner.utils import linear_to_lora_layers
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import mlx_localnorm  # noqa: F401  (must load before mlx.core)
from mlx_localnorm.models import Model, ModelArgs, save_model, swap_norms
from mlx_localnorm.placements import PLACEMENTS

GOLDEN_DIR = Path(__file__).parent / "fixtures" / "losses"
VOCAB = 32
TINY = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=64)


def tiny_model(seed=0, **overrides) -> Model:
    mx.random.seed(seed)
    return Model(ModelArgs(**{**TINY, **overrides}))


def tiny_tokenizer() -> TokenizerWrapper:
    """A word-level tokenizer over "<unk> <eos> w0 .. w29", built offline."""
    vocab = {w: i for i, w in enumerate(["<unk>", "<eos>"] + [f"w{i}" for i in range(VOCAB - 2)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")
    return TokenizerWrapper(hf)


# ---- KV cache -------------------------------------------------------------------------------

def incremental_logits(model, tokens, prefill):
    """Logits from a prefill of `prefill` tokens, then one token at a time through the cache."""
    cache = model.make_cache()
    steps = [model(tokens[:, :prefill], cache=cache)]
    for t in range(prefill, tokens.shape[1]):
        steps.append(model(tokens[:, t:t + 1], cache=cache))
    return mx.concatenate(steps, axis=1)


def max_rel_error(got, want):
    got, want = (np.array(a.astype(mx.float32), dtype=np.float64) for a in (got, want))
    return np.abs(got - want).max() / np.abs(want).max()


TOKENS = mx.array(np.random.default_rng(1).integers(0, VOCAB, size=(3, 11)))


@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_kv_cache_matches_full_forward_float32(placement):
    model = tiny_model(placement=placement)
    got = incremental_logits(model, TOKENS, prefill=4)
    # Same float32 math in another order (cached keys, one query row at a time).
    assert max_rel_error(got, model(TOKENS)) < 1e-5


@pytest.mark.parametrize("options", [
    dict(layer_types=["sliding_attention", "full_attention"], sliding_window=4),
    dict(num_experts=4, num_experts_per_tok=2, attention_gate=True, qk_norm="rmsnorm"),
    dict(norm_type="seednorm", norm_options={"num_heads": 4, "beta_init_std": 0.1}),
])
def test_kv_cache_with_model_options(options):
    model = tiny_model(placement="peri", **options)
    for prefill in (1, 3, 6):  # the rotating cache wraps for the sliding window of 4
        assert max_rel_error(incremental_logits(model, TOKENS, prefill), model(TOKENS)) < 1e-5


def test_make_cache_rotates_only_for_sliding_layers():
    model = tiny_model(layer_types=["sliding_attention", "full_attention"], sliding_window=4)
    sliding, full = model.make_cache()
    assert isinstance(sliding, RotatingKVCache) and sliding.max_size == 4
    assert type(full) is KVCache


@pytest.mark.parametrize("placement", ["pre", "peri", "ngpt"])
def test_kv_cache_matches_full_forward_bfloat16(placement):
    model = tiny_model(placement=placement)
    model.set_dtype(mx.bfloat16)
    got, want = incremental_logits(model, TOKENS, prefill=4), model(TOKENS)
    assert got.dtype == want.dtype == mx.bfloat16
    # bfloat16 keeps 8 bits of mantissa (eps 2^-8 = 0.0039); two layers of rounding in a
    # different order stay within a few eps of the largest logit.
    assert max_rel_error(got, want) < 4 * 2**-8


# ---- training: golden losses ----------------------------------------------------------------

def synthetic_batches(steps, batch=16, length=16, seed=0):
    """Sequences following a fixed random permutation of the vocabulary: x[t+1] = perm[x[t]]."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(VOCAB)
    for _ in range(steps):
        seq = np.empty((batch, length + 1), dtype=np.int32)
        seq[:, 0] = rng.integers(0, VOCAB, batch)
        for t in range(length):
            seq[:, t + 1] = perm[seq[:, t]]
        yield mx.array(seq)


# Adam at 1e-2 is chaotic here: float32 sums reordered by another BLAS kernel grew to 1-100%
# loss differences by step 20. At 1e-3 they stay below 5e-6 over 30 steps (measured below).
GOLDEN_LR = 1e-3


def train_tiny(placement, norm=None, steps=30, after_step=None) -> list[float]:
    """Train a 4-layer float32 model with Adam (lr GOLDEN_LR); return the loss of every step."""
    model = tiny_model(placement=placement, norm_type=norm, num_hidden_layers=4)
    optimizer = optim.Adam(learning_rate=GOLDEN_LR)

    def loss_fn(model, seq):
        return nn.losses.cross_entropy(model(seq[:, :-1]), seq[:, 1:], reduction="mean")

    loss_and_grad = nn.value_and_grad(model, loss_fn)
    losses = []
    for seq in synthetic_batches(steps):
        loss, grads = loss_and_grad(model, seq)
        optimizer.update(model, grads)
        model.project_weights()
        mx.eval(model.parameters(), optimizer.state, loss)
        losses.append(loss.item())
        if after_step is not None:
            after_step(model)
    return losses


# (placement, norm): norm None is the placement's default (RMSNorm, or nGPT/anGPT's own).
GOLDEN_CASES = [(p, None) for p in PLACEMENTS] + [
    ("pre", "seednorm"), ("pre", "layernorm"), ("pre", "dyt"), ("peri", "seednorm")]


def golden_path(placement, norm):
    return GOLDEN_DIR / (f"{placement}.txt" if norm is None else f"{placement}-{norm}.txt")


# SPEC nGPT: the D axis of each weight (embeddings/head by row, q/k/v/gate/up over `in`,
# o/down over `out`), i.e. the axis to reduce over for the unit norm.
def residual_norms(model):
    norms = []
    for path, w in tree_flatten(model.parameters()):
        name = path.split(".")[-2] if path.endswith(".weight") else ""
        if name in ("embed_tokens", "lm_head", "q_proj", "k_proj", "v_proj", "gate_proj",
                    "up_proj"):
            norms.append(np.linalg.norm(np.array(w, dtype=np.float64), axis=1))
        elif name in ("o_proj", "down_proj"):
            norms.append(np.linalg.norm(np.array(w, dtype=np.float64), axis=0))
    assert len(norms) == 1 + 7 * 4  # tied embedding + 7 matrices in each of 4 blocks
    return np.concatenate(norms)


def check_unit_norm(model):
    np.testing.assert_allclose(residual_norms(model), 1.0, atol=1e-5)


def check_inside_unit_ball(model):
    assert residual_norms(model).max() <= 1 + 1e-5


@pytest.mark.parametrize("placement,norm", GOLDEN_CASES)
def test_training_matches_golden_losses(placement, norm):
    after_step = {"ngpt": check_unit_norm, "angpt": check_inside_unit_ball}.get(placement)
    losses = np.array(train_tiny(placement, norm, after_step=after_step))
    path = golden_path(placement, norm)
    assert path.exists(), f"missing {path}: run `python tests/fixtures/losses/make_golden.py`"
    golden = np.loadtxt(path)
    assert golden.shape == losses.shape == (30,)
    # Another CPU or BLAS reorders float32 sums. Across OpenBLAS's Zen, Haswell and Sandybridge
    # kernels and MLX's reference BLAS (MLX_LOCALNORM_FAST_BLAS=0) every case stayed within
    # 5e-6 absolute: the tolerance is 14x that. Scaling LN-Scaling's 1/sqrt(l) by 0.999 moves
    # the losses by 9e-4 relative; real mistakes move them by far more.
    np.testing.assert_allclose(losses, golden, rtol=1e-4, atol=1e-5)
    assert losses[-5:].mean() < 0.85 * losses[0], "the loss did not decrease"


def expert_grads(grads, layer):
    mlp = grads["model"]["layers"][layer]["mlp"]
    return np.array(mlp["gate"]["weight"]), np.array(mlp["switch_mlp"]["up_proj"]["weight"])


def test_moe_load_balance_loss_reaches_the_router_only():
    model = tiny_model(num_experts=4, num_experts_per_tok=2, router_aux_loss_coef=1.0)

    def loss_fn(model, seq):
        model(seq)
        return model.aux_loss()

    loss, grads = nn.value_and_grad(model, loss_fn)(model, next(synthetic_batches(1)))
    # a * E * sum_e f_e P_e: f_e counts routing decisions (no gradient), P_e is the router's.
    router, experts = expert_grads(grads, layer=-1)
    assert loss.item() > 0 and np.abs(router).max() > 0 and not experts.any()


def test_moe_only_routed_experts_get_gradient():
    model = tiny_model(num_experts=4, num_experts_per_tok=1)

    def loss_fn(model, tokens):
        return model(tokens)[0, 0, 0]

    tokens = mx.array([[7]])  # one token: one expert per layer
    _, grads = nn.value_and_grad(model, loss_fn)(model, tokens)
    for layer in range(2):
        per_expert = np.abs(expert_grads(grads, layer)[1]).sum(axis=(1, 2))
        assert (per_expert > 0).sum() == 1


# ---- mlx-lm interop -------------------------------------------------------------------------

def greedy_tokens(model, prompt, n):
    """Greedy continuation by full forward passes (no cache)."""
    tokens = list(prompt)
    for _ in range(n):
        tokens.append(int(mx.argmax(model(mx.array([tokens]))[0, -1]).item()))
    return tokens[len(prompt):]


@pytest.mark.parametrize("placement", ["peri", "ngpt"])
def test_mlx_lm_generate_uses_the_cache_correctly(placement):
    model, tokenizer = tiny_model(placement=placement, norm_type=None), tiny_tokenizer()
    prompt = tokenizer.encode("w1 w2 w3")
    got = [r.token for r in mlx_lm.stream_generate(model, tokenizer, prompt, max_tokens=8)]
    want = greedy_tokens(model, prompt, 8)
    eos = tokenizer.eos_token_id
    want = want[: want.index(eos) + 1] if eos in want else want
    assert got == want
    text = mlx_lm.generate(model, tokenizer, prompt="w1 w2 w3", max_tokens=8)
    assert text == tokenizer.decode([t for t in want if t != eos])


def test_save_model_loads_with_mlx_lm(tmp_path):
    model = tiny_model(placement="sandwich", norm_type="seednorm", qk_norm="rmsnorm",
                       norm_options={"beta_init_std": 0.1}, tie_word_embeddings=False)
    path = save_model(model, tiny_tokenizer(), tmp_path / "m")
    assert (path / "config.json").exists() and (path / "tokenizer.json").exists()
    with pytest.raises(ValueError, match="trust_remote_code"):
        mlx_lm.load(str(path))
    loaded, tokenizer = mlx_lm.load(str(path), trust_remote_code=True)
    assert isinstance(loaded, Model) and loaded.args == model.args
    np.testing.assert_array_equal(np.array(loaded(TOKENS)), np.array(model(TOKENS)))
    assert tokenizer.encode("w3 w4") == [5, 6]
    save_model(model, tokenizer, path)  # replaces the directory in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_save_model_rejects_other_models(tmp_path):
    with pytest.raises(TypeError, match="mlx_localnorm Model"):
        save_model(nn.Linear(2, 2), tiny_tokenizer(), tmp_path / "m")
    with pytest.raises(TypeError, match="save_pretrained"):
        save_model(tiny_model(), object(), tmp_path / "m")


def test_lora_conversion():
    model = tiny_model(placement="peri", attention_gate=True)
    before = model(TOKENS)
    model.freeze()
    linear_to_lora_layers(model, 2, {"rank": 4, "scale": 10.0, "dropout": 0.0})
    lora = [m for _, m in model.named_modules() if isinstance(m, LoRALinear)]
    assert len(lora) == 2 * 8  # q, k, v, o, gate (g_proj), and 3 MLP projections per block
    np.testing.assert_array_equal(np.array(model(TOKENS)), np.array(before))  # lora_b = 0
    trainable = {k.rsplit(".", 1)[-1] for k, _ in tree_flatten(model.trainable_parameters())}
    assert trainable == {"lora_a", "lora_b"}


def test_quantization():
    model = tiny_model(placement="pre", norm_type="seednorm", hidden_size=64, intermediate_size=128)
    before = model(TOKENS)
    nn.quantize(model, group_size=32, bits=8)
    assert isinstance(model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    # 8-bit weights: about 1/255 of each group's range; logits keep a percent-level error.
    assert max_rel_error(model(TOKENS), before) < 0.05
    assert max_rel_error(incremental_logits(model, TOKENS, 4), model(TOKENS)) < 1e-5


@pytest.mark.parametrize("tie", [True, False])
def test_pre_rmsnorm_model_is_mlx_lm_llama(tie):
    """Same names, same math: Llama's weights load into our Pre-LN RMSNorm model unchanged."""
    mx.random.seed(0)
    reference = llama.Model(llama.ModelArgs(
        model_type="llama", hidden_size=32, num_hidden_layers=2, intermediate_size=64,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, vocab_size=VOCAB,
        tie_word_embeddings=tie))
    ours = tiny_model(tie_word_embeddings=tie)
    ours.load_weights(tree_flatten(reference.parameters()), strict=True)
    np.testing.assert_array_equal(np.array(ours(TOKENS)), np.array(reference(TOKENS)))


# ---- swap_norms on mlx-lm models ------------------------------------------------------------

def mlx_lm_model(kind):
    mx.random.seed(0)
    common = dict(hidden_size=32, num_hidden_layers=2, intermediate_size=64,
                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                  vocab_size=VOCAB)
    if kind in ("llama", "mistral"):
        model = llama.Model(llama.ModelArgs(model_type=kind, **common))
    elif kind == "qwen2":
        model = qwen2.Model(qwen2.ModelArgs(model_type=kind, **common))
    else:
        model = qwen3.Model(qwen3.ModelArgs(model_type=kind, head_dim=8,
                                            max_position_embeddings=64, rope_theta=1e4,
                                            tie_word_embeddings=True, **common))
    # Trained-looking gains, so copying them is tested.
    rng = np.random.default_rng(0)
    gains = [(k, mx.array(1 + 0.3 * rng.normal(size=v.shape).astype(np.float32)))
             for k, v in tree_flatten(model.parameters()) if "norm" in k]
    model.load_weights(gains, strict=False)
    return model


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3"])
def test_swap_to_seednorm_keeps_the_output(kind):
    model = mlx_lm_model(kind)
    before = model(TOKENS)
    swap_norms(model, norm="seednorm", placement="pre")
    norms = [type(m).__name__ for _, m in model.named_modules() if "norm" in type(m).__name__.lower()]
    assert norms and set(norms) == {"SeeDNorm"}
    assert max_rel_error(model(TOKENS), before) < 1e-6


@pytest.mark.parametrize("placement", ["post", "mix", "peri", "sandwich", "lnscaling"])
def test_swap_to_other_placements(placement):
    model = mlx_lm_model("llama")
    swap_norms(model, norm="dyt", placement=placement, mix_ratio=0.5)
    expected = {"post": "PostLN", "mix": "PostLN", "peri": "PeriLN", "sandwich": "PeriLN",
                "lnscaling": "PreLN"}[placement]
    assert type(model.layers[0]).__name__ == expected
    assert max_rel_error(incremental_logits(model, TOKENS, 4), model(TOKENS)) < 1e-5


def test_swap_norms_errors():
    with pytest.raises(ValueError, match="placement 'ngpt' changes attention"):
        swap_norms(mlx_lm_model("llama"), norm="rmsnorm", placement="ngpt")
    with pytest.raises(ValueError, match="valid placements"):
        swap_norms(mlx_lm_model("llama"), norm="rmsnorm", placement="middle")
    with pytest.raises(ValueError, match="valid names: angpt, dyt, l2norm"):
        swap_norms(mlx_lm_model("llama"), norm="batchnorm")
    with pytest.raises(TypeError, match="mlx-lm model of type"):
        swap_norms(tiny_model())


# ---- bad input ------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides,error,message", [
    (dict(placement="prenorm"), ValueError, "valid placements: post, pre, mix, peri, sandwich"),
    (dict(norm_type="batchnorm"), ValueError, "valid names: angpt, dyt, l2norm, layernorm"),
    (dict(hidden_size=30), ValueError, "num_attention_heads=4 must divide hidden_size=30"),
    (dict(num_key_value_heads=3), ValueError, "num_key_value_heads=3 must divide"),
    (dict(placement="ngpt", norm_type="seednorm"), ValueError, "norm_type must be 'l2norm'"),
    (dict(placement="peri", norm_type="angpt"), ValueError, "only works in placement 'angpt'"),
    (dict(norm_type="patchnorm", norm_options={"patch_size": 3}), ValueError, "patch_size=1"),
    (dict(norm_options={"num_heads": 2}), TypeError, "unknown option"),
    (dict(qk_norm="nope"), ValueError, "unknown norm 'nope'"),
    (dict(layer_types=["sliding_attention", "full_attention"]), ValueError, "sliding_window"),
    (dict(layer_types=["full_attention"]), ValueError, "layer_types must be 2 entries"),
    (dict(num_experts=2, num_experts_per_tok=3), ValueError, "num_experts_per_tok"),
    (dict(placement="ngpt", num_experts=2), ValueError, "unset num_experts"),
    (dict(mix_ratio=1.5), ValueError, "mix_ratio must be in"),
    (dict(num_hidden_layers=0), ValueError, "num_hidden_layers must be a positive int"),
])
def test_bad_model_args(overrides, error, message):
    with pytest.raises(error, match=message):
        ModelArgs(**{**TINY, **overrides})


def test_bad_inputs():
    model = tiny_model()
    with pytest.raises(TypeError, match="integer token ids"):
        model(mx.zeros((1, 3)))
    with pytest.raises(TypeError, match="integer token ids"):
        model([[1, 2]])
    with pytest.raises(ValueError, match=r"shape \(batch, length\)"):
        model(mx.array([1, 2, 3]))


def test_head_dim_may_differ_from_hidden_over_heads():
    model = tiny_model(hidden_size=30, head_dim=8, num_attention_heads=4)
    assert model(TOKENS).shape == (3, 11, VOCAB)
    assert math.isclose(model.layers[0].self_attn.scale, 8**-0.5)
