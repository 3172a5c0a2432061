"""Per-layer diagnostics: each statistic against float64 NumPy on hand-made cases, and the
hooks read the hidden states where the docs say (blocks replaced by known maps)."""

import json
import math
import shutil

import mlx_localnorm as ln
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_localnorm.study import diagnose as dg


# ---------------------------------------------------------------------- statistics
def test_rms_of_a_known_tensor():
    h = np.array([[[3.0, 4.0], [0.0, 0.0]]])
    assert dg.rms(h) == pytest.approx(math.sqrt((9 + 16) / 4), rel=1e-15)
    rng = np.random.default_rng(0)
    h = rng.normal(size=(2, 5, 7)) * 3
    assert dg.rms(h) == pytest.approx(np.sqrt((h.astype(np.float64) ** 2).sum() / h.size))


def test_cosine_identical_tokens_is_one_orthogonal_zero_opposite_minus_one():
    v = np.array([0.3, -1.2, 2.0, 0.5])
    same = np.tile(v, (2, 6, 1)) * np.arange(1, 7)[None, :, None]  # scales do not matter
    assert dg.mean_pairwise_cosine(same) == pytest.approx(1.0, abs=1e-14)
    orthogonal = np.eye(5)[None] * 7.0
    assert dg.mean_pairwise_cosine(orthogonal) == pytest.approx(0.0, abs=1e-15)
    opposite = np.stack([v, -v])[None]
    assert dg.mean_pairwise_cosine(opposite) == pytest.approx(-1.0, abs=1e-14)


def test_cosine_averages_pairs_within_each_sequence_then_sequences():
    rng = np.random.default_rng(1)
    h = rng.normal(size=(3, 5, 4))
    per_sequence = []
    for seq in h:
        cos = [seq[i] @ seq[j] / (np.linalg.norm(seq[i]) * np.linalg.norm(seq[j]))
               for i in range(5) for j in range(5) if i != j]
        per_sequence.append(np.mean(cos))
    assert dg.mean_pairwise_cosine(h) == pytest.approx(np.mean(per_sequence), rel=1e-12)
    # Sequence 0 identical tokens, sequence 1 orthogonal ones: the mean of 1 and 0.
    mixed = np.stack([np.ones((4, 4)), np.eye(4)])
    assert dg.mean_pairwise_cosine(mixed) == pytest.approx(0.5, abs=1e-14)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        dg.mean_pairwise_cosine(np.ones((2, 1, 4)))


@pytest.mark.parametrize("theta", [0.0, 1e-7, 0.3, math.pi / 2, 2.5, math.pi - 1e-7])
def test_angle_of_a_known_rotation(theta):
    rng = np.random.default_rng(2)
    a = rng.normal(size=(6, 2)) * rng.uniform(0.1, 10, size=(6, 1))
    rotation = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    b = 3.0 * a @ rotation.T
    np.testing.assert_allclose(dg.angles(a, b), theta, atol=1e-12)


# ---------------------------------------------------------------------- hooks on a model
ARGS = dict(vocab_size=32, hidden_size=8, num_hidden_layers=3, num_attention_heads=2,
            intermediate_size=16)


def tiny_model(placement="pre", **kw):
    mx.random.seed(0)
    return ln.Model(ln.ModelArgs(**{**ARGS, "placement": placement, "norm_type": "rmsnorm",
                                    **kw}))


