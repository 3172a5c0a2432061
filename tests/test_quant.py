"""ln.quant: fake quantization on MLX's grid, straight-through and LSQ gradients, QAT layers,
export to real quantized layers and mlx-lm's loader.

The grid references are MLX's own ``mx.dequantize(*mx.quantize(...))`` (the thing QAT must
reproduce); gradients and saturation are hand-built in float64 NumPy.
"""

import csv
import json

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import mlx_lm
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models import llama
from mlx_lm.utils import quantize_model

import mlx_localnorm as ln  # noqa: F401  (must load before mlx.core is used)
from mlx_localnorm.models.quantized import quantized_layers
from mlx_localnorm.quant import (QATEmbedding, QATLinear, export, fake_quantize,
                                 fake_quantize_learned, mse_scales_biases, pack_affine,
                                 prepare_qat, qat_layers, save)
from test_models import tiny_tokenizer

# Every format mx.quantize documents: (mode, group_size, bits).
AFFINE = [("affine", g, b) for g in (32, 64, 128) for b in (1, 2, 3, 4, 5, 6, 8)]
FLOATS = [("mxfp4", 32, 4), ("nvfp4", 16, 4), ("mxfp8", 32, 8)]
DTYPES = [mx.float32, mx.float16, mx.bfloat16]


def bits_of(a: mx.array) -> np.ndarray:
    """The float32 bit patterns (every dtype here widens to float32 exactly)."""
    return np.array(a.astype(mx.float32)).view(np.uint32)


def mlx_grid(w, group_size, bits, mode):
    out = mx.dequantize(*mx.quantize(w, group_size, bits, mode=mode), group_size=group_size,
                        bits=bits, mode=mode)
    return out.astype(w.dtype)


# ---- the grid, bit for bit -----------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode,group_size,bits", AFFINE + FLOATS)
def test_fake_quantize_is_mlx_grid_bit_for_bit(mode, group_size, bits, dtype):
    mx.random.seed(group_size + bits)
    # wide range of magnitudes per row so the float modes use several shared exponents
    w = (mx.random.normal((6, 4 * group_size)) * mx.exp(mx.random.normal((6, 1)) * 2))
    w = w.astype(dtype)
    got = fake_quantize(w, group_size, bits, mode)
    assert got.dtype == dtype and got.shape == w.shape
    np.testing.assert_array_equal(bits_of(got), bits_of(mlx_grid(w, group_size, bits, mode)))


def test_fake_quantize_defaults_are_affine_64_4_and_the_mode_defaults():
    w = mx.random.normal((2, 128))
    np.testing.assert_array_equal(bits_of(fake_quantize(w)), bits_of(mlx_grid(w, 64, 4, "affine")))
    np.testing.assert_array_equal(bits_of(fake_quantize(w, mode="nvfp4")),
                                  bits_of(mlx_grid(w, 16, 4, "nvfp4")))


def test_fake_quantize_any_leading_shape_and_one_axis():
    w = mx.random.normal((2, 3, 128))
    np.testing.assert_array_equal(bits_of(fake_quantize(w, 32, 3)),
                                  bits_of(mlx_grid(w.reshape(6, 128), 32, 3, "affine")).reshape(
                                      2, 3, 128))
    v = mx.random.normal((256,))
    np.testing.assert_array_equal(bits_of(fake_quantize(v, 128, 2)),
                                  bits_of(mlx_grid(v.reshape(1, 256), 128, 2, "affine"))[0])


def accepted_by_mlx(group_size, bits, mode) -> bool:
    try:
        mx.eval(mx.quantize(mx.zeros((1, 256)), group_size, bits, mode=mode))
        return True
    except (ValueError, RuntimeError):
        return False


@pytest.mark.parametrize("mode", ["affine", "mxfp4", "nvfp4", "mxfp8"])
def test_accepts_exactly_the_formats_mlx_accepts(mode):
    for group_size in (8, 16, 32, 64, 128, 256):
        for bits in range(1, 10):
            if accepted_by_mlx(group_size, bits, mode):
                fake_quantize(mx.zeros((1, 256)), group_size, bits, mode)
            else:
                with pytest.raises(ValueError):
                    fake_quantize(mx.zeros((1, 256)), group_size, bits, mode)


@pytest.mark.parametrize("kwargs,named,allowed", [
    (dict(bits=7), "bits", "[1, 2, 3, 4, 5, 6, 8]"),
    (dict(bits=0), "bits", "[1, 2, 3, 4, 5, 6, 8]"),
    (dict(group_size=48), "group_size", "[32, 64, 128]"),
    (dict(group_size=64, mode="mxfp4"), "group_size", "[32]"),
    (dict(group_size=16, bits=8, mode="nvfp4"), "bits", "[4]"),
    (dict(mode="int4"), "mode", "['affine', 'mxfp4', 'mxfp8', 'nvfp4']"),
])
def test_bad_format_is_a_value_error_naming_argument_and_allowed_values(kwargs, named, allowed):
    with pytest.raises(ValueError, match=rf"{named} must be one of") as err:
        fake_quantize(mx.zeros((2, 128)), **kwargs)
    message = str(err.value)
    assert allowed in message and "\n" not in message
    given = kwargs.get(named)
    assert repr(given) in message or str(given) in message


def test_bad_types_and_shapes():
    with pytest.raises(TypeError, match="bits must be an int, got float"):
        fake_quantize(mx.zeros((2, 128)), bits=4.0)
    with pytest.raises(TypeError, match="w must be float32, float16 or bfloat16, got .*int32"):
        fake_quantize(mx.zeros((2, 128), dtype=mx.int32))
    with pytest.raises(TypeError, match="w must be an mx.array, got ndarray"):
        fake_quantize(np.zeros((2, 128), np.float32))
    with pytest.raises(ValueError, match=r"multiple of group_size=64, got shape \(4, 100\)"):
        fake_quantize(mx.zeros((4, 100)))
    with pytest.raises(ValueError, match=r"multiple of group_size=32, got shape \(48,\)"):
        fake_quantize(mx.zeros((48,)), 32)


# ---- straight-through gradient ------------------------------------------------------------

@pytest.mark.parametrize("mode,group_size,bits", [("affine", 64, 2), ("affine", 32, 8),
                                                  ("mxfp4", 32, 4), ("nvfp4", 16, 4)])
