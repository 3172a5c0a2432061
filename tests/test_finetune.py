"""Fine-tuning: modes (which parameters train), adapters mlx-lm loads, fuse, the finetune run.

Expected trainable sets and counts are built here from the model's shapes (LoRA: r * (in + out)
per Linear, DoRA: + out; norms: every 1-D parameter of these bias-free tiny models), never
read back from the package.
"""

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import mlx_lm
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map
from mlx_lm.models import llama
from mlx_lm.utils import save_config
from mlx_lm.utils import save_model as mlx_lm_save_weights
from test_cli import assert_one_line_error, run_in_process
from test_models import TOKENS, VOCAB, tiny_model, tiny_tokenizer

from mlx_localnorm.models import save_model
from mlx_localnorm.train.adapters import (MODES, apply_mode, fuse_adapters, load_adapter,
                                          norm_parameter_names, parameter_counts, save_adapter)
from mlx_localnorm.train.finetune import FinetuneConfig, Finetuner, resume_config
from mlx_localnorm.train.fuse import fuse

LORA = {"rank": 3, "scale": 4.0, "dropout": 0.0}
# Tiny models whose norms differ in what they hold: SeeDNorm (weight, alpha, beta) in Peri-LN,
# DyT (scalar alpha), LayerNorm + QK-norm, and nGPT (no norm layers, only scale vectors).
NORM_MODELS = {
    "seednorm-peri": dict(norm_type="seednorm", placement="peri"),
    "dyt-pre": dict(norm_type="dyt", placement="pre"),
    "layernorm-qk": dict(norm_type="layernorm", placement="sandwich", qk_norm="rmsnorm"),
    "ngpt": dict(norm_type=None, placement="ngpt"),
}
LLAMA = dict(model_type="llama", hidden_size=32, num_hidden_layers=2, intermediate_size=64,
             num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=VOCAB,
             tie_word_embeddings=True)


def flat(tree) -> dict:
    return dict(tree_flatten(tree))


def numpy_params(model) -> dict:
    return {k: np.array(v) for k, v in flat(model.parameters()).items()}


def train_steps(model, steps=3, lr=1e-2):
    """A few AdamW steps (with weight decay) on next-token loss over TOKENS."""
    opt = optim.AdamW(learning_rate=lr, weight_decay=0.1)

    def loss_fn(model):
        logits = model(TOKENS[:, :-1])
        return nn.losses.cross_entropy(logits, TOKENS[:, 1:], reduction="mean")

    model.train()
    for _ in range(steps):
        _, grads = nn.value_and_grad(model, loss_fn)(model)
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state)
    model.eval()


def perturb_trainable(model, seed=1):
    """Move every trainable parameter (LoRA's B starts at 0, which would hide a lost update)."""
    mx.random.seed(seed)
    model.update(tree_map(lambda p: p + 0.1 * mx.random.normal(p.shape),
                          model.trainable_parameters()))


def saved_localnorm(tmp_path, name="base", **overrides) -> Path:
    path = tmp_path / name
    save_model(tiny_model(**overrides), tiny_tokenizer(), path)
    return path


def saved_llama(tmp_path, name="llama", **overrides) -> Path:
    path = tmp_path / name
    args = {**LLAMA, **overrides}
    mx.random.seed(0)
    mlx_lm_save_weights(path, llama.Model(llama.ModelArgs(**args)))
    save_config(args, path / "config.json")
    tiny_tokenizer().save_pretrained(str(path))
    return path


def load(path, adapter_path=None):
    model, _ = mlx_lm.load(str(path), adapter_path=None if adapter_path is None
                           else str(adapter_path), trust_remote_code=True)
    return model


# ---- which parameters train ----------------------------------------------------------------