class Map(nn.Module):
    """A block that applies a fixed function (and has no parameters)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def __call__(self, x, mask=None, cache=None):
        return self.fn(x)


def tokens():
    return mx.array(np.random.default_rng(3).integers(0, 32, size=(2, 7)).astype(np.int32))


def embedded(model, inputs):
    return np.array(model.model.embed_tokens.weight, dtype=np.float64)[np.array(inputs)]


def test_identity_blocks_give_speed_zero_and_every_state_the_embeddings():
    model = tiny_model()
    model.model.layers = [Map(lambda x: x) for _ in range(3)]
    inputs = tokens()
    states = dg.hidden_states(model, inputs)
    assert len(states) == 4
    for h in states:
        np.testing.assert_array_equal(h, embedded(model, inputs))
    rows = dg.measure(model, optim.SGD(learning_rate=0.1), inputs, inputs)
    speeds = [r["value"] for r in rows if r["metric"] == "speed"]
    assert speeds == [0.0, 0.0, 0.0]
    assert [r["value"] for r in rows if r["metric"] == "grad_norm"] == [0.0, 0.0, 0.0]


def test_rotating_and_scaling_blocks_give_their_angle_and_rms():
    theta = 0.4
    plane = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    rotation = np.kron(np.eye(4), plane)  # rotates every vector of R^8 by exactly theta
    r = mx.array(rotation.T.astype(np.float32))
    model = tiny_model()
    model.model.layers = [Map(lambda x: x @ r), Map(lambda x: 2.0 * x), Map(lambda x: x @ r)]
    inputs = tokens()
    h0 = embedded(model, inputs)
    states = dg.hidden_states(model, inputs)
    np.testing.assert_allclose(states[1], h0 @ rotation.T, atol=1e-6)
    np.testing.assert_allclose(states[3], 2 * h0 @ rotation.T @ rotation.T, atol=1e-5)
    rows = dg.measure(model, optim.SGD(learning_rate=0.1), inputs, inputs)
    speed = [r["value"] for r in rows if r["metric"] == "speed"]
    np.testing.assert_allclose(speed, [theta, 0.0, theta], atol=1e-5)
    rms = [r["value"] for r in rows if r["metric"] == "hidden_rms"]
    base = np.sqrt(np.mean(h0**2))
    np.testing.assert_allclose(rms, [base, base, 2 * base, 2 * base], rtol=1e-5)
    layers = [r["layer"] for r in rows if r["metric"] == "hidden_rms"]
    assert layers == [0, 1, 2, 3]


@pytest.mark.parametrize("placement", ["pre", "post", "peri"])
def test_the_last_state_is_what_the_head_reads_and_the_blocks_are_restored(placement):
    model = tiny_model(placement)
    blocks = list(model.layers)
    inputs = tokens()
    states = dg.hidden_states(model, inputs)
    assert [id(b) for b in model.layers] == [id(b) for b in blocks]
    h = mx.array(states[-1].astype(np.float32))
    if "norm" in model.model:
        h = model.model.norm(h)
    np.testing.assert_allclose(np.array(model.model.embed_tokens.as_linear(h)),
                               np.array(model(inputs)), atol=1e-5)
    np.testing.assert_array_equal(states[0], embedded(model, inputs))


def test_tree_norm_and_per_block_gradient_norms():
    tree = {"a": mx.array([3.0, 4.0]), "b": {"c": [mx.array([[12.0]])]}}
    assert dg.tree_norm(tree) == pytest.approx(13.0)
    model = tiny_model()
    model.model.layers[1] = Map(lambda x: x)  # no parameters: a zero gradient norm
    inputs = tokens()
    norms = dg.layer_grad_norms(model, inputs, inputs)
    _, grads = nn.value_and_grad(model, lambda m, x, y: nn.losses.cross_entropy(
        m(x), y, reduction="mean"))(model, inputs, inputs)
    expected = [np.sqrt(sum(np.sum(np.array(g, dtype=np.float64) ** 2)
                            for _, g in tree_flatten(grads["model"]["layers"][i])))
                for i in (0, 2)]
    assert norms[1] == 0.0
    np.testing.assert_allclose([norms[0], norms[2]], expected, rtol=1e-6)


@pytest.mark.parametrize("clip_fraction", [0.0, 0.5])
def test_update_rms_of_one_sgd_step_and_weights_restored(clip_fraction):
    model = tiny_model()
    inputs = tokens()
    before = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    _, grads = nn.value_and_grad(model, lambda m, x, y: nn.losses.cross_entropy(
        m(x), y, reduction="mean"))(model, inputs, inputs)
    flat = {k: np.array(v, dtype=np.float64) for k, v in tree_flatten(grads)}
    total = np.sqrt(sum(np.sum(g**2) for g in flat.values()))
    clip, scale = (clip_fraction * total, clip_fraction) if clip_fraction else (0.0, 1.0)
    rows = dg.update_rms(model, optim.SGD(learning_rate=0.1), inputs, inputs, grad_clip=clip)
    matrices = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    assert {(b, m) for b, m, _ in rows} == {(b, m) for b in (1, 2, 3) for m in matrices}
    for block, matrix, value in rows:
        g = flat[f"model.layers.{block - 1}.{matrix}.weight"]
        assert value == pytest.approx(0.1 * scale * np.sqrt(np.mean(g**2)), rel=1e-3)
    for k, v in tree_flatten(model.parameters()):
        np.testing.assert_array_equal(np.array(v), before[k])


# ---------------------------------------------------------------------- the command
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished 4-step run (2 blocks) of the embedded corpus."""
    out = tmp_path_factory.mktemp("run")
    config = ln.train.PretrainConfig(
        out_dir=str(out), vocab_size=512, hidden_size=32, num_layers=2, num_heads=2,
        seq_len=32, batch_size=4, steps=4, eval_every=2, eval_batches=1, save_every=2,
        warmup_steps=1, sample_tokens=0, progress=False, optimizer="muon", seed=3)
    ln.train.Pretrainer(config).run()
    return out