def test_straight_through_gradient_is_the_identity(mode, group_size, bits):
    w = mx.random.normal((3, 128)) * 3
    c = mx.random.normal((3, 128))
    grad = mx.grad(lambda w: (c * fake_quantize(w, group_size, bits, mode)).sum())(w)
    np.testing.assert_array_equal(np.array(grad), np.array(c))


def test_clipped_straight_through_affine_saturating_group_by_hand():
    # 2 bits, min -1, max 0.7: MLX pins the larger end (-1) and keeps zero on the grid, so
    # the step is 0.5 and the grid {-1, -0.5, 0, 0.5}: 0.7 saturates at 0.5.
    row = np.full(32, 0.2, np.float32)
    row[:4] = [-1.0, 0.7, 0.3, -0.45]
    w = mx.array(row[None])
    want = np.full(32, 0.0, np.float32)
    want[:4] = [-1.0, 0.5, 0.5, -0.5]
    np.testing.assert_array_equal(np.array(fake_quantize(w, 32, 2))[0], want)
    c = mx.arange(1, 33, dtype=mx.float32)[None]
    grad = mx.grad(lambda w: (c * fake_quantize(w, 32, 2, clip=True)).sum())(w)
    mask = np.ones(32, np.float32)
    mask[1] = 0.0
    np.testing.assert_array_equal(np.array(grad)[0], np.arange(1, 33) * mask)


def test_clipped_straight_through_nvfp4_by_hand():
    # nvfp4 scale: e4m3 nearest to amax / 6 = 6.2 / 6 -> 1.0 (e4m3 steps 0.125 there), so the
    # e2m1 grid tops out at 6.0 and +-6.2 saturate. One group of 16: an odd group count.
    row = np.linspace(-3.0, 3.0, 16).astype(np.float32)
    row[3], row[7] = 6.2, -6.2
    w = mx.array(row[None])
    got = np.array(fake_quantize(w, mode="nvfp4"))[0]
    assert got[3] == 6.0 and got[7] == -6.0
    grad = mx.grad(lambda w: fake_quantize(w, mode="nvfp4", clip=True).sum())(w)
    want = np.ones(16, np.float32)
    want[[3, 7]] = 0.0
    np.testing.assert_array_equal(np.array(grad)[0], want)


def test_odd_number_of_nvfp4_groups():
    w = mx.random.normal((3, 16))  # MLX's own nvfp4 needs an even count of groups
    ref = mlx_grid(mx.concatenate([w, mx.zeros((1, 16))]), 16, 4, "nvfp4")[:3]
    np.testing.assert_array_equal(bits_of(fake_quantize(w, mode="nvfp4")), bits_of(ref))


# ---- learned scales (LSQ / LSQ+) -----------------------------------------------------------

@pytest.mark.parametrize("group_size,bits", [(g, b) for g in (32, 64, 128)
                                             for b in (1, 2, 3, 4, 5, 6, 8)])
def test_learned_grid_starts_on_mlx_grid(group_size, bits):
    mx.random.seed(bits)
    w = mx.random.normal((4, 256)) * mx.exp(mx.random.normal((4, 1)))
    _, scales, biases = mx.quantize(w, group_size, bits)
    got = fake_quantize_learned(w, scales, biases, group_size, bits)
    np.testing.assert_array_equal(bits_of(got), bits_of(mlx_grid(w, group_size, bits, "affine")))


def test_learned_scale_gradients_are_lsq_by_hand():
    bits, qmax = 2, 3
    rng = np.random.default_rng(0)
    w = rng.uniform(-2.0, 2.5, (2, 32)).astype(np.float32)
    s = np.array([[0.5], [-0.75]], np.float32)   # MLX stores negative scales too
    b = np.array([[-1.0], [1.5]], np.float32)
    c = rng.normal(size=(2, 32)).astype(np.float32)

    def loss(w, s, b):
        return (mx.array(c) * fake_quantize_learned(w, s, b, 32, bits)).sum()

    gw, gs, gb = mx.grad(loss, argnums=(0, 1, 2))(mx.array(w), mx.array(s), mx.array(b))
    v = (w.astype(np.float64) - b) / s
    inside = (v >= 0) & (v <= qmax)
    q = np.round(np.clip(v, 0, qmax))
    want_w = np.where(inside, c, 0.0)
    want_s = (c * np.where(inside, q - v, q)).sum(-1, keepdims=True)
    want_b = (c * np.where(inside, 0.0, 1.0)).sum(-1, keepdims=True)
    assert 0 < inside.mean() < 1  # both cases are exercised
    np.testing.assert_allclose(np.array(gw), want_w, rtol=1e-6, atol=0)  # c * s / s
    np.testing.assert_allclose(np.array(gs), want_s, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.array(gb), want_b, rtol=1e-5, atol=1e-5)


def test_learned_rejects_scales_of_the_wrong_shape():
    w = mx.zeros((4, 128))
    with pytest.raises(ValueError, match=r"scales must have shape \(4, 2\).*got \(4, 4\)"):
        fake_quantize_learned(w, mx.ones((4, 4)), mx.zeros((4, 2)), 64, 4)
    with pytest.raises(ValueError, match="mode='affine'"):
        fake_quantize_learned(w, mx.ones((4, 2)), mx.zeros((4, 2)), 64, 7)


def group_errors(w, w_hat, group_size):
    """Squared error of each group, float64."""
    d = np.asarray(w_hat, np.float64) - np.asarray(w, np.float64)
    return (d**2).reshape(*d.shape[:-1], -1, group_size).sum(-1)


def best_shrunk_range_errors(w, group_size, bits):
    """Per group, the least squared error over the ranges [a min, a max], a = 1.00 .. 0.50,
    in float64 NumPy (codes clipped to 0 .. 2^bits - 1)."""
    groups = np.asarray(w, np.float64).reshape(*w.shape[:-1], -1, group_size)
    low, high = groups.min(-1, keepdims=True), groups.max(-1, keepdims=True)
    levels = 2**bits - 1
    best = np.full(low.shape[:-1], np.inf)
    for a in np.linspace(1.0, 0.5, 51):
        s = np.maximum(a * (high - low) / levels, 1e-7)
        q = np.clip(np.round((groups - a * low) / s), 0, levels)
        best = np.minimum(best, ((s * q + a * low - groups) ** 2).sum(-1))
    return best


