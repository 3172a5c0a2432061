"""Hybrid models: the chunked gated delta rule, Gated DeltaNet blocks, caches, mlx-lm interop.

References: a float64 NumPy recurrence written here from SPEC.md (arXiv 2412.06464) and
mlx-lm's step-by-step ``gated_delta_ops`` (values, and gradients by autodiff through it).
"""

import csv

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import mlx_lm
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.generate import batch_generate
from mlx_lm.models import qwen3_next
from mlx_lm.models.cache import ArraysCache, BatchKVCache, KVCache, RotatingKVCache
from mlx_lm.models.gated_delta import gated_delta_ops
from mlx_lm.tuner.lora import LoRALinear
from mlx_lm.tuner.utils import linear_to_lora_layers

import mlx_localnorm as ln
from mlx_localnorm.models import Model, ModelArgs, save_model
from mlx_localnorm.models.gated_delta import chunk_gated_delta, unit_lower_inverse
from mlx_localnorm.models.qwen3_next import from_qwen3_next
from mlx_localnorm.train import PretrainConfig, Pretrainer, read_metrics

from test_models import tiny_tokenizer

# float32: the chunked form sums in another order than the recurrence (measured ~1e-6).
F32_TOL = 1e-4
# bfloat16 inputs, float32 inside, bfloat16 output: one rounding of y (2^-9 relative) plus
# the rounding of its largest entries; 2^-7 of the largest |y| leaves margin for both.
BF16_TOL = 2**-7


def rel_error(got, want) -> float:
    got, want = (np.asarray(np.array(x.astype(mx.float32)) if isinstance(x, mx.array) else x,
                            dtype=np.float64) for x in (got, want))
    return float(np.abs(got - want).max() / np.abs(want).max())


# ---- the gated delta rule -------------------------------------------------------------------