@pytest.mark.parametrize("mode", ["lora", "dora"])
@pytest.mark.parametrize("num_layers", [1, 2])
def test_lora_trains_only_adapter_parameters_counted_from_shapes(mode, num_layers):
    model = tiny_model()
    base = numpy_params(model)
    blocks = range(2 - num_layers, 2)
    linears = {k[:-len(".weight")]: v.shape for k, v in base.items() for i in blocks
               if k.startswith(f"model.layers.{i}.") and v.ndim == 2}
    assert len(linears) == 7 * num_layers  # q, k, v, o, gate, up, down per block
    leaves = ("lora_a", "lora_b") + (("m",) if mode == "dora" else ())
    expected = {f"{name}.{leaf}" for name in linears for leaf in leaves}
    count = sum(3 * (i + o) + (o if mode == "dora" else 0) for o, i in linears.values())

    apply_mode(model, mode, num_layers=num_layers, lora_parameters=LORA)
    assert set(flat(model.trainable_parameters())) == expected
    trainable, total = parameter_counts(model)
    assert (trainable, total) == (count, sum(v.size for v in base.values()))

    perturb_trainable(model)
    adapters = numpy_params(model)
    train_steps(model)
    after = numpy_params(model)
    for name, value in base.items():  # the base weights sit under .linear in a LoRA layer
        layer = name.rsplit(".", 1)[0]
        kept = f"{layer}.linear.weight" if layer in linears else name
        assert np.array_equal(after[kept], value), name
    assert all(not np.array_equal(after[k], adapters[k]) for k in expected)


@pytest.mark.parametrize("case", list(NORM_MODELS))
def test_norms_mode_moves_norm_parameters_and_nothing_else(case):
    model = tiny_model(**NORM_MODELS[case])
    before = numpy_params(model)
    # These tiny models have no biases: their 1-D parameters are exactly the norm parameters.
    norms = {k for k, v in before.items() if v.ndim == 1}
    assert norms and set(norm_parameter_names(model)) == norms

    apply_mode(model, "norms")
    assert set(flat(model.trainable_parameters())) == norms
    trainable, total = parameter_counts(model)
    assert trainable == sum(before[k].size for k in norms)
    assert total == sum(v.size for v in before.values())

    train_steps(model)
    after = numpy_params(model)
    for name in before.keys() - norms:
        assert np.array_equal(after[name], before[name]), name
    assert all(not np.array_equal(after[k], before[k]) for k in norms)


@pytest.mark.parametrize("norm, which, leaves", [
    ("seednorm", "gains", {"weight"}),  # SeeDNorm has no bias
    ("dyt", "all", {"alpha", "weight", "bias"}),
    ("dyt", "gains", {"weight", "bias"}),
    ("dyt", "weight", {"weight"}),
])
def test_norms_mode_subsets(norm, which, leaves):
    model = tiny_model(norm_type=norm, placement="peri")
    apply_mode(model, "norms", norm_params=which)
    names = set(flat(model.trainable_parameters()))
    assert names and {n.rsplit(".", 1)[1] for n in names} == leaves
    norms = {n.rsplit(".", 1)[0] for n in norm_parameter_names(model)}
    assert {n.rsplit(".", 1)[0] for n in names} == norms  # every norm layer, not a few


def test_full_mode_trains_everything():
    model = tiny_model()
    apply_mode(model, "full")
    assert flat(model.trainable_parameters()).keys() == flat(model.parameters()).keys()


@pytest.mark.parametrize("kwargs, match", [
    (dict(mode="qlora"), "mode must be one of"),
    (dict(mode="lora", num_layers=0), r"num_layers must be an int in \[1, 2\]"),
    (dict(mode="lora", num_layers=3), "got 3"),
    (dict(mode="lora", num_layers=True), "got True"),
    (dict(mode="lora", lora_parameters={"rank": 0}), "rank must be a positive int, got 0"),
    (dict(mode="dora", lora_parameters={"dropout": 1.0}), r"dropout must be a number in \[0"),
    (dict(mode="lora", lora_parameters={"scale": float("nan")}), "scale must be a finite"),
    (dict(mode="norms", num_layers=1), "apply to lora and dora only"),
    (dict(mode="full", lora_parameters={"rank": 4}), "apply to lora and dora only"),
    (dict(mode="norms", norm_params="alpha"), "norm_params must be one of"),
    (dict(mode="lora", norm_params="gains"), "norm_params applies to mode 'norms' only"),
])
def test_bad_mode_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        apply_mode(tiny_model(), **kwargs)