@pytest.mark.parametrize("group_size,bits", [(32, 2), (64, 3), (128, 4), (64, 8)])
def test_mse_ranges_are_the_least_squared_error_of_min_max_and_the_shrunk_ranges(group_size,
                                                                                   bits):
    """Per group: error = min(MLX's min-max grid, the best shrunk range), each computed
    here in float64; heavy-tailed rows so some groups gain from clipping and some do not."""
    rng = np.random.default_rng(group_size + bits)
    w = rng.standard_t(3, (6, 4 * group_size)) * np.exp(rng.normal(size=(6, 1)))
    w = mx.array(w.astype(np.float32))
    scales, biases = mse_scales_biases(w, group_size, bits)
    assert scales.shape == biases.shape == (6, 4) and scales.dtype == mx.float32
    got = group_errors(w, fake_quantize_learned(w, scales, biases, group_size, bits),
                       group_size)
    min_max = group_errors(w, mlx_grid(w, group_size, bits, "affine"), group_size)
    shrunk = best_shrunk_range_errors(w, group_size, bits)
    np.testing.assert_allclose(got, np.minimum(min_max, shrunk), rtol=1e-4)
    assert (got < 0.9 * min_max).any() and (min_max < shrunk).any()  # both cases occur


def test_mse_range_clips_an_outlier_and_keeps_a_flat_group_exact():
    """Group 0: 63 small weights and one at 10: at 3 bits the grid gives up the outlier for
    finer steps (its top code is below 10). Group 1: constant, reproduced exactly."""
    rng = np.random.default_rng(0)
    w = np.concatenate([rng.uniform(-1, 1, 63), [10.0], np.full(64, 0.3)])
    w = mx.array(w.astype(np.float32)[None])
    scales, biases = mse_scales_biases(w, 64, 3)
    w_hat = np.array(fake_quantize_learned(w, scales, biases, 64, 3))[0]
    top = float(scales[0, 0] * 7 + biases[0, 0])
    assert top < 9.0 and w_hat[63] == pytest.approx(top, rel=1e-6)
    errors = group_errors(w, w_hat[None], 64)[0]
    assert errors[0] < 0.5 * group_errors(w, mlx_grid(w, 64, 3, "affine"), 64)[0, 0]
    np.testing.assert_array_equal(w_hat[64:], np.full(64, 0.3, np.float32))


def test_mse_ranges_keep_the_weights_dtype_and_check_their_arguments():
    w = mx.random.normal((2, 128)).astype(mx.bfloat16)
    scales, biases = mse_scales_biases(w, 64, 4)
    assert scales.dtype == biases.dtype == mx.bfloat16  # as mx.quantize's
    assert mse_scales_biases(mx.random.normal((3, 64)))[0].shape == (3, 1)  # 4 bits, 64
    experts = mx.random.normal((2, 3, 128))  # an MoE bank: each expert on its own
    for got, want in zip(mse_scales_biases(experts, 64, 3),
                         zip(*(mse_scales_biases(e, 64, 3) for e in experts))):
        np.testing.assert_array_equal(np.array(got), np.stack([np.array(x) for x in want]))
    with pytest.raises(ValueError, match=r"mse_scales_biases: bits must be one of .* got 7"):
        mse_scales_biases(w, 64, 7)
    with pytest.raises(ValueError, match=r"shrinks must be factors in \(0, 1\], got \(1.2,\)"):
        mse_scales_biases(w, 64, 4, shrinks=(1.2,))
    with pytest.raises(ValueError, match="multiple of group_size=64"):
        mse_scales_biases(mx.zeros((2, 96)), 64, 4)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 8])
def test_pack_affine_is_what_mx_dequantize_reads(bits):
    codes = np.random.default_rng(bits).integers(0, 2**bits, (3, 128))
    packed = mx.array(pack_affine(codes, bits))
    ones, zeros = mx.ones((3, 4)), mx.zeros((3, 4))
    got = mx.dequantize(packed, ones, zeros, group_size=32, bits=bits)
    np.testing.assert_array_equal(np.array(got), codes.astype(np.float32))


# ---- QAT layers, export, save --------------------------------------------------------------

TOKENS = mx.array([[3, 9, 4, 17, 2, 30, 5, 11], [7, 7, 1, 22, 8, 13, 2, 6]])


def tiny(seed=0, **overrides) -> ln.Model:
    mx.random.seed(seed)
    args = dict(vocab_size=32, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=128, norm_type="seednorm",
                placement="peri")
    return ln.Model(ln.ModelArgs(**{**args, **overrides}))


def tiny_llama(seed=0):
    mx.random.seed(seed)
    config = dict(model_type="llama", hidden_size=64, num_hidden_layers=2,
                  intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                  rms_norm_eps=1e-5, vocab_size=32, tie_word_embeddings=False)
    return llama.Model(llama.ModelArgs(**config)), config


def dequantized(layer) -> mx.array:
    return mx.dequantize(layer.weight, layer.scales, layer.get("biases"),
                         group_size=layer.group_size, bits=layer.bits, mode=layer.mode,
                         dtype=mx.float32)


def assert_logits_close(got, want):
    scale = float(mx.abs(want).max())
    assert float(mx.abs(got - want).max()) <= 1e-5 * scale


@pytest.mark.parametrize("make", [tiny, lambda: tiny_llama()[0]], ids=["ln", "mlx_lm_llama"])
@pytest.mark.parametrize("bits,group_size,mode,learn", [
    (4, 64, "affine", False), (2, 32, "affine", False), (3, 128, "affine", False),
    (4, 32, "mxfp4", False), (4, 16, "nvfp4", False), (8, 32, "mxfp8", False),
    (3, 64, "affine", True), (2, 64, "affine", "mse")])