def numpy_gated_delta(q, k, v, g, beta, state, mask):
    """S_t = S_{t-1} D_t (I - b k k^T) + b v k^T, y_t = S_t q_t (SPEC); a masked step outputs
    its y_t and then keeps S_{t-1}. Value head h reads key head h // (Hv / Hk)."""
    q, k, v, g, beta, S = (np.array(x, dtype=np.float64) for x in (q, k, v, g, beta, state))
    B, T, Hk, _ = q.shape
    Hv, Dv = v.shape[2:]
    y = np.zeros((B, T, Hv, Dv))
    for b in range(B):
        for h in range(Hv):
            for t in range(T):
                kt, qt = k[b, t, h * Hk // Hv], q[b, t, h * Hk // Hv]
                new = S[b, h] * g[b, t, h]  # scalar, or one decay per key column
                new = new + beta[b, t, h] * np.outer(v[b, t, h] - new @ kt, kt)
                y[b, t, h] = new @ qt
                if mask is None or mask[b, t]:
                    S[b, h] = new
    return y, S


def random_inputs(seed, gate="scalar", heads=(2, 4), T=37, B=2, Dk=8, Dv=6, decay=2.0):
    """Unit q/k (the block normalizes them), log decays in [-decay, 0], beta in (0, 1)."""
    rng = np.random.default_rng(seed)
    Hk, Hv = heads

    def unit(shape):
        x = rng.normal(size=shape)
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    log_g = -rng.uniform(0, decay, (B, T, Hv, Dk) if gate == "vector" else (B, T, Hv))
    arrays = (unit((B, T, Hk, Dk)), unit((B, T, Hk, Dk)), rng.normal(size=(B, T, Hv, Dv)),
              log_g, rng.uniform(0.05, 0.95, (B, T, Hv)), rng.normal(size=(B, Hv, Dv, Dk)))
    mask = rng.uniform(size=(B, T)) > 0.3
    mask[0, :5] = False  # a left-padded row
    return [mx.array(a.astype(np.float32)) for a in arrays], mx.array(mask)


@pytest.mark.parametrize("C", [1, 2, 16, 64])
def test_unit_lower_inverse(C):
    a = mx.random.normal((3, C, C), key=mx.random.key(C))  # diagonal and upper part unread
    want = np.linalg.inv(np.eye(C) + np.tril(np.array(a, dtype=np.float64), k=-1))
    assert rel_error(unit_lower_inverse(a), want) < 1e-5


@pytest.mark.parametrize("gate", ["scalar", "vector"])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("heads", [(4, 4), (2, 4)])
@pytest.mark.parametrize("chunk", [1, 4, 16, 64])  # T = 37: partial last chunk; 64 > T
def test_chunked_values_match_both_recurrences(gate, masked, heads, chunk):
    (q, k, v, log_g, beta, state), mask = random_inputs(chunk, gate, heads)
    mask = mask if masked else None
    y, S = chunk_gated_delta(q, k, v, log_g, beta, state, mask, chunk_size=chunk)
    assert y.dtype == mx.float32 and S.dtype == mx.float32
    want_y, want_S = numpy_gated_delta(q, k, v, np.exp(np.array(log_g, np.float64)), beta,
                                       state, None if mask is None else np.array(mask))
    assert rel_error(y, want_y) < F32_TOL and rel_error(S, want_S) < F32_TOL
    ops_y, ops_S = gated_delta_ops(q, k, v, mx.exp(log_g), beta, state, mask)
    assert rel_error(y, ops_y) < F32_TOL and rel_error(S, ops_S) < F32_TOL


def _gradients(fn, inputs):
    """Gradients of a fixed random projection of (y, S) w.r.t. every input."""
    def loss(*args):
        y, S = fn(*args)
        wy = mx.sin(mx.arange(y.size, dtype=mx.float32)).reshape(y.shape)
        return (y * wy).sum() + (S * mx.cos(mx.arange(S.size, dtype=mx.float32)
                                            ).reshape(S.shape)).sum()
    return mx.grad(loss, argnums=tuple(range(len(inputs))))(*inputs)


@pytest.mark.parametrize("gate", ["scalar", "vector"])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("heads", [(4, 4), (2, 4)])
def test_chunked_gradients_match_autodiff_through_gated_delta_ops(gate, masked, heads):
    inputs, mask = random_inputs(3, gate, heads, T=21)
    mask = mask if masked else None
    got = _gradients(lambda q, k, v, lg, b, s: chunk_gated_delta(q, k, v, lg, b, s, mask, 8),
                     inputs)
    want = _gradients(lambda q, k, v, lg, b, s: gated_delta_ops(q, k, v, mx.exp(lg), b, s,
                                                                 mask), inputs)
    for name, g, w in zip(("q", "k", "v", "log_g", "beta", "state"), got, want):
        assert rel_error(g, w) < F32_TOL, name


@pytest.mark.parametrize("gate", ["scalar", "vector"])
def test_strong_decays_stay_finite_and_exact(gate):
    """Decays down to e^-60 per step: in-chunk ratios must not overflow (log-space masks)."""
    (q, k, v, log_g, beta, state), _ = random_inputs(5, gate, T=40, decay=60.0)
    y, S = chunk_gated_delta(q, k, v, log_g, beta, state, chunk_size=32)
    want_y, want_S = numpy_gated_delta(q, k, v, np.exp(np.array(log_g, np.float64)), beta,
                                       state, None)
    assert rel_error(y, want_y) < F32_TOL and rel_error(S, want_S) < F32_TOL
    grads = _gradients(lambda *a: chunk_gated_delta(*a, chunk_size=32),
                       [q, k, v, log_g, beta, state])
    assert all(bool(mx.isfinite(g).all()) for g in grads)


def test_bfloat16_inputs():
    inputs, mask = random_inputs(7, "scalar")
    q, k, v, log_g, beta, state = (x.astype(mx.bfloat16) for x in inputs)
    y, S = chunk_gated_delta(q, k, v, log_g, beta, state, mask, chunk_size=16)
    assert y.dtype == mx.bfloat16 and S.dtype == mx.float32
    # Reference on the same bf16-rounded inputs, in float64.
    want_y, want_S = numpy_gated_delta(
        *(np.array(x.astype(mx.float32)) for x in (q, k, v)),
        np.exp(np.array(log_g.astype(mx.float32), np.float64)),
        *(np.array(x.astype(mx.float32)) for x in (beta, state)), np.array(mask))
    assert rel_error(y, want_y) < BF16_TOL and rel_error(S, want_S) < F32_TOL
    ops_y, _ = gated_delta_ops(q, k, v, mx.exp(log_g.astype(mx.float32)), beta, state, mask)
    assert rel_error(y, ops_y) < BF16_TOL


@pytest.mark.parametrize("change, message", [
    (dict(chunk_size=12), "chunk_size must be a power of two, got 12"),
    (dict(chunk_size=0), "chunk_size must be a power of two, got 0"),
    (dict(beta=mx.zeros((2, 37, 3))), r"beta must be \(2, 37, 4\)"),
    (dict(state=mx.zeros((2, 4, 8, 6))), r"state must be \(2, 4, 6, 8\)"),
    (dict(mask=mx.ones((2, 36), dtype=mx.bool_)), r"mask must be \(2, 37\)"),
    (dict(k=mx.zeros((2, 37, 3, 8))), "q and k must be"),
])
def test_chunked_rejects_bad_arguments(change, message):
    (q, k, v, log_g, beta, state), _ = random_inputs(0)
    call = dict(q=q, k=k, v=v, log_g=log_g, beta=beta, state=state, mask=None, chunk_size=16)
    with pytest.raises(ValueError, match=message):
        chunk_gated_delta(**{**call, **change})


# ---- the hybrid model ------------------------------------------------------------------------

VOCAB = 32
HYBRID = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, intermediate_size=64, linear_num_key_heads=2,
              linear_key_head_dim=8, linear_value_head_dim=6, linear_chunk_size=4,
              layer_types=["linear_attention", "linear_attention", "sliding_attention",
                           "full_attention"], sliding_window=6)