def test_norms_mode_refuses_a_model_without_norms():
    class NoNorms(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = [nn.Linear(4, 4)]

    with pytest.raises(ValueError, match="NoNorms has no norm layer of a known type"):
        apply_mode(NoNorms(), "norms")


# ---- adapters through mlx-lm, and fuse -----------------------------------------------------

def adapter_options(mode):
    return {"num_layers": 1, "lora_parameters": LORA} if mode in ("lora", "dora") else {}


@pytest.mark.parametrize("kind", ["localnorm", "llama"])
@pytest.mark.parametrize("mode", MODES)
def test_adapter_round_trips_through_mlx_lm_load_and_fuses(tmp_path, kind, mode):
    if kind == "localnorm":
        base = saved_localnorm(tmp_path, norm_type="seednorm", placement="peri")
    else:
        base = saved_llama(tmp_path)
    model = load(base)
    config = apply_mode(model, mode, **adapter_options(mode))
    perturb_trainable(model)
    model.eval()
    want = model(TOKENS)
    save_adapter(model, config, tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "adapter_config.json", "adapters.safetensors"]
    saved = mx.load(str(tmp_path / "adapter" / "adapters.safetensors"))
    assert saved.keys() == flat(model.trainable_parameters()).keys()

    adapted = load(base, tmp_path / "adapter")
    assert np.array_equal(np.array(adapted(TOKENS)), np.array(want))

    fuse(base, tmp_path / "adapter", tmp_path / "fused")
    fused = load(tmp_path / "fused")
    names = set(flat(fused.parameters()))
    assert names == set(flat(load(base).parameters()))  # no LoRA layer left
    got, want = np.array(fused(TOKENS), np.float64), np.array(want, np.float64)
    if mode in ("lora", "dora"):  # W + s B^T A^T in one matrix: float32 rounding only
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    else:
        assert np.array_equal(got, want)


def test_fused_lora_weights_are_w_plus_scaled_product(tmp_path):
    """The fused matrix, in float64 from the saved adapter: W + scale * B^T A^T."""
    base = saved_localnorm(tmp_path)
    model = load(base)
    config = apply_mode(model, "lora", **adapter_options("lora"))
    perturb_trainable(model)
    save_adapter(model, config, tmp_path / "adapter")
    fuse(base, tmp_path / "adapter", tmp_path / "fused")
    name = "model.layers.1.mlp.down_proj"
    w = np.array(mx.load(str(base / "model.safetensors"))[f"{name}.weight"], np.float64)
    lora = mx.load(str(tmp_path / "adapter" / "adapters.safetensors"))
    a, b = (np.array(lora[f"{name}.lora_{x}"], np.float64) for x in "ab")
    fused = np.array(mx.load(str(tmp_path / "fused" / "model.safetensors"))[f"{name}.weight"])
    np.testing.assert_allclose(fused, w + LORA["scale"] * b.T @ a.T, rtol=0, atol=1e-6)


def test_fuse_writes_nothing_when_the_adapter_does_not_fit(tmp_path):
    base = saved_localnorm(tmp_path, norm_type="seednorm", placement="peri")
    model = load(base)
    save_adapter(model, apply_mode(model, "norms"), tmp_path / "adapter")
    other = saved_localnorm(tmp_path, "rms", norm_type="rmsnorm", placement="peri")
    with pytest.raises(ValueError, match="does not fit this Model: .*alpha"):
        fuse(other, tmp_path / "adapter", tmp_path / "fused")
    assert not (tmp_path / "fused").exists()


@pytest.mark.parametrize("mode", ["lora", "norms"])
def test_an_adapter_of_another_width_is_a_clear_error(tmp_path, mode):
    model = tiny_model()
    save_adapter(model, apply_mode(model, mode, **adapter_options(mode)), tmp_path / "a")
    wider = tiny_model(hidden_size=48)
    with pytest.raises(ValueError, match=r"adapter .* does not fit this Model: .*shape"):
        load_adapter(wider, tmp_path / "a")


def test_a_lora_adapter_missing_tensors_is_an_error(tmp_path):
    model = tiny_model()
    save_adapter(model, apply_mode(model, "lora", **adapter_options("lora")), tmp_path / "a")
    weights = mx.load(str(tmp_path / "a" / "adapters.safetensors"))
    dropped = sorted(weights)[0]
    del weights[dropped]
    mx.save_safetensors(str(tmp_path / "a" / "adapters.safetensors"), weights)
    with pytest.raises(ValueError, match=f"lacks 1 adapter tensors, e.g. {dropped}"):
        load_adapter(tiny_model(), tmp_path / "a")


def test_an_adapter_directory_without_its_files_is_an_error(tmp_path):
    (tmp_path / "a").mkdir()
    with pytest.raises(FileNotFoundError, match="adapter_config.json does not exist"):
        load_adapter(tiny_model(), tmp_path / "a")


def test_norms_adapter_is_small_and_marked(tmp_path):
    model = tiny_model(norm_type="seednorm", placement="peri")
    save_adapter(model, apply_mode(model, "norms"), tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "full" and config["localnorm_mode"] == "norms"
    assert set(mx.load(str(tmp_path / "a" / "adapters.safetensors"))) == set(
        k for k, v in flat(model.parameters()).items() if v.ndim == 1)


def test_fuse_adapters_without_lora_layers_changes_nothing():
    model = tiny_model()
    before = numpy_params(model)
    fuse_adapters(model)
    assert all(np.array_equal(v, before[k]) for k, v in numpy_params(model).items())


# ---- the finetune run -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A saved tiny SeeDNorm model and a completions data set in its words (reverse a list)."""
    root = tmp_path_factory.mktemp("finetune")
    save_model(tiny_model(norm_type="seednorm", placement="peri"), tiny_tokenizer(),
               root / "base")
    rng = np.random.default_rng(0)
    (root / "data").mkdir()
    for split, count in (("train", 24), ("valid", 6)):
        with open(root / "data" / f"{split}.jsonl", "w") as f:
            for _ in range(count):
                words = [f"w{i}" for i in rng.integers(2, VOCAB - 2, rng.integers(2, 6))]
                f.write(json.dumps({"prompt": " ".join(words),
                                    "completion": " " + " ".join(reversed(words))}) + "\n")
    return root


def run_config(setup, out, **overrides) -> FinetuneConfig:
    values = dict(model=str(setup / "base"), data=str(setup / "data"), out_dir=str(out),
                  steps=6, batch_size=4, eval_every=3, eval_batches=1, save_every=3,
                  warmup_steps=1, learning_rate=1e-2, progress=False)
    return FinetuneConfig(**{**values, **overrides})


MODE_OPTIONS = {"lora": dict(rank=4, num_layers=1, dropout=0.1), "dora": dict(rank=2),
                "norms": {}, "full": {}}


@pytest.mark.parametrize("mode", MODES)
def test_finetune_writes_an_adapter_mlx_lm_applies(setup, tmp_path, mode):
    trainer = Finetuner(run_config(setup, tmp_path / "run", mode=mode, **MODE_OPTIONS[mode]))
    summary = trainer.run()
    assert summary["step"] == 6 and not summary["interrupted"]
    trainer.model.eval()
    adapted = load(setup / "base", tmp_path / "run")
    assert np.array_equal(np.array(adapted(TOKENS)), np.array(trainer.model(TOKENS)))
    base = numpy_params(load(setup / "base"))
    saved = mx.load(str(tmp_path / "run" / "adapters.safetensors"))
    if mode == "norms":  # only the norm parameters are saved, and nothing else moved
        norms = {k for k, v in base.items() if v.ndim == 1}
        assert set(saved) == norms
        after = numpy_params(trainer.model)
        assert all(np.array_equal(after[k], base[k]) for k in base.keys() - norms)
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4, 5, 6]
    assert all("val_loss" in records[i] for i in (0, 3, 6))
    assert (tmp_path / "run" / "loss.png").is_file()


@pytest.mark.parametrize("mode", ["lora", "norms"])
def test_resume_equals_uninterrupted(setup, tmp_path, mode):
    """Stopped after step 3 (as Ctrl-C does) and resumed: every later loss and the adapter
    equal the uninterrupted run's bit for bit (LoRA with dropout: the random key is restored)."""
    options = MODE_OPTIONS[mode]
    Finetuner(run_config(setup, tmp_path / "straight", mode=mode, **options)).run()
    first = Finetuner(run_config(setup, tmp_path / "resumed", mode=mode, **options))
    assert first.run(until=3)["interrupted"]
    Finetuner(resume_config(tmp_path / "resumed"), resume=True).run()
    for name in ("metrics.jsonl",):
        losses = [[(r["step"], r.get("loss"), r.get("val_loss")) for r in map(json.loads, open(
            tmp_path / run / name))] for run in ("straight", "resumed")]
        assert losses[0] == losses[1]
    want, got = (mx.load(str(tmp_path / run / "adapters.safetensors"))
                 for run in ("straight", "resumed"))
    assert want.keys() == got.keys()
    assert all(np.array_equal(np.array(want[k]), np.array(got[k])) for k in want)


@pytest.mark.parametrize("until", [2, 4])
def test_an_interrupted_run_leaves_the_adapter_of_its_last_step(setup, tmp_path, until):
    """Stopped (as Ctrl-C does) after step 2 (no periodic save yet) or 4 (after the step-3
    save): the out dir already loads with mlx_lm.load(adapter_path=...) and gives the model
    of the stopped step, not of an earlier checkpoint."""
    trainer = Finetuner(run_config(setup, tmp_path / "run", mode="lora",
                                   **MODE_OPTIONS["lora"]))
    assert trainer.run(until=until)["interrupted"]
    trainer.model.eval()
    adapted = load(setup / "base", tmp_path / "run")
    assert np.array_equal(np.array(adapted(TOKENS)), np.array(trainer.model(TOKENS)))
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.startswith(".")) == []