def test_export_is_the_fake_quantized_model(make, bits, group_size, mode, learn):
    model = make()
    # float-mode embeddings put the model in bfloat16 (see the next test): compare in float32
    embeddings = mode == "affine"
    prepare_qat(model, bits, group_size, mode, embeddings=embeddings, learn_scales=bool(learn),
                scale_init="mse" if learn == "mse" else "minmax")
    if learn:  # move the learned scales and weights off their initial values
        opt = optim.Adam(learning_rate=1e-2)
        loss = nn.value_and_grad(model, lambda m: m(TOKENS).square().mean())
        for _ in range(3):
            opt.update(model, loss(model)[1])
    layers = qat_layers(model)
    assert set(layers) == {path for path, m in make().named_modules()
                           if type(m) in (nn.Linear, nn.Embedding)[:1 + embeddings]
                           and m.weight.shape[-1] % group_size == 0}
    weights = {path: layer.quantized_weight() for path, layer in layers.items()}
    fake_logits = model(TOKENS)
    export(model)
    modules = dict(model.named_modules())
    for path, w in weights.items():
        kind = nn.QuantizedEmbedding if path.endswith("embed_tokens") else nn.QuantizedLinear
        assert type(modules[path]) is kind, path
        assert (modules[path].bits, modules[path].group_size, modules[path].mode) == (
            bits, group_size, mode)
        np.testing.assert_array_equal(bits_of(dequantized(modules[path])), bits_of(w))
    assert_logits_close(model(TOKENS), fake_logits)


@pytest.mark.parametrize("mode", ["mxfp4", "nvfp4", "mxfp8"])
def test_float_mode_embedding_returns_what_the_exported_one_returns(mode):
    table = nn.Embedding(32, 64)
    qat = QATEmbedding.from_embedding(table, None if mode != "nvfp4" else 16,
                                      8 if mode == "mxfp8" else 4, mode)
    real = nn.QuantizedEmbedding.from_embedding(table, qat.group_size, qat.bits, mode)
    got, want = qat(TOKENS), real(TOKENS)
    assert got.dtype == want.dtype == mx.bfloat16
    np.testing.assert_array_equal(bits_of(got), bits_of(want))
    x = mx.random.normal((3, 64))
    assert_logits_close(qat.as_linear(x), real.as_linear(x))


def test_before_training_qat_is_mlx_lm_post_training_quantization():
    model = prepare_qat(tiny(), 3, 64, embeddings=True)
    reference, _ = quantize_model(tiny(), {}, 64, 3)
    assert_logits_close(model(TOKENS), reference(TOKENS))
    export(model)
    assert quantized_layers(model) == quantized_layers(reference)


def test_honours_the_models_quant_predicate_and_skips_what_mlx_lm_skips():
    # MoE routers go to 8 bits (ln.Model.quant_predicate); a 96-wide down_proj does not
    # divide into groups of 64 and stays float, as in mlx_lm's quantize_model.
    make = lambda: tiny(num_experts=4, num_experts_per_tok=2, intermediate_size=96,  # noqa
                        num_hidden_layers=1, placement="pre", norm_type="rmsnorm")
    model = prepare_qat(make(), 2, 64, embeddings=True)
    reference, _ = quantize_model(make(), {}, 64, 2)
    assert_logits_close(model(TOKENS), reference(TOKENS))
    export(model)
    assert quantized_layers(model) == quantized_layers(reference)
    assert quantized_layers(model)["model.layers.0.mlp.gate"]["bits"] == 8
    never = prepare_qat(tiny(), 4, 64, predicate=lambda path, m: "q_proj" not in path)
    assert type(never.layers[0].self_attn.q_proj) is nn.Linear
    assert type(never.layers[0].self_attn.k_proj) is QATLinear
    assert type(never.model.embed_tokens) is nn.Embedding  # embeddings=False by default


def test_straight_through_gradient_is_the_float_gradient_at_the_quantized_weights():
    qat = prepare_qat(tiny(), 2, 32, embeddings=True)
    at_grid = tiny()
    at_grid.update(tree_unflatten_weights(qat))
    loss = lambda m: nn.losses.cross_entropy(m(TOKENS[:, :-1]), TOKENS[:, 1:]).mean()  # noqa
    _, g_qat = nn.value_and_grad(qat, loss)(qat)
    _, g_ref = nn.value_and_grad(at_grid, loss)(at_grid)
    g_ref = dict(tree_flatten(g_ref))
    for path, grad in tree_flatten(g_qat):
        np.testing.assert_allclose(np.array(grad), np.array(g_ref[path]), rtol=1e-4,
                                   atol=1e-6, err_msg=path)


def tree_unflatten_weights(qat):
    """The QAT model's parameters with every fake-quantized weight replaced by its grid."""
    from mlx.utils import tree_unflatten

    params = dict(tree_flatten(qat.parameters()))
    for path, layer in qat_layers(qat).items():
        params[f"{path}.weight"] = layer.quantized_weight()
    return tree_unflatten(list(params.items()))


def test_frozen_others_train_only_the_quantized_weights_and_scales():
    model = prepare_qat(tiny(), 4, 64, embeddings=True, learn_scales=True, train_others=False)
    trainable = {path for path, _ in tree_flatten(model.trainable_parameters())}
    layers = qat_layers(model)
    want = {f"{p}.{k}" for p in layers for k in ("weight", "scales", "biases")}
    assert trainable == want
    everything = {path for path, _ in tree_flatten(model.parameters())}
    assert any("alpha" in p for p in everything - trainable)  # SeeDNorm's vectors kept


def test_bad_settings():
    with pytest.raises(ValueError, match=r"prepare_qat: bits must be one of .* got 7"):
        prepare_qat(tiny(), 7, 64)
    with pytest.raises(ValueError, match="learn_scales needs mode='affine', got 'mxfp4'"):
        prepare_qat(tiny(), 4, 32, "mxfp4", learn_scales=True)
    with pytest.raises(TypeError, match="embeddings must be True or False"):
        prepare_qat(tiny(), 4, 64, embeddings="yes")
    with pytest.raises(ValueError, match=r"scale_init must be one of \('minmax', 'mse'\), "
                       "got 'MSE'"):
        prepare_qat(tiny(), 4, 64, learn_scales=True, scale_init="MSE")
    with pytest.raises(ValueError, match="scale_init='mse' needs learn_scales=True"):
        prepare_qat(tiny(), 4, 64, scale_init="mse")
    with pytest.raises(ValueError, match="export: model has no fake-quantized layers"):
        export(tiny())
    with pytest.raises(ValueError, match="predicate must return a bool or a dict"):
        prepare_qat(tiny(), 4, 64, predicate=lambda path, m: {"bits": 4, "scale": 2})