TOKENS = mx.array(np.random.default_rng(1).integers(0, VOCAB, size=(3, 19)))


def hybrid(seed=0, **overrides) -> Model:
    mx.random.seed(seed)
    model = Model(ModelArgs(**{**HYBRID, **overrides}))
    # Varied decays and norm gains, so a dropped decay, gate or gain shows in the logits.
    for layer in model.layers:
        attn = layer.self_attn
        if "A_log" in attn:
            attn.A_log = mx.log(mx.random.uniform(0.2, 3.0, attn.A_log.shape))
            attn.norm.weight = mx.random.uniform(0.5, 1.5, attn.norm.weight.shape)
    return model


def greedy(model, prompt, n):
    """n greedy tokens by full forward passes (no cache)."""
    tokens = list(prompt)
    for _ in range(n):
        tokens.append(int(mx.argmax(model(mx.array([tokens]))[0, -1])))
    return tokens[len(prompt):]


def pieces_logits(model, tokens, sizes):
    cache = model.make_cache()
    out, start = [], 0
    for size in sizes:
        out.append(model(tokens[:, start:start + size], cache=cache))
        start += size
    return mx.concatenate(out, axis=1), cache


def test_make_cache_gives_each_layer_type_its_cache():
    caches = hybrid().make_cache()
    assert [type(c) for c in caches] == [ArraysCache, ArraysCache, RotatingKVCache, KVCache]
    assert len(caches[0].cache) == 2 and caches[2].max_size == 6


@pytest.mark.parametrize("training", [True, False])  # eval decodes with gated_delta_update
@pytest.mark.parametrize("placement", ["pre", "peri"])
def test_token_by_token_generation_equals_the_full_forward(training, placement):
    model = hybrid(placement=placement, norm_type="seednorm")
    model.train(training)
    want = model(TOKENS)
    for prefill in (1, 6):
        got, _ = pieces_logits(model, TOKENS, [prefill] + [1] * (TOKENS.shape[1] - prefill))
        assert rel_error(got, want) < 1e-5


@pytest.mark.parametrize("conv", [1, 2])  # width 1 keeps no past conv inputs
def test_generation_with_short_convolutions(conv):
    model = hybrid(linear_conv_kernel_dim=conv)
    got, _ = pieces_logits(model, TOKENS, [3] + [1] * 16)
    assert rel_error(got, model(TOKENS)) < 1e-5


def test_mlx_lm_batch_generation_with_prompts_of_different_lengths():
    """mlx-lm pads the prompts on the right and passes their lengths to ArraysCache."""
    model, tokenizer = hybrid(), tiny_tokenizer()
    prompts = [[3, 4, 5, 6, 7, 8, 9, 10, 11], [5, 6, 7], [12, 13, 14, 15, 16]]
    got = batch_generate(model, tokenizer, prompts, max_tokens=6, return_token_ids=True)
    for prompt, tokens in zip(prompts, got.token_ids):
        assert tokens == greedy(model, prompt, len(tokens))