# ---- the commands' bad input ----------------------------------------------------------------

@pytest.fixture
def bad_inputs(setup, tmp_path):
    """A directory without config.json, one mlx-lm cannot read, malformed data."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "unknown").mkdir()
    (tmp_path / "unknown" / "config.json").write_text(json.dumps({"model_type": "nosuch"}))
    mx.save_safetensors(str(tmp_path / "unknown" / "model.safetensors"), {"w": mx.zeros(2)})
    (tmp_path / "bad.jsonl").write_text('{"text": "w2 w3"}\n{"text": \n')
    return tmp_path


@pytest.mark.parametrize("args, status, names", [
    ([], 2, ["model must name a model directory"]),
    (["--model", "{base}", "--mode", "qlora"], 2, ["mode must be one of", "qlora"]),
    (["--model", "{base}", "--mode", "norms", "--rank-x", "2"], 2, ["--rank-x"]),
    (["--model", "{base}", "--mode", "norms", "--num-layers", "1"], 2,
     ["num_layers apply to modes lora and dora only"]),
    (["--model", "{base}", "--scale", "2", "--alpha", "16"], 2, ["scale or alpha"]),
    (["--model", "{base}", "--steps", "0"], 2, ["steps must be a positive int, got 0"]),
    (["--model", "{tmp}/nothing"], 1, ["--model", "nothing does not exist"]),
    (["--model", "{tmp}/empty"], 1, ["--model", "not a model directory", "no config.json"]),
    (["--model", "{tmp}/unknown"], 1, ["--model: mlx_lm.load cannot read", "nosuch"]),
    (["--model", "{base}", "--data", "{tmp}/bad.jsonl"], 1, ["bad.jsonl:2", "not valid JSON"]),
    (["--model", "{base}", "--resume"], 2, ["--resume", "does not exist"]),
])
def test_finetune_bad_input_is_one_line(setup, bad_inputs, capsys, args, status, names):
    args = [a.format(base=setup / "base", tmp=bad_inputs) for a in args]
    proc = run_in_process(capsys, "finetune", "--data", setup / "data", "--steps", 1,
                          "--out-dir", bad_inputs / "run", "--no-progress", *args)
    assert proc.returncode == status
    assert_one_line_error(proc, *names)


def test_fuse_command_and_its_bad_input(setup, tmp_path, capsys):
    model = load(setup / "base")
    save_adapter(model, apply_mode(model, "lora", num_layers=1), tmp_path / "lora")
    wider = saved_localnorm(tmp_path, "wider", hidden_size=48)
    proc = run_in_process(capsys, "fuse", "--model", wider, "--adapter-path", tmp_path / "lora",
                          "--out", tmp_path / "fused")
    assert proc.returncode == 1
    assert_one_line_error(proc, "does not fit", "shape")
    assert not (tmp_path / "fused").exists()
    proc = run_in_process(capsys, "fuse", "--model", setup / "base", "--adapter-path",
                          tmp_path / "nothing", "--out", tmp_path / "fused")
    assert proc.returncode == 1
    assert_one_line_error(proc, "adapter_config.json does not exist")
    proc = run_in_process(capsys, "fuse", "--model", setup / "base")
    assert proc.returncode == 2
    assert_one_line_error(proc, "--adapter-path")
    proc = run_in_process(capsys, "fuse", "--model", setup / "base", "--adapter-path",
                          tmp_path / "lora", "--out", tmp_path / "fused")
    assert proc.returncode == 0, proc.stderr
    assert "mlx_lm.generate --model" in proc.stdout and (tmp_path / "fused").is_dir()


# ---- bench finetune -------------------------------------------------------------------------

BENCH_COLUMNS = ["machine", "device", "mlx", "trainer", "hidden", "layers", "vocab", "rank",
                 "lora_layers", "batch", "seq_len", "steps_timed", "rounds", "tokens_per_s",
                 "tokens_per_s_median", "peak_memory_mb", "tokens_per_s_vs_mlx_lm",
                 "median_vs_mlx_lm", "memory_vs_mlx_lm"]


def test_bench_finetune_writes_both_trainers(tmp_path, capsys):
    proc = run_in_process(capsys, "bench", "finetune", "--out", tmp_path, "--vocab", 300,
                          "--hidden", 32, "--layers", 2, "--heads", 2, "--lora-layers", 1,
                          "--batch", 2, "--seq-len", 24, "--examples", 6, "--steps", 3,
                          "--warmup", 1, "--rounds", 3)
    assert proc.returncode == 0, proc.stderr
    with open(tmp_path / "finetune.csv") as f:
        header, *rows = [line.strip().split(",") for line in f]
    assert header == BENCH_COLUMNS
    rows = {r[3]: dict(zip(header, r)) for r in rows}
    assert set(rows) == {"mlx-localnorm finetune", "mlx_lm.lora trainer"}
    ours, theirs = rows["mlx-localnorm finetune"], rows["mlx_lm.lora trainer"]
    for name, row in rows.items():  # best and median of the rounds the bench printed
        rounds = [float(line.rsplit(":", 1)[1].split()[0]) for line in proc.stdout.splitlines()
                  if line.strip().startswith("round") and name in line]
        assert len(rounds) == 3 and row["rounds"] == "3"
        assert abs(float(row["tokens_per_s"]) - max(rounds)) <= 1
        assert abs(float(row["tokens_per_s_median"]) - sorted(rounds)[1]) <= 1
    assert float(theirs["tokens_per_s_vs_mlx_lm"]) == float(theirs["median_vs_mlx_lm"]) == 1.0
    for speed, ratio in (("tokens_per_s", "tokens_per_s_vs_mlx_lm"),
                         ("tokens_per_s_median", "median_vs_mlx_lm")):
        want = float(ours[speed]) / float(theirs[speed])
        assert abs(float(ours[ratio]) - want) < 0.02 * want + 0.01
    assert float(ours["peak_memory_mb"]) > 0 and ours["steps_timed"] == "2"


@pytest.mark.parametrize("args, names", [
    (["--steps", 3, "--warmup", 3], ["--steps must be > --warmup"]),
    (["--lora-layers", 9], ["--lora-layers must be in [1, 8]"]),
    (["--rank", 0], ["--rank must be >= 1"]),
])
def test_bench_finetune_bad_arguments(tmp_path, capsys, args, names):
    proc = run_in_process(capsys, "bench", "finetune", "--out", tmp_path, *args)
    assert proc.returncode == 2
    assert_one_line_error(proc, *names)


@pytest.mark.parametrize("dequantize", [False, True])
def test_lora_on_a_quantized_model_fuses(tmp_path, dequantize):
    """QLoRA: LoRA on QuantizedLinear. --dequantize fuses into float weights (the adapter
    model's logits up to rounding); without it the fused layers are quantized again."""
    from mlx_lm.utils import quantize_model

    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs(**LLAMA))
    model, config = quantize_model(model, dict(LLAMA), group_size=32, bits=4)
    base = tmp_path / "q4"
    mlx_lm_save_weights(base, model)
    save_config(config, base / "config.json")
    tiny_tokenizer().save_pretrained(str(base))

    adapted = load(base)
    config = apply_mode(adapted, "lora", **adapter_options("lora"))
    perturb_trainable(adapted)
    save_adapter(adapted, config, tmp_path / "a")
    fuse(base, tmp_path / "a", tmp_path / "fused", dequantize=dequantize)
    fused_config = json.loads((tmp_path / "fused" / "config.json").read_text())
    assert ("quantization" in fused_config) != dequantize
    got = np.array(load(tmp_path / "fused")(TOKENS), np.float64)
    want = np.array(load(base, tmp_path / "a")(TOKENS), np.float64)
    if dequantize:
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    else:  # the fused sum is rounded to the 4-bit grid once more
        assert 0 < np.abs(got - want).max() < 0.5 * np.abs(want).max()