def test_saved_ln_model_loads_and_generates_in_mlx_lm(tmp_path):
    model = prepare_qat(tiny(), 4, 64, embeddings=True)
    path = save(model, tiny_tokenizer(), tmp_path / "q4")
    config = json.loads((path / "config.json").read_text())
    assert config["quantization"] == {"group_size": 64, "bits": 4, "mode": "affine"}
    loaded, tokenizer = mlx_lm.load(str(path), trust_remote_code=True)
    assert quantized_layers(loaded) == quantized_layers(model)
    np.testing.assert_array_equal(np.array(loaded(TOKENS)), np.array(model(TOKENS)))
    text = mlx_lm.generate(loaded, tokenizer, prompt="w1 w2", max_tokens=5)
    assert len(text.split()) == 5


def test_saved_mlx_lm_model_loads_and_generates(tmp_path):
    model, config = tiny_llama()
    prepare_qat(model, 2, 32, embeddings=True)
    fake_logits = model(TOKENS)
    path = save(model, tiny_tokenizer(), tmp_path / "llama-q2", config)
    assert not isinstance(model.model.embed_tokens, QATEmbedding)  # exported in place
    saved = json.loads((path / "config.json").read_text())
    assert saved["quantization"] == {"group_size": 32, "bits": 2, "mode": "affine"}
    assert saved["quantization_config"] == saved["quantization"]
    loaded, tokenizer = mlx_lm.load(str(path))
    assert_logits_close(loaded(TOKENS), fake_logits)
    text = mlx_lm.generate(loaded, tokenizer, prompt="w3", max_tokens=4)
    assert len(text.split()) == 4
    with pytest.raises(ValueError, match="exists and is not an empty directory"):
        save(model, tiny_tokenizer(), path, config)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama-q2"]


# ---- the qat command and its trainer -------------------------------------------------------

def qat_fixture(tmp_path):
    """A saved tiny float model and a corpus of six documents (held-out ones included)."""
    import random

    base = ln.save_model(tiny(norm_type="rmsnorm", placement="pre"), tiny_tokenizer(),
                         tmp_path / "base")
    rng = random.Random(0)
    data = tmp_path / "data"
    data.mkdir()
    for i in range(6):
        words = (f"w{(3 * j + rng.randrange(3)) % 30}" for j in range(600))
        (data / f"doc{i}.txt").write_text(" ".join(words))
    return base, data


SMALL = ["--batch-size", "2", "--seq-len", "16", "--eval-batches", "1", "--log-every", "1",
         "--group-size", "32", "--no-progress"]