def test_left_padded_batch_equals_each_prompt_alone():
    """Padding masks: pad tokens neither enter the conv nor change the recurrent state."""
    model = hybrid(layer_types=["linear_attention", "full_attention"] * 2)
    prompts = [[3, 4, 5, 6, 7, 8, 9, 10], [5, 6, 7], [12, 13, 14, 15, 16]]
    pads = [8 - len(p) for p in prompts]
    batch = mx.array([[1] * pad + p for pad, p in zip(pads, prompts)])
    cache = [ArraysCache(2, left_padding=pads) if kind == "linear_attention"
             else BatchKVCache(left_padding=pads) for kind in model.args.layer_types]
    got = mx.concatenate([model(batch[:, :5], cache=cache), model(batch[:, 5:], cache=cache)], 1)
    for row, (pad, prompt) in enumerate(zip(pads, prompts)):
        assert rel_error(got[row, pad:], model(mx.array([prompt]))[0]) < 1e-5


def test_a_prompt_in_pieces_equals_one_piece():
    model = hybrid()
    one, one_cache = pieces_logits(model, TOKENS, [19])
    got, cache = pieces_logits(model, TOKENS, [7, 5, 7])  # pieces across chunk boundaries
    assert rel_error(got, one) < 1e-5
    for c, w in zip(cache[:2], one_cache[:2]):
        assert rel_error(c[0], w[0]) < 1e-6 and rel_error(c[1], w[1]) < 1e-5


def test_the_model_is_causal():
    model = hybrid()
    changed = mx.concatenate([TOKENS[:, :10], (TOKENS[:, 10:] + 1) % VOCAB], axis=1)
    a, b = model(TOKENS), model(changed)
    assert mx.array_equal(a[:, :10], b[:, :10]) and not mx.allclose(a[:, 10:], b[:, 10:])


def test_every_linear_block_parameter_gets_gradient():
    model = hybrid()

    def loss_fn(model):
        return nn.losses.cross_entropy(model(TOKENS[:, :-1]), TOKENS[:, 1:], reduction="mean")

    grads = dict(tree_flatten(nn.value_and_grad(model, loss_fn)(model)[1]))
    names = [n for n in grads if n.startswith("model.layers.0.self_attn.")]
    assert {n.split(".")[4] for n in names} == {"in_proj_qkvz", "in_proj_ba", "conv1d", "A_log",
                                                "dt_bias", "norm", "out_proj"}
    for name in names:
        assert float(mx.abs(grads[name]).max()) > 0, name


@pytest.mark.parametrize("placement", ["post", "mix", "sandwich", "lnscaling"])
def test_other_placements_run_and_cache(placement):
    model = hybrid(placement=placement, norm_type="layernorm")
    got, _ = pieces_logits(model, TOKENS, [5] + [1] * 14)
    assert rel_error(got, model(TOKENS)) < 1e-5


@pytest.mark.parametrize("overrides, message", [
    (dict(placement="ngpt", norm_type=None), "linear_attention works with placements"),
    (dict(placement="angpt", norm_type=None), "linear_attention works with placements"),
    (dict(linear_num_key_heads=3), "linear_num_key_heads=3 must divide linear_num_value_heads"),
    (dict(linear_conv_kernel_dim=0), "linear_conv_kernel_dim must be a positive int, got 0"),
    (dict(linear_chunk_size=48), "linear_chunk_size must be a power of two, got 48"),
    (dict(linear_key_head_dim=0), "linear_key_head_dim must be a positive int"),
    (dict(layer_types=["linear_attention", "linear", "full_attention", "full_attention"]),
     "layer_types must be 4 entries of"),
    (dict(position_embedding="learned", max_position_embeddings=64),
     "position_embedding='rope'"),
    (dict(norm_type="seednorm", norm_options={"num_heads": 4}), "num_heads"),  # 4 !| 6
])
def test_bad_linear_attention_args(overrides, message):
    with pytest.raises(ValueError, match=message):
        ModelArgs(**{**HYBRID, **overrides})


def test_shard_refuses_linear_blocks():
    with pytest.raises(ValueError, match="linear_attention blocks cannot be sharded"):
        hybrid().shard()


# ---- mlx-lm interop --------------------------------------------------------------------------