def test_diagnose_command_on_a_run_directory(run_dir, tmp_path):
    from mlx_localnorm.cli import main

    out = tmp_path / "diag"
    assert main(["diagnose", str(run_dir), "--out", str(out), "--batch-size", "2",
                 "--seq-len", "16"]) == 0
    rows = dg.read_rows(out / "diagnostics.csv")
    assert (out / "diagnostics.png").stat().st_size > 0
    for stage in dg.STAGES:
        got = {(r["metric"], r["layer"]) for r in rows if r["stage"] == stage and not r["matrix"]}
        assert got == ({("hidden_rms", l) for l in range(3)} | {("cosine", l) for l in range(3)}
                       | {("speed", l) for l in (1, 2)} | {("grad_norm", l) for l in (1, 2)})
        assert len([r for r in rows if r["stage"] == stage and r["metric"] == "update_rms"]) == 14
    init, trained = ({(r["metric"], r["layer"], r["matrix"]): r["value"] for r in rows
                      if r["stage"] == stage} for stage in dg.STAGES)
    assert init[("hidden_rms", 0, "")] != trained[("hidden_rms", 0, "")]  # embeddings trained


def test_the_init_model_is_the_runs_step_zero_model(run_dir):
    subject = dg.load_subject(run_dir)
    mx.random.seed(3)  # the run's seed, then the model, as the trainer does
    config = ln.train.PretrainConfig.from_dict(
        json.loads((run_dir / "train_config.json").read_text()))
    fresh = ln.Model(config.model_args(512))
    for (k, a), (_, b) in zip(tree_flatten(subject.models["init"].parameters()),
                              tree_flatten(fresh.parameters())):
        np.testing.assert_array_equal(np.array(a), np.array(b), err_msg=k)


def test_diagnose_errors_are_one_line(tmp_path, capsys):
    from mlx_localnorm.cli import main

    assert main(["diagnose", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "neither a run directory" in err
    assert main(["diagnose", str(tmp_path), "--seq-len", "1"]) == 2
    assert "--seq-len must be >= 2" in capsys.readouterr().err


def test_diagnose_an_mlx_lm_model_directory(run_dir, tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for path in run_dir.iterdir():  # the exported model without the run's files
        if path.is_file() and (path.name.startswith(("config", "model", "tokenizer"))
                               or path.suffix == ".py"):
            shutil.copy(path, model_dir / path.name)
    rows = dg.diagnose_dir(model_dir, batch_size=2, seq_len=16)
    assert {r["stage"] for r in rows} == set(dg.STAGES)
    assert {r["label"] for r in rows} == {"model"}
    assert len([r for r in rows if r["metric"] == "speed"]) == 2 * 2