def test_qat_command_writes_a_model_mlx_lm_runs_and_prints_the_table(tmp_path, capsys):
    from mlx_localnorm.quant.command import main
    from mlx_localnorm.quant.train import QATData

    base, data = qat_fixture(tmp_path)
    out = tmp_path / "q3"
    argv = ["--model", str(base), "--data", str(data), "--out", str(out), "--bits", "3",
            "--total-steps", "3", "--distill", "--csv", str(tmp_path / "qat.csv"), *SMALL,
            "--eval-batches", "0"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    methods = [line.split()[1] for line in printed.splitlines()
               if line.split()[:1] in (["-"], ["3"])]
    assert methods == ["float", "ptq", "dwq", "qat"]
    with open(tmp_path / "qat.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == methods
    assert all(float(r["val_ppl"]) > 1 for r in rows)  # DWQ ran too
    # --eval-batches 0: every held-out sequence of 16 tokens, the last batch of 2 or 1
    tokenizer = mlx_lm.load(str(base), trust_remote_code=True)[1]
    valid = QATData(str(data), tokenizer, 2, 16, 0).tokens.valid
    everything = (len(valid) - 1) // 16 * 16
    assert everything > 64 and [r["eval_tokens"] for r in rows] == [str(everything)] * 4
    assert f"Held-out perplexity ({everything:,} tokens):" in printed
    assert rows[3]["gap_recovered_pct"] != "" or float(rows[1]["val_ppl"]) <= float(
        rows[0]["val_ppl"])
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == {"group_size": 32, "bits": 3, "mode": "affine"}
    loaded, tokenizer = mlx_lm.load(str(out), trust_remote_code=True)
    assert type(loaded.model.embed_tokens) is nn.QuantizedEmbedding
    assert len(mlx_lm.generate(loaded, tokenizer, prompt="w1", max_tokens=3).split()) == 3
    assert (out / "loss.png").is_file() and (out / "metrics.jsonl").is_file()
    # a finished run resumed: nothing to train, the same model exported again
    before = (out / "model.safetensors").read_bytes()
    assert main(["--out", str(out), "--resume", "--no-compare"]) == 0
    assert (out / "model.safetensors").read_bytes() == before
    assert main(["--out", str(tmp_path / "nothing"), "--resume"]) == 2
    assert "train_config.json does not exist" in capsys.readouterr().err
    assert main(["--out", str(tmp_path / "x")]) == 2
    assert "--model is required" in capsys.readouterr().err


def test_qat_command_runs_dwq_at_the_widths_asked(tmp_path, capsys):
    """--bits 2 3 --dwq-bits 3: a DWQ row for 3 bits only; widths outside --bits refused.
    The QAT rows name their settings (learned scales and their rate, the averaging)."""
    from mlx_localnorm.quant.command import main

    base, data = qat_fixture(tmp_path)
    argv = ["--model", str(base), "--data", str(data), "--out", str(tmp_path / "q"),
            "--bits", "2", "3", "--total-steps", "2", "--learn-scales", "--scale-lr-ratio",
            "0.5", "--scale-init", "mse", "--average-last", "2", *SMALL]
    assert main([*argv, "--dwq-bits", "3"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines()
             if line.split()[:1] in (["2"], ["3"])]
    rows = [line.split()[:2] for line in lines]
    assert rows == [["2", "ptq"], ["2", "qat"], ["3", "ptq"], ["3", "dwq"], ["3", "qat"]]
    assert all(line.endswith("lr 0.0001, CE, learned scales at 0.5x lr (MSE ranges), mean of "
                             "the last 2 steps")
               for line in lines if line.split()[1] == "qat")
    for bad in (["--dwq-bits", "4"], ["--dwq-bits", "3", "--no-dwq"]):
        assert main([*argv, "--out", str(tmp_path / "x"), *bad]) == 2
        err = capsys.readouterr().err
        assert "--dwq-bits must be among --bits [2, 3]" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("embedding_lr_ratio,average_last", [(1.0, 0), (3.0, 0), (1.0, 3)])
def test_qat_resume_continues_exactly(tmp_path, embedding_lr_ratio, average_last):
    """Also with three optimizer groups (scales, embedding, the rest) to restore, and with
    an average whose window (steps 2-4) spans the interruption."""
    from mlx_localnorm.quant.train import QATConfig, QATTrainer

    base, data = qat_fixture(tmp_path)
    settings = dict(model=str(base), data=str(data), bits=2, group_size=32, batch_size=2,
                    seq_len=16, total_steps=4, eval_batches=1, eval_every=0, save_every=0,
                    progress=False, learn_scales=True, embedding_lr_ratio=embedding_lr_ratio,
                    average_last=average_last)
    straight = QATTrainer(QATConfig(**settings, out_dir=str(tmp_path / "a")))
    straight.run()
    first = QATTrainer(QATConfig(**settings, out_dir=str(tmp_path / "b")))
    assert first.run(until=2)["interrupted"]
    resumed = QATTrainer(QATConfig(**settings, out_dir=str(tmp_path / "b")), resume=True)
    assert resumed.step == 2
    resumed.run()
    want = dict(tree_flatten(straight.model.parameters()))
    got = dict(tree_flatten(resumed.model.parameters()))
    assert set(got) == set(want) and any(k.endswith(".scales") for k in got)
    for key, value in want.items():
        np.testing.assert_array_equal(np.array(got[key]), np.array(value), err_msg=key)


def test_qat_resume_refuses_changed_settings_by_name(tmp_path):
    """A setting that shaped the checkpoint (the averaging window, the learning rate) cannot
    change on resume: a ValueError naming it, before anything is loaded or written; how the
    run reports (progress, evaluation batches) can."""
    from mlx_localnorm.quant.train import QATConfig, QATTrainer

    base, data = qat_fixture(tmp_path)
    settings = dict(model=str(base), data=str(data), bits=2, group_size=32, batch_size=2,
                    seq_len=16, total_steps=4, eval_batches=1, eval_every=0, save_every=0,
                    progress=False, learn_scales=True, average_last=3,
                    out_dir=str(tmp_path / "r"))
    assert QATTrainer(QATConfig(**settings)).run(until=2)["interrupted"]
    saved = (tmp_path / "r" / "train_config.json").read_text()
    for name, value in (("average_last", 0), ("learning_rate", 1e-3)):
        with pytest.raises(ValueError, match=f"resume: {name} cannot change in a resumed run "
                           f"\\(saved {settings.get(name, 1e-4)!r}, given {value!r}\\)"):
            QATTrainer(QATConfig(**{**settings, name: value}), resume=True)
    assert (tmp_path / "r" / "train_config.json").read_text() == saved
    resumed = QATTrainer(QATConfig(**{**settings, "progress": True, "eval_batches": 2}),
                         resume=True)
    assert resumed.step == 2


def test_average_last_evaluates_and_exports_the_mean_of_the_last_steps(tmp_path):
    """average_last=2 of 3 steps: the model mlx-lm loads from out_dir computes the logits of
    a fresh QAT model holding the float64 mean of the trainable parameters the step-2 and
    step-3 checkpoints saved (not those of step 3), and the last validation is its loss."""
    from mlx_localnorm.quant.train import QATConfig, QATTrainer, held_out_loss, load_float_model

    base, data = qat_fixture(tmp_path)
    out = tmp_path / "r"
    trainer = QATTrainer(QATConfig(
        model=str(base), data=str(data), bits=3, group_size=32, batch_size=2, seq_len=16,
        total_steps=3, warmup_steps=0, learning_rate=1e-2, eval_every=0, save_every=1,
        keep_checkpoints=3, log_every=1, progress=False, learn_scales=True, average_last=2,
        out_dir=str(out)))
    trainable = [k for k, _ in tree_flatten(trainer.model.trainable_parameters())]
    summary = trainer.run()
    step2, step3 = (mx.load(str(out / "checkpoints" / f"step_000000{t}" / "model.safetensors"))
                    for t in (2, 3))

    def qat_model(weights):
        model = load_float_model(str(base))[0]
        prepare_qat(model, 3, 32, embeddings=True, learn_scales=True)
        model.load_weights(list(weights.items()), strict=False)
        return model

    mean = {k: mx.array((np.array(step2[k], np.float64) + np.array(step3[k], np.float64)) / 2,
                        mx.float32) for k in trainable}
    averaged, last = qat_model(mean), qat_model({k: step3[k] for k in trainable})
    exported = mlx_lm.load(str(out), trust_remote_code=True)[0]
    tokens = mx.array([[1, 5, 9, 13, 17, 21, 25, 29]])
    got, want, other = (np.array(m(tokens)) for m in (exported, averaged, last))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert np.abs(got - other).max() > 1e-2
    assert summary["val_loss"] == pytest.approx(
        held_out_loss(averaged, trainer.data, trainer.config.eval_batches), rel=1e-5)


@pytest.mark.parametrize("ratio", [1.0, 1e-30])
def test_learned_scales_train_at_their_own_learning_rate(tmp_path, ratio):
    """scale_lr_ratio scales the learning rate of the learned scales and biases only: at
    1e-30 they keep MLX's initial values exactly while the weights move; at 1 they move too."""
    from mlx_localnorm.quant.train import QATConfig, QATTrainer

    base, data = qat_fixture(tmp_path)
    trainer = QATTrainer(QATConfig(
        model=str(base), data=str(data), bits=2, group_size=32, batch_size=2, seq_len=16,
        total_steps=2, warmup_steps=0, learning_rate=1e-2, eval_every=0, save_every=0,
        progress=False, learn_scales=True, scale_lr_ratio=ratio, out_dir=str(tmp_path / "r")))
    before = {k: np.array(v) for k, v in tree_flatten(trainer.model.parameters())}
    trainer.run()
    after = {k: np.array(v) for k, v in tree_flatten(trainer.model.parameters())}
    grid = [k for k in before if k.endswith((".scales", ".biases"))]
    weights = [k for k in before if k.endswith(".weight") and k.rsplit(".", 1)[0] + ".scales"
               in before]
    assert grid and weights
    assert all(not np.array_equal(before[k], after[k]) for k in weights)
    moved = [k for k in grid if not np.array_equal(before[k], after[k])]
    assert (moved == []) if ratio < 1 else moved


@pytest.mark.parametrize("embedding_ratio,scale_ratio", [(1.0, 1.0), (4.0, 1.0), (4.0, 0.25)])
def test_each_parameter_group_steps_at_its_own_learning_rate(tmp_path, embedding_ratio,
                                                             scale_ratio):
    """The first step of MLX's Adam (no bias correction: m = 0.1 g, v = 0.001 g^2) moves a
    parameter by sqrt(10) x its rate where |g| >> eps: the quantized embedding's weight at
    embedding_lr_ratio x lr, learned scales and biases at scale_lr_ratio x lr, every other
    trainable parameter at lr."""
    from mlx_localnorm.quant.train import QATConfig, QATTrainer

    base, data = qat_fixture(tmp_path)
    lr = 1e-3
    trainer = QATTrainer(QATConfig(
        model=str(base), data=str(data), bits=2, group_size=32, batch_size=2, seq_len=16,
        total_steps=1, warmup_steps=0, learning_rate=lr, eval_every=0, save_every=0,
        progress=False, learn_scales=True, scale_lr_ratio=scale_ratio,
        embedding_lr_ratio=embedding_ratio, out_dir=str(tmp_path / "r")))
    before = {k: np.array(v) for k, v in tree_flatten(trainer.model.trainable_parameters())}
    assert trainer._current_lr() == pytest.approx(lr)  # the logged rate is the peak one
    trainer.train_step()
    after = {k: np.array(v) for k, v in tree_flatten(trainer.model.trainable_parameters())}
    assert "model.embed_tokens.weight" in before and "model.embed_tokens.scales" in before
    for key in before:
        rate = np.sqrt(10) * lr * (embedding_ratio if key == "model.embed_tokens.weight" else
                     scale_ratio if key.endswith((".scales", ".biases")) else 1.0)
        step = np.abs(after[key].astype(np.float64) - before[key]).max()
        assert step == pytest.approx(rate, rel=1e-3), key


def test_embedding_lr_ratio_needs_a_quantized_embedding(tmp_path):
    """Width 64 and groups of 128: the MLP's down projection is quantized, the embedding is
    not, so the ratio would change nothing; say so."""
    from mlx_localnorm.quant.train import QATConfig, QATTrainer

    base, data = qat_fixture(tmp_path)
    config = QATConfig(model=str(base), data=str(data), bits=4, group_size=128, batch_size=2,
                       seq_len=16, total_steps=1, progress=False, embedding_lr_ratio=3.0,
                       out_dir=str(tmp_path / "r"))
    with pytest.raises(ValueError, match=r"embedding_lr_ratio=3 needs a quantized embedding.*"
                       r"multiple of group_size=128"):
        QATTrainer(config)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("name,needs", [("scale_lr_ratio", "learn_scales"),
                                        ("embedding_lr_ratio", "embeddings")])
def test_lr_ratios_need_their_group_and_a_positive_value(name, needs):
    from mlx_localnorm.quant.train import QATConfig

    with pytest.raises(ValueError, match=f"{name} applies with {needs} only"):
        QATConfig(model="m", **{needs: False, name: 0.1})
    for bad in (0.0, -1.0, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match=f"{name} must be a positive number, got "
                           f"{bad!r}"):
            QATConfig(model="m", learn_scales=True, **{name: bad})


def test_scale_init_mse_starts_every_layer_from_its_mse_ranges(tmp_path):
    """qat --scale-init mse: before the first step each quantized layer's scales and biases
    are mse_scales_biases of its float weight (the embedding too); min-max is the default."""
    from mlx_localnorm.quant.train import QATConfig, QATTrainer

    base, data = qat_fixture(tmp_path)
    float_weights = dict(tree_flatten(mlx_lm.load(str(base), trust_remote_code=True)[0]
                                      .parameters()))
    for init in ("mse", "minmax"):
        trainer = QATTrainer(QATConfig(
            model=str(base), data=str(data), bits=2, group_size=32, batch_size=2, seq_len=16,
            total_steps=1, progress=False, learn_scales=True, scale_init=init,
            out_dir=str(tmp_path / init)))
        layers = qat_layers(trainer.model)
        assert "model.embed_tokens" in layers and len(layers) > 1
        for path, layer in layers.items():
            w = float_weights[f"{path}.weight"]
            want = mse_scales_biases(w, 32, 2) if init == "mse" else mx.quantize(w, 32, 2)[1:]
            for got, expected in zip((layer.scales, layer.biases), want):
                np.testing.assert_array_equal(np.array(got), np.array(expected), err_msg=path)


def test_scale_init_is_checked():
    from mlx_localnorm.quant.train import QATConfig

    with pytest.raises(ValueError, match="scale_init must be one of .* got 'least-squares'"):
        QATConfig(model="m", learn_scales=True, scale_init="least-squares")
    with pytest.raises(ValueError, match="scale_init='mse' applies with learn_scales only"):
        QATConfig(model="m", scale_init="mse")


def test_average_last_must_fit_in_the_run():
    from mlx_localnorm.quant.train import QATConfig

    with pytest.raises(ValueError, match="average_last must be <= total_steps=10, got 11"):
        QATConfig(model="m", total_steps=10, average_last=11)
    with pytest.raises(ValueError, match="average_last must be >= 0, got -1"):
        QATConfig(model="m", average_last=-1)
    with pytest.raises(TypeError, match="average_last must be an int, got 2.5"):
        QATConfig(model="m", average_last=2.5)


@pytest.mark.parametrize("argv,status,message", [
    (["--bits", "7"], 2, "bits must be one of [1, 2, 3, 4, 5, 6, 8] for mode='affine', got 7"),
    (["--mode", "mxfp4", "--group-size", "64"], 2, "group_size must be one of [32]"),
    (["--total-steps", "0"], 2, "total_steps must be >= 1, got 0"),
    (["--model", "/nonexistent/model"], 1, "does not exist"),
])
def test_qat_command_user_errors_are_one_line(tmp_path, capsys, argv, status, message):
    from mlx_localnorm.quant.command import main

    base, data = qat_fixture(tmp_path)
    assert main(["--model", str(base), "--data", str(data), "--out", str(tmp_path / "o"),
                 *argv]) == status
    err = capsys.readouterr().err
    assert err.startswith("mlx-localnorm qat: error:") and message in err
    assert err.count("\n") == 1
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_qat_refuses_an_already_quantized_model(tmp_path, capsys):
    from mlx_localnorm.quant.command import main

    base, data = qat_fixture(tmp_path)
    quantized = save(prepare_qat(tiny(), 4, 64), tiny_tokenizer(), tmp_path / "q")
    assert main(["--model", str(quantized), "--data", str(data), "--out",
                 str(tmp_path / "o")]) == 1
    assert "already quantized; QAT starts from float weights" in capsys.readouterr().err


def test_distillation_loss_is_kl_teacher_to_student_in_float64():
    from mlx_localnorm.quant.train import distillation

    rng = np.random.default_rng(0)
    student, teacher = rng.normal(size=(2, 3, 7)) * 2, rng.normal(size=(2, 3, 7)) * 2
    mask = np.array([[1, 1, 0], [0, 1, 1]], np.float32)  # e.g. prompt tokens and padding out

    def log_softmax(z):
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    p, log_p, log_q = np.exp(log_softmax(teacher)), log_softmax(teacher), log_softmax(student)
    want = ((p * (log_p - log_q)).sum(-1) * mask).sum() / mask.sum()
    got = distillation(lambda x: mx.array(student, dtype=mx.float32), None,
                       mx.array(teacher, dtype=mx.float32), mx.array(mask))
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_qat_on_fine_tuning_jsonl_masks_prompts_in_the_held_out_loss(tmp_path, capsys):
    from mlx_localnorm.quant.command import main
    from mlx_localnorm.quant.train import QATData, held_out_loss

    base, _ = qat_fixture(tmp_path)
    data = tmp_path / "sft"
    data.mkdir()
    for split, n in (("train", 12), ("valid", 4)):
        lines = [json.dumps({"prompt": f"w{i % 30} w{(i + 1) % 30}",
                             "completion": f" w{(i + 2) % 30} w{(i + 3) % 30}"})
                 for i in range(n)]
        (data / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    model, tokenizer = mlx_lm.load(str(base), trust_remote_code=True)
    held_out = QATData(str(data), tokenizer, batch_size=4, seq_len=16, seed=0)
    inputs, targets, mask = next(held_out.held_out(1))
    logits = np.array(model(inputs), np.float64)
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_probs, np.array(targets)[..., None], -1)[..., 0]
    m = np.array(mask, np.float64)
    assert 0 < m.sum() < (np.array(targets) > 0).sum()  # prompts are masked out
    np.testing.assert_allclose(held_out_loss(model, held_out, 1), (nll * m).sum() / m.sum(),
                               rtol=1e-5)
    assert main(["--model", str(base), "--data", str(data), "--out", str(tmp_path / "o"),
                 "--total-steps", "2", *SMALL]) == 0
    assert "not run here on fine-tuning JSONL" in capsys.readouterr().out


def test_held_out_zero_batches_means_every_sequence_and_tokens_are_counted(tmp_path):
    """eval_batches=0 scores every held-out sequence, the ones that do not fill a last batch
    too; the token count is what was scored (not batches x batch x length, which overstates
    it when fewer batches exist)."""
    from mlx_localnorm.quant.train import QATConfig, QATData, held_out_loss

    base, data = qat_fixture(tmp_path)
    model, tokenizer = mlx_lm.load(str(base), trust_remote_code=True)
    held_out = QATData(str(data), tokenizer, batch_size=4, seq_len=16, seed=0)
    sequences = (len(held_out.tokens.valid) - 1) // 16
    everything = sequences * 16
    assert sequences >= 6 and sequences % 4 != 0  # a smaller last batch exists
    assert [len(inputs) for inputs, _, _ in held_out.held_out(0)][-1] == sequences % 4
    assert held_out.held_out_tokens(0) == everything
    assert held_out.held_out_tokens(10_000) == everything
    assert held_out.held_out_tokens(1) == 64
    valid = held_out.tokens.valid[:everything + 1]
    logits = np.array(model(mx.array(valid[:-1].reshape(-1, 16))), np.float64)
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    targets = valid[1:].reshape(-1, 16)
    want = -np.take_along_axis(log_probs, targets[..., None], -1).mean()
    np.testing.assert_allclose(held_out_loss(model, held_out, 0), want, rtol=1e-5)
    assert QATConfig(model="m", eval_batches=0).eval_batches == 0
    with pytest.raises(ValueError, match="eval_batches must be >= 0, got -1"):
        QATConfig(model="m", eval_batches=-1)


@pytest.mark.parametrize("bits", [3, 4])
def test_table_scores_real_quantized_models_through_their_dequantized_weights(tmp_path,
                                                                               bits):
    """The table's loss of mlx-lm's PTQ model equals the real quantized model's loss."""
    from mlx_localnorm.quant.compare import evaluate, ptq_model
    from mlx_localnorm.quant.train import QATConfig, QATData, held_out_loss

    base, data = qat_fixture(tmp_path)
    config = QATConfig(model=str(base), data=str(data), bits=bits, group_size=32,
                       batch_size=2, seq_len=16, eval_batches=3)
    held_out = QATData(config.data, mlx_lm.load(str(base), trust_remote_code=True)[1], 2,
                       16, 0)
    real = ptq_model(config)
    assert type(real.model.embed_tokens) is nn.QuantizedEmbedding
    want = held_out_loss(real, held_out, 3)
    float_model = mlx_lm.load(str(base), trust_remote_code=True)[0]
    assert abs(want - held_out_loss(float_model, held_out, 3)) > 1e-3  # quantization shows
    np.testing.assert_allclose(evaluate(ptq_model(config), config, held_out), want,
                               rtol=1e-6)