def test_save_load_and_generate_with_mlx_lm(tmp_path):
    model, tokenizer = hybrid(norm_type="seednorm", placement="peri"), tiny_tokenizer()
    path = save_model(model, tokenizer, tmp_path / "hybrid")
    loaded, tokenizer = mlx_lm.load(str(path), trust_remote_code=True)
    assert loaded.args == model.args
    np.testing.assert_array_equal(np.array(loaded(TOKENS)), np.array(model(TOKENS)))
    prompt = tokenizer.encode("w1 w2 w3 w4 w5 w6")
    got = [r.token for r in mlx_lm.stream_generate(loaded, tokenizer, prompt, max_tokens=10)]
    assert got == greedy(model, prompt, len(got))


def test_lora_on_a_hybrid_model():
    model = hybrid()
    before = model(TOKENS)
    model.freeze()
    linear_to_lora_layers(model, 4, {"rank": 4, "scale": 10.0, "dropout": 0.0})
    lora = {n.split(".", 3)[-1] for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert {"self_attn.in_proj_qkvz", "self_attn.in_proj_ba", "self_attn.out_proj",
            "self_attn.q_proj", "mlp.up_proj"} <= lora
    np.testing.assert_array_equal(np.array(model(TOKENS)), np.array(before))  # lora_b = 0
    trainable = {k.rsplit(".", 1)[-1] for k, _ in tree_flatten(model.trainable_parameters())}
    assert trainable == {"lora_a", "lora_b"}
    opt = optim.Adam(learning_rate=1e-2)

    def loss_fn(model):
        return nn.losses.cross_entropy(model(TOKENS[:, :-1]), TOKENS[:, 1:], reduction="mean")

    losses = []
    for _ in range(5):
        loss, grads = nn.value_and_grad(model, loss_fn)(model)
        opt.update(model, grads)
        losses.append(loss.item())
    assert losses[-1] < losses[0]


QWEN3_NEXT = dict(model_type="qwen3_next", hidden_size=32, num_hidden_layers=4,
                  intermediate_size=64, num_attention_heads=4, linear_num_value_heads=4,
                  linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8,
                  linear_conv_kernel_dim=4, num_experts=0, num_experts_per_tok=1,
                  decoder_sparse_step=1, shared_expert_intermediate_size=64, mlp_only_layers=[],
                  moe_intermediate_size=64, rms_norm_eps=1e-6, vocab_size=50,
                  num_key_value_heads=2, rope_theta=10000.0, partial_rotary_factor=0.25,
                  max_position_embeddings=128, head_dim=16)


def random_qwen3_next(**overrides):
    mx.random.seed(0)
    model = qwen3_next.Model(qwen3_next.ModelArgs(**{**QWEN3_NEXT, **overrides}))
    # Every weight random (norm gains around 1), so a swapped or transposed one shows.
    model.update(nn.utils.tree_map(lambda w: mx.random.normal(w.shape) * 0.3 + 1.0
                                   if w.ndim == 1 else mx.random.normal(w.shape) * 0.15,
                                   model.parameters()))
    return model


@pytest.mark.parametrize("tie", [False, True])
def test_a_qwen3_next_model_maps_in_with_the_same_logits(tie):
    theirs = random_qwen3_next(tie_word_embeddings=tie)
    ours = from_qwen3_next(theirs)
    tokens = mx.array(np.random.default_rng(2).integers(0, 50, size=(2, 23)))
    assert ours.args.layer_types == ["linear_attention"] * 3 + ["full_attention"]
    assert rel_error(ours(tokens), theirs(tokens)) < 1e-4
    cache, their_cache = ours.make_cache(), theirs.make_cache()
    for piece in (tokens[:, :9], tokens[:, 9:10], tokens[:, 10:]):
        assert rel_error(ours(piece, cache=cache), theirs(piece, cache=their_cache)) < 1e-4


def test_a_mapped_qwen3_next_model_has_the_same_gradients():
    """Training through our chunked form = autodiff through mlx-lm's step-by-step recurrence."""
    theirs = random_qwen3_next()
    ours = from_qwen3_next(theirs)
    tokens = mx.array(np.random.default_rng(3).integers(0, 50, size=(2, 24)))

    def loss_fn(model):
        return nn.losses.cross_entropy(model(tokens[:, :-1]), tokens[:, 1:], reduction="mean")

    want = dict(tree_flatten(nn.value_and_grad(theirs, loss_fn)(theirs)[1]))
    got = dict(tree_flatten(nn.value_and_grad(ours, loss_fn)(ours)[1]))
    for name, grad in want.items():
        if "q_proj" not in name:  # split into q_proj and g_proj on our side
            assert rel_error(got[name.replace("linear_attn", "self_attn")], grad) < 1e-4, name


def test_qwen3_next_mapping_refuses_moe_and_other_models():
    with pytest.raises(ValueError, match="sparse MoE"):
        from_qwen3_next(random_qwen3_next(num_experts=4, num_experts_per_tok=2))
    with pytest.raises(TypeError, match="qwen3_next.Model"):
        from_qwen3_next(hybrid())


# ---- pre-training -----------------------------------------------------------------------------

@pytest.mark.parametrize("pattern, types", [
    ("LLLF", ["linear_attention"] * 3 + ["full_attention"] + ["linear_attention"] * 3
     + ["full_attention"]),
    ("LS", ["linear_attention", "sliding_attention"] * 4),
    (None, ["full_attention"] * 8),
])
def test_layer_pattern_repeats_to_the_depth(pattern, types):
    args = PretrainConfig(layer_pattern=pattern, num_layers=8, sliding_window=16).model_args()
    assert args.layer_types == types and args.sliding_window == 16


@pytest.mark.parametrize("pattern", ["LLXF", "LLL", "", "llf"])
def test_bad_layer_patterns(pattern):
    with pytest.raises(ValueError, match=f"layer_pattern must be letters of FSL whose length "
                                         f"divides num_layers=8, got '{pattern}'"):
        PretrainConfig(layer_pattern=pattern, num_layers=8)


def test_pretrain_command_reports_a_bad_pattern_in_one_line(tmp_path, capsys):
    from mlx_localnorm.train import command

    code = command.main(["--out-dir", str(tmp_path / "run"), "--layer-pattern", "LLF"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "got 'LLF'" in err
    assert not (tmp_path / "run").exists()


def test_layer_pattern_with_ngpt_names_the_conflict():
    with pytest.raises(ValueError, match="linear_attention works with placements"):
        PretrainConfig(layer_pattern="LF", placement="ngpt")


def test_a_hybrid_model_pretrains(tmp_path):
    works = ln.data.load_corpus().train  # a small corpus: the tokenizer trains in a second
    (tmp_path / "a.txt").write_text(works[1][:6000])  # hashes into the validation split
    (tmp_path / "b.txt").write_text(works[0][:30000])
    config = PretrainConfig(out_dir=str(tmp_path / "run"), corpus=str(tmp_path), vocab_size=512,
                            hidden_size=32,
                            num_layers=4, num_heads=2, seq_len=32, batch_size=4, steps=6,
                            eval_every=3, eval_batches=1, save_every=6, warmup_steps=1,
                            sample_tokens=4, progress=False, layer_pattern="LLLF")
    Pretrainer(config).run()
    losses = [r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 6 and all(np.isfinite(losses)) and losses[-1] < losses[0]
    model, _ = mlx_lm.load(str(tmp_path / "run"), trust_remote_code=True)
    assert model.args.layer_types.count("linear_attention") == 3


# ---- benchmark ------------------------------------------------------------------------------

def test_bench_linear_runs_at_a_tiny_size(tmp_path, capsys):
    from mlx_localnorm.bench import linear

    assert linear.main(["--out", str(tmp_path), "--vocab", "512", "--hidden", "32", "--layers",
                        "2", "--heads", "2", "--lengths", "8", "16", "--repeat", "1",
                        "--batch", "1", "--seq-len", "16", "--rounds", "1",
                        "--train-steps", "0", "--layer-pattern", "LF"]) == 0
    with open(tmp_path / "linear.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["measure"], r["configuration"], r["seq_len"]) for r in rows] == [
        ("recurrence fwd+bwd", "chunked (ours)", "8"),
        ("recurrence fwd+bwd", "gated_delta_ops autodiff", "8"),
        ("recurrence fwd+bwd", "chunked (ours)", "16"),
        ("recurrence fwd+bwd", "gated_delta_ops autodiff", "16"),
        ("training tokens/s", "hybrid LF", "16"), ("training tokens/s", "all attention", "16")]
    assert all(float(r["value"]) > 0 and float(r["peak_memory_mb"]) >= 0 for r in rows)
    assert (tmp_path / "linear.png").stat().st_size > 5000


def test_bench_linear_rejects_a_bad_pattern(capsys):
    from mlx_localnorm import cli

    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", "linear", "--layer-pattern", "LXF", "--train-steps", "0"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "layer_pattern must be letters of FSL" in err