def test_only_the_package_model_file_is_trusted_without_the_flag(setup, tmp_path):
    import shutil

    from mlx_localnorm.train.model_dir import load_model_dir

    changed = tmp_path / "changed"
    shutil.copytree(setup / "base", changed)
    with open(changed / "localnorm_model.py", "a") as f:
        f.write("# edited\n")
    with pytest.raises(ValueError, match="--model: mlx_lm.load cannot read .*trust_remote_code"):
        load_model_dir(changed)
    model, _, _ = load_model_dir(changed, trust_remote_code=True)
    assert np.array_equal(np.array(model(TOKENS)), np.array(load(setup / "base")(TOKENS)))


def test_norms_adapter_size_on_the_demo_model():
    """The demo model (SeeDNorm + Peri-LN, 8 blocks of 256): 4 norms per block, Peri-LN's
    embedding norm and the final norm, each with weight, alpha and beta of size 256.
    Only their gains (--norm-params gains) stay under 0.1% of the model; all three: 0.29%.
    DyT's gain, shift and alpha: 0.195%; its gain alone (--norm-params weight): 0.097%."""
    from mlx_localnorm.models import Model
    from mlx_localnorm.train import PretrainConfig

    counts = {}
    for which in ("all", "gains"):
        model = Model(PretrainConfig().model_args(8192))
        apply_mode(model, "norms", norm_params=which)
        counts[which] = parameter_counts(model)
    total = counts["all"][1]
    assert counts["gains"][0] == (8 * 4 + 2) * 256 and counts["all"][0] == 3 * 34 * 256
    assert counts["gains"][0] / total < 0.001 < counts["all"][0] / total
    # Swapped to DyT (gain, shift and a scalar alpha per norm): only the gains stay under.
    for which, size in (("all", 2 * 256 + 1), ("gains", 2 * 256), ("weight", 256)):
        model = Model(PretrainConfig(norm="dyt").model_args(8192))
        apply_mode(model, "norms", norm_params=which)
        trainable, total = parameter_counts(model)
        assert trainable == 34 * size
        assert (trainable / total < 0.001) == (which == "weight"), which


def test_finetune_command_runs_and_resumes_with_more_steps(setup, tmp_path, capsys):
    common = ["--model", setup / "base", "--data", setup / "data", "--no-progress",
              "--out", tmp_path / "run", "--eval-batches", 1]
    proc = run_in_process(capsys, "finetune", *common, "--mode", "norms", "--steps", 2)
    assert proc.returncode == 0, proc.stderr
    assert "norms: training" in proc.stdout and "mlx-localnorm fuse" in proc.stdout
    start = json.loads(open(tmp_path / "run" / "metrics.jsonl").readline())["val_loss"]
    assert f"({start:.3f} before training)" in proc.stdout
    proc = run_in_process(capsys, "finetune", "--out-dir", tmp_path / "run", "--resume",
                          "--steps", 3, "--mode", "lora")
    assert proc.returncode == 2
    assert_one_line_error(proc, "mode cannot change in a resumed run")
    proc = run_in_process(capsys, "finetune", "--out-dir", tmp_path / "run", "--resume",
                          "--steps", 3)
    assert proc.returncode == 0, proc.stderr
    steps = [json.loads(line)["step"] for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert steps == [0, 1, 2, 3]


def masked_nll64(logits, targets, mask) -> tuple[float, float]:
    """(sum of -log p(target) over mask == 1, number of such tokens), in float64 NumPy."""
    z = np.array(logits, np.float64)
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    picked = np.take_along_axis(logp, np.array(targets)[..., None], -1)[..., 0]
    m = np.array(mask, np.float64)
    return float(-(picked * m).sum()), float(m.sum())


def test_step_and_validation_losses_are_masked_means(setup, tmp_path):
    """The first step's loss and the validation loss, against float64 NumPy: the mean of
    -log p over the unmasked (completion) tokens only, validation weighted by tokens."""
    from mlx_localnorm.data.sft import SFTBatches, load_sft

    config = run_config(setup, tmp_path / "run", mode="norms", eval_batches=100)
    trainer = Finetuner(config)
    data = load_sft(config.data, trainer.tokenizer)
    inputs, targets, mask = next(SFTBatches(data.train, config.batch_size,
                                            config.max_seq_len, seed=config.seed))
    assert 0 < float(mask.sum()) < float((inputs != 0).sum())  # prompts are masked out
    trainer.model.eval()
    total, count = masked_nll64(trainer.model(inputs), targets, mask)
    trainer.model.train()
    record = trainer.train_step()
    assert record["tokens"] == count
    assert abs(record["loss"] - total / count) < 1e-5 * total / count

    valid = SFTBatches(data.valid, min(config.batch_size, len(data.valid)),
                       config.max_seq_len, shuffle=False)
    sums = [masked_nll64(trainer.model(x), y, m) for x, y, m in valid.epoch_batches()]
    want = sum(s for s, _ in sums) / sum(n for _, n in sums)
    assert abs(trainer.eval_metrics()["val_loss"] - want) < 1e-5 * want


@pytest.mark.parametrize("mode", ["lora", "norms"])
def test_validation_before_training_is_the_base_models(setup, tmp_path, mode):
    """Step 0 of metrics.jsonl is the base model's validation loss (float64 NumPy over the
    completion tokens of valid.jsonl), logged before the first step; the summary has it."""
    from mlx_localnorm.data.sft import SFTBatches, load_sft

    config = run_config(setup, tmp_path / "run", mode=mode, eval_batches=100, steps=2,
                        **MODE_OPTIONS[mode])
    trainer = Finetuner(config)
    data = load_sft(config.data, trainer.tokenizer)
    base = load(setup / "base")
    valid = SFTBatches(data.valid, min(config.batch_size, len(data.valid)),
                       config.max_seq_len, shuffle=False)
    sums = [masked_nll64(base(x), y, m) for x, y, m in valid.epoch_batches()]
    want = sum(s for s, _ in sums) / sum(n for _, n in sums)
    summary = trainer.run()
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert (records[0]["step"], records[0]["tokens"]) == (0, 0) and "loss" not in records[0]
    assert abs(records[0]["val_loss"] - want) < 1e-5 * want
    assert summary["start_val_loss"] == records[0]["val_loss"]
    assert abs(summary["val_loss"] - want) > 1e-3  # the end differs: the start was not late


def test_full_finetune_of_ngpt_keeps_weights_on_the_sphere(setup, tmp_path):
    """nGPT (arXiv 2410.01131): after full fine-tuning steps every embedding row and every
    q_proj row (over the residual axis) still has unit norm."""
    base = saved_localnorm(tmp_path, "ngpt", **NORM_MODELS["ngpt"])
    trainer = Finetuner(run_config(setup, tmp_path / "run", model=str(base), mode="full",
                                   steps=2, eval_every=0))
    trainer.run()
    weights = numpy_params(trainer.model)
    assert not np.array_equal(weights["model.embed_tokens.weight"],
                              numpy_params(load(base))["model.embed_tokens.weight"])
    for name in ("model.embed_tokens.weight", "model.layers.1.self_attn.q_proj.weight"):
        norms = np.linalg.norm(weights[name].astype(np.float64), axis=-1)
        np.testing.assert_allclose(norms, 1.0, atol=1e-5)
