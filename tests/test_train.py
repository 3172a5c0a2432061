"""Pre-training: exact resume, Ctrl-C, data parallel, golden losses, export, CLI, bad input."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx_localnorm as ln
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map
from mlx_localnorm.train import (
    CheckpointError,
    PretrainConfig,
    Pretrainer,
    list_checkpoints,
    lr_schedule,
    read_metrics,
    resume_config,
    save_checkpoint,
)
from mlx_localnorm import _fast_blas as fast_blas
from mlx_localnorm.train import loop as loop_module
from mlx_localnorm.train.command import build_parser, parse_config

GOLDEN = Path(__file__).parent / "fixtures" / "losses" / "pretrain_tiny.txt"
TINY = dict(vocab_size=512, hidden_size=32, num_layers=2, num_heads=2, seq_len=32,
            batch_size=4, steps=12, eval_every=4, eval_batches=2, save_every=4,
            warmup_steps=2, sample_tokens=0, progress=False)
PREPARED_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "train.bin",
                  "train.json", "valid.bin", "valid.json")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Tokenizer and token files of the embedded corpus, made once for the whole module."""
    out = tmp_path_factory.mktemp("prepared")
    ln.data.prepare_data(None, out, vocab_size=TINY["vocab_size"])
    return out


def run_dir(prepared, tmp_path, name="run"):
    out = tmp_path / name
    out.mkdir()
    for f in PREPARED_FILES:  # prepare_data reuses them: same tokenizer, same source
        shutil.copy(prepared / f, out / f)
    return out


def config(out, **kw):
    return PretrainConfig(out_dir=str(out), **{**TINY, **kw})


def losses(out):
    return [(r["step"], r["loss"]) for r in read_metrics(Path(out) / "metrics.jsonl")]


def val_losses(out):
    return [(r["step"], r["val_loss"]) for r in read_metrics(Path(out) / "metrics.jsonl")
            if "val_loss" in r]


@pytest.fixture(scope="module")
def full_run(prepared, tmp_path_factory):
    """An uninterrupted 12-step run (the reference for resume and export tests)."""
    out = run_dir(prepared, tmp_path_factory.mktemp("full"))
    summary = Pretrainer(config(out)).run()
    return out, summary


# ----------------------------------------------------------------------------- resume
def test_resume_reproduces_the_uninterrupted_run(prepared, tmp_path, full_run):
    reference, summary = full_run
    assert not summary["interrupted"] and summary["step"] == 12
    out = run_dir(prepared, tmp_path)
    first = Pretrainer(config(out)).run(until=5)  # stops like Ctrl-C after step 5
    assert first["interrupted"] and [c.name for c in list_checkpoints(out)] == [
        "step_0000004", "step_0000005"]
    Pretrainer(resume_config(out), resume=True).run()
    assert losses(out) == losses(reference)  # every step, bit for bit
    assert val_losses(out) == val_losses(reference)
    assert [s for s, _ in losses(out)] == list(range(1, 13))


def test_resume_restores_tokens_seen_and_elapsed_time(prepared, tmp_path):
    out = run_dir(prepared, tmp_path)
    Pretrainer(config(out)).run(until=5)
    at_stop = read_metrics(out / "metrics.jsonl")[-1]
    per_step = TINY["batch_size"] * TINY["seq_len"]
    assert at_stop["step"] == 5 and at_stop["tokens"] == 5 * per_step
    resumed = Pretrainer(resume_config(out), resume=True)
    assert resumed.tokens_seen == 5 * per_step
    assert resumed.elapsed == at_stop["elapsed_s"] > 0
    resumed.run(until=7)
    records = read_metrics(out / "metrics.jsonl")
    assert [r["tokens"] for r in records] == [step * per_step for step in range(1, 8)]
    elapsed = [r["elapsed_s"] for r in records]
    assert all(a < b for a, b in zip(elapsed, elapsed[1:])), elapsed


@pytest.mark.parametrize("keep, kept", [(1, [5]), (3, [3, 4, 5])])
def test_pruning_keeps_exactly_the_newest_checkpoints(prepared, tmp_path, keep, kept):
    out = run_dir(prepared, tmp_path)
    Pretrainer(config(out, save_every=1, keep_checkpoints=keep, eval_every=0)).run(until=5)
    assert sorted(os.listdir(out / "checkpoints")) == [f"step_{s:07d}" for s in kept]


def _validation_sequences(out, count):
    """The first ``count`` validation sequences of ``seq_len + 1`` tokens, in file order."""
    manifest = json.loads((out / "valid.json").read_text())
    dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
    tokens = np.fromfile(out / "valid.bin", dtype=dtype).astype(np.int64)
    n = TINY["seq_len"]
    return np.stack([tokens[i * n:i * n + n + 1] for i in range(count)])


def _mean_cross_entropy(model, sequences):
    """Mean next-token cross-entropy in float64 NumPy from the model's logits."""
    logits = np.array(model(mx.array(sequences[:, :-1])).astype(mx.float32), dtype=np.float64)
    logits -= logits.max(axis=-1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
    return -np.take_along_axis(log_probs, sequences[:, 1:, None], axis=-1).mean()


def test_validation_covers_exactly_eval_batches_batches(prepared, tmp_path):
    out = run_dir(prepared, tmp_path)
    trainer = Pretrainer(config(out, eval_batches=3, eval_every=2, save_every=0))
    trainer.run(until=2)
    rows = TINY["batch_size"]  # the validation batch is as large as the training batch
    expected = {n: _mean_cross_entropy(trainer.model, _validation_sequences(out, n * rows))
                for n in (2, 3, 4)}
    # The check below tells 2, 3 and 4 batches apart.
    assert min(abs(expected[3] - expected[2]), abs(expected[3] - expected[4])) > 1e-3
    assert val_losses(out) == [(2, pytest.approx(expected[3], rel=1e-5))]


def test_loss_is_sane_and_decreases(full_run):
    out, _ = full_run
    curve = [loss for _, loss in losses(out)]
    # A fresh LM predicts nearly uniformly: initial loss within a nat of log(vocab).
    assert abs(curve[0] - math.log(TINY["vocab_size"])) < 1.0
    assert np.mean(curve[-3:]) < curve[0] - 0.3


def test_golden_loss_curve(full_run):
    """The tiny run's losses equal the recorded ones (tests/fixtures/losses/make_pretrain_golden.py)."""
    out, _ = full_run
    golden = [float(line) for line in GOLDEN.read_text().split()]
    # Same machine kind, same seed: only float32 reduction order may differ.
    np.testing.assert_allclose([loss for _, loss in losses(out)], golden, rtol=2e-4)


def test_grad_accumulation_equals_one_big_batch(prepared, tmp_path, full_run):
    reference, _ = full_run
    out = run_dir(prepared, tmp_path)
    Pretrainer(config(out, grad_accum=2, steps=4)).run()
    ref = dict(losses(reference))
    for step, loss in losses(out):
        assert loss == pytest.approx(ref[step], rel=1e-5), step


def test_gradient_checkpointing_changes_memory_not_losses(prepared, tmp_path, full_run):
    reference, _ = full_run
    out = run_dir(prepared, tmp_path)
    trainer = Pretrainer(config(out, grad_checkpoint=True, steps=3))
    trainer.run()
    assert all(type(b).__name__.startswith("Checkpointed") for b in trainer.model.layers)
    assert not type(ln.Model(trainer.model.args).layers[0]).__name__.startswith("Checkpointed")
    ref = dict(losses(reference))
    for step, loss in losses(out):
        assert loss == pytest.approx(ref[step], rel=1e-6), step


@pytest.mark.parametrize("optimizer", sorted(ln.optim.OPTIMIZERS))
def test_every_optimizer_runs_in_the_trainer(prepared, tmp_path, optimizer):
    """Integration only (the optimizers' math is tested in test_optim.py): every parameter
    group moves and the losses stay finite."""
    out = run_dir(prepared, tmp_path)
    trainer = Pretrainer(config(out, optimizer=optimizer, steps=3, eval_every=0,
                                save_every=0))
    before = {k: np.array(v) for k, v in tree_flatten(trainer.model.trainable_parameters())}
    summary = trainer.run()
    assert summary["step"] == 3 and all(math.isfinite(x) for _, x in losses(out))
    for key, value in tree_flatten(trainer.model.trainable_parameters()):
        assert not np.array_equal(np.array(value), before[key]), f"{key} did not move"


@pytest.mark.parametrize("placement", ["ngpt", "angpt"])
def test_hypersphere_runs_keep_their_weight_constraint(prepared, tmp_path, placement):
    out = run_dir(prepared, tmp_path)
    trainer = Pretrainer(config(out, placement=placement, optimizer="adamw", steps=3))
    trainer.run()
    norms = np.linalg.norm(np.array(trainer.model.model.embed_tokens.weight), axis=-1)
    if placement == "ngpt":  # projected onto the sphere after every step
        np.testing.assert_allclose(norms, 1.0, rtol=1e-5)
    else:  # anGPT: constrained into the unit ball
        assert norms.max() <= 1.0 + 1e-5


def test_bfloat16_run(prepared, tmp_path):
    out = run_dir(prepared, tmp_path)
    trainer = Pretrainer(config(out, dtype="bfloat16", steps=3))
    trainer.run()
    assert trainer.model.model.embed_tokens.weight.dtype == mx.bfloat16
    assert all(math.isfinite(loss) for _, loss in losses(out))


def test_sigint_checkpoints_and_exits_cleanly(prepared, tmp_path):
    out = run_dir(prepared, tmp_path)
    cmd = [sys.executable, "-m", "mlx_localnorm", "pretrain", "--out-dir", str(out),
           *_flags({**TINY, "steps": 10_000, "save_every": 0, "eval_every": 0})]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while len(read_metrics(out / "metrics.jsonl")) < 3 and time.time() < deadline:
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, output
    assert f"mlx-localnorm pretrain --out-dir {out} --resume" in output
    last = read_metrics(out / "metrics.jsonl")[-1]["step"]
    assert [c.name for c in list_checkpoints(out)] == [f"step_{last:07d}"]


def test_on_checkpoint_runs_after_each_checkpoint_is_on_disk(prepared, tmp_path):
    """The hook sees every periodic checkpoint and the one a stop (Ctrl-C) writes, each
    already listed on disk, and nothing else."""
    out = run_dir(prepared, tmp_path)
    seen = []

    class Hooked(Pretrainer):
        def on_checkpoint(self, step):
            seen.append((step, list_checkpoints(self.out_dir)[-1].name))

    Hooked(config(out, eval_every=0, save_every=2)).run(until=5)
    assert seen == [(2, "step_0000002"), (4, "step_0000004"), (5, "step_0000005")]


# ----------------------------------------------------------------------------- distributed
def test_two_processes_match_one_process_with_the_combined_batch(prepared, tmp_path,
                                                                 full_run):
    reference, _ = full_run
    out = run_dir(prepared, tmp_path)
    launch = Path(sys.executable).with_name("mlx.launch")
    cmd = [str(launch), "--hosts", "127.0.0.1,127.0.0.1", "--backend", "ring",
           sys.executable, "-m", "mlx_localnorm", "pretrain", "--out-dir", str(out),
           *_flags({**TINY, "steps": 4})]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=240)
    finally:  # never leave rank processes behind
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, output[-3000:]
    ref = dict(losses(reference))
    got = losses(out)
    assert [s for s, _ in got] == [1, 2, 3, 4]  # rank 0 alone writes the metrics
    for step, loss in got:  # each rank has half the batch; gradients are averaged
        assert loss == pytest.approx(ref[step], rel=1e-5), step


# ----------------------------------------------------------------------------- export
def test_run_directory_loads_in_mlx_lm(full_run):
    from mlx_lm import load

    out, _ = full_run
    model, tokenizer = load(str(out), trust_remote_code=True)
    trained = ln.Model(ln.ModelArgs.from_dict(json.loads((out / "config.json").read_text())))
    trained.load_weights(str(out / "model.safetensors"))
    tokens = mx.array([tokenizer.encode("ROMEO: But soft, what light")])
    np.testing.assert_array_equal(np.array(model(tokens)), np.array(trained(tokens)))
    ckpt = mx.load(str(list_checkpoints(out)[-1] / "model.safetensors"))
    for key, value in tree_flatten(trained.parameters()):
        np.testing.assert_array_equal(np.array(value), np.array(ckpt[key]), err_msg=key)
    assert (out / "loss.png").stat().st_size > 10_000


def test_export_after_a_killed_export(prepared, tmp_path):
    """A kill while export moves files out of its scratch directory leaves some behind;
    the next export replaces them."""
    out = run_dir(prepared, tmp_path)
    trainer = Pretrainer(config(out, steps=2, eval_every=0))
    trainer.run()
    (out / ".export").mkdir()
    (out / ".export" / "model.safetensors").write_bytes(b"half a file")
    trainer.export()
    assert not (out / ".export").exists()
    exported = mx.load(str(out / "model.safetensors"))
    for key, value in tree_flatten(trainer.model.parameters()):
        np.testing.assert_array_equal(np.array(exported[key]), np.array(value), err_msg=key)


# ----------------------------------------------------------------------------- schedule
@pytest.mark.parametrize("kind", ["cosine", "wsd", "constant"])
def test_lr_schedule(kind):
    peak, steps, warmup = 0.02, 100, 10
    f = lr_schedule(peak, steps, warmup, kind, min_ratio=0.1, decay_fraction=0.2)
    for step in (0, 5, 9, 10, 50, 79, 80, 90, 99, 100):
        warm = min(1.0, (step + 1) / warmup)
        if kind == "cosine":
            p = min(max((step - warmup) / (steps - warmup), 0.0), 1.0)
            shape = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p))
        elif kind == "wsd":
            shape = 1 - 0.9 * min(max((step - 80) / 20, 0.0), 1.0)
        else:
            shape = 1.0
        assert f(mx.array(step)).item() == pytest.approx(peak * warm * shape, rel=1e-6), step


# ----------------------------------------------------------------------------- CLI
def _flags(values):
    out = []
    for key, value in values.items():
        flag = "--" + key.replace("_", "-")
        out += [flag if value else "--no-" + flag[2:]] if isinstance(value, bool) else [
            flag, str(value)]
    return out


def test_every_field_is_a_flag_with_help():
    text = build_parser().format_help()
    for name in PretrainConfig.field_names():
        assert "--" + name.replace("_", "-") in text, name
    for required in ("out_dir", "corpus", "vocab_size", "seq_len", "batch_size", "steps",
                     "learning_rate", "norm", "placement", "optimizer", "hidden_size",
                     "num_layers", "num_heads", "eval_every", "save_every", "seed"):
        assert required in PretrainConfig.field_names()
    assert "--resume" in text and "sentencepiece vocabulary size" in text


def test_flags_and_config_files(tmp_path):
    cfg, resume = parse_config(["--hidden-size", "48", "--norm-options", '{"num_heads": 2}',
                                "--no-progress", "--qk-norm", "rmsnorm", "--learning-rate",
                                "0.01"])
    assert (cfg.hidden_size, cfg.norm_options, cfg.progress, cfg.qk_norm, resume) == (
        48, {"num_heads": 2}, False, "rmsnorm", False)
    (tmp_path / "run.yaml").write_text("hidden_size: 64\nsteps: 7\n")
    cfg, _ = parse_config(["--config", str(tmp_path / "run.yaml"), "--steps", "9"])
    assert (cfg.hidden_size, cfg.steps) == (64, 9)  # flags override the file
    (tmp_path / "bad.json").write_text(json.dumps({"hidden_sise": 64}))
    with pytest.raises(ValueError, match=r"unknown config field\(s\) \['hidden_sise'\]; "
                                         r"valid fields: out_dir, corpus"):
        parse_config(["--config", str(tmp_path / "bad.json")])
    with pytest.raises(SystemExit):
        parse_config(["--hidden-sise", "3"])


# ----------------------------------------------------------------------------- bad input
def test_seq_len_over_context_length():
    with pytest.raises(ValueError, match=r"seq_len=2048 is longer than the model's "
                                         r"context_length=1024"):
        PretrainConfig(seq_len=2048)


def test_bad_corpus_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        Pretrainer(config(tmp_path / "a", corpus=str(tmp_path / "missing.txt")))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty.txt"):
        Pretrainer(config(tmp_path / "b", corpus=str(tmp_path / "empty.txt")))
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        Pretrainer(config(tmp_path / "c", corpus=str(tmp_path / "bad.jsonl")))


def _snapshot(out):
    return {p: p.read_bytes() for p in sorted(Path(out).rglob("*")) if p.is_file()}


def test_corrupt_checkpoint_on_resume_changes_nothing(prepared, tmp_path):
    out = run_dir(prepared, tmp_path)
    Pretrainer(config(out)).run(until=4)
    newest = list_checkpoints(out)[-1]
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    before = _snapshot(out)
    with pytest.raises(CheckpointError, match=r"step_0000004 is unreadable"):
        Pretrainer(resume_config(out), resume=True)
    assert _snapshot(out) == before


def test_incompatible_checkpoint_on_resume(prepared, tmp_path):
    out = run_dir(prepared, tmp_path)
    Pretrainer(config(out)).run(until=4)
    other = run_dir(prepared, tmp_path, "other")
    Pretrainer(config(other, hidden_size=48)).run(until=4)
    victim = list_checkpoints(out)[-1] / "model.safetensors"
    shutil.copy(list_checkpoints(other)[-1] / "model.safetensors", victim)
    before = _snapshot(out)
    with pytest.raises(CheckpointError, match=r"is \(512, 48\) mlx.core.float32, the run "
                                              r"expects \(512, 32\)"):
        Pretrainer(resume_config(out), resume=True)
    assert _snapshot(out) == before
    with pytest.raises(ValueError, match=r"hidden_size cannot change in a resumed run"):
        resume_config(out, {"hidden_size": 48})


def test_failed_checkpoint_write_keeps_the_previous_one(prepared, tmp_path, monkeypatch):
    out = run_dir(prepared, tmp_path)
    trainer = Pretrainer(config(out))
    trainer.run(until=4)
    before = _snapshot(out / "checkpoints")
    real_save = mx.save_safetensors

    def disk_full(path, arrays, *args, **kw):
        if path.endswith("optimizer.safetensors"):
            real_save(path, {"partial": mx.zeros(3)})  # a half-written file ...
            raise OSError(28, "No space left on device")  # ... then the disk is full
        return real_save(path, arrays, *args, **kw)

    monkeypatch.setattr(mx, "save_safetensors", disk_full)
    with pytest.raises(OSError, match="No space left"):
        trainer.run(until=8)
    assert _snapshot(out / "checkpoints") == before  # step 4 intact, nothing half-written
    monkeypatch.undo()
    Pretrainer(resume_config(out), resume=True)  # and it still resumes


def test_ctrl_c_right_after_a_save_keeps_that_checkpoint(prepared, tmp_path, full_run,
                                                        monkeypatch):
    """Ctrl-C lands just after the step-4 checkpoint is written, and a second Ctrl-C (the
    default handler is back by then) lands just after any later checkpoint deletion."""
    reference, _ = full_run
    out = run_dir(prepared, tmp_path)
    saved_steps = []
    real_save, real_rmtree = loop_module.save_checkpoint, shutil.rmtree

    def save_then_ctrl_c(out_dir, step, *args, **kw):
        saved_steps.append(step)
        path = real_save(out_dir, step, *args, **kw)
        signal.raise_signal(signal.SIGINT)
        return path

    def rmtree_then_ctrl_c(path, *args, **kw):
        real_rmtree(path, *args, **kw)
        signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(loop_module, "save_checkpoint", save_then_ctrl_c)
    monkeypatch.setattr(shutil, "rmtree", rmtree_then_ctrl_c)
    try:
        summary = Pretrainer(config(out)).run()
    except KeyboardInterrupt:
        pytest.fail("the second Ctrl-C hit a checkpoint file operation")
    monkeypatch.undo()
    assert summary["interrupted"] and summary["step"] == 4
    assert saved_steps == [4]  # the step saved just before the Ctrl-C is not saved again
    assert [c.name for c in list_checkpoints(out)] == ["step_0000004"]
    Pretrainer(resume_config(out), resume=True).run()
    assert losses(out) == losses(reference)


def test_second_ctrl_c_while_the_last_checkpoint_is_written(prepared, tmp_path, full_run,
                                                           monkeypatch):
    """The stop at step 6 writes a checkpoint after the default handler is back; a Ctrl-C
    mid-write stops at once, and the restart resumes from step 4."""
    reference, _ = full_run
    out = run_dir(prepared, tmp_path)
    trainer = Pretrainer(config(out))
    trainer.run(until=4)
    real_save = mx.save_safetensors

    def write_then_ctrl_c(path, arrays, *args, **kw):
        real_save(path, arrays, *args, **kw)
        signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(mx, "save_safetensors", write_then_ctrl_c)
    # A process started in the background inherits SIGINT ignored; the user's terminal
    # gives Python's default handler, which this test is about.
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            trainer.run(until=6)
    finally:
        signal.signal(signal.SIGINT, inherited)
    monkeypatch.undo()
    assert [c.name for c in list_checkpoints(out)] == ["step_0000004"]
    restarted = Pretrainer(resume_config(out), resume=True)
    assert os.listdir(out / "checkpoints") == ["step_0000004"]
    restarted.run()
    assert losses(out) == losses(reference)


def _tiny_model_and_optimizer():
    model = nn.Linear(3, 2)
    optimizer = optim.Adam(learning_rate=1e-2)
    optimizer.init(model.trainable_parameters())
    return model, optimizer


def test_a_saved_step_is_never_overwritten(tmp_path):
    model, optimizer = _tiny_model_and_optimizer()
    save_checkpoint(tmp_path, 1, model, optimizer, {})
    before = _snapshot(tmp_path)
    model.update(tree_map(lambda p: p + 1, model.parameters()))
    with pytest.raises(FileExistsError, match=r"step_0000001 already exists"):
        save_checkpoint(tmp_path, 1, model, optimizer, {})
    assert _snapshot(tmp_path) == before
    assert os.listdir(tmp_path / "checkpoints") == ["step_0000001"]


@pytest.mark.parametrize("step, keep, message", [
    (1, 0, "keep must be a positive int, got 0"),
    (1, 2.0, "keep must be a positive int, got 2.0"),
    (-1, 3, "step must be an int >= 0, got -1"),
    (True, 3, "step must be an int >= 0, got True"),
])
def test_save_checkpoint_rejects_bad_step_and_keep(tmp_path, step, keep, message):
    model, optimizer = _tiny_model_and_optimizer()
    with pytest.raises(ValueError, match=r"save_checkpoint: " + message):
        save_checkpoint(tmp_path, step, model, optimizer, {}, keep=keep)
    assert not (tmp_path / "checkpoints").exists()


def test_restart_removes_only_its_own_leftovers(prepared, tmp_path):
    out = run_dir(prepared, tmp_path)
    Pretrainer(config(out)).run(until=4)
    root, elsewhere = out / "checkpoints", tmp_path / "elsewhere"
    for name in (".tmp-k1l2m3n4", ".trash-a1b2c3d4", ".tmp-a-file", ".other", "notes",
                 "step_0000002.bak"):
        (root / name).mkdir()
        (root / name / "model.safetensors").write_bytes(b"0" * 100)
    (root / "notes.tmp-x").write_text("mine")
    elsewhere.mkdir()
    (root / ".tmp-link").symlink_to(elsewhere)
    shutil.rmtree(root / ".tmp-a-file")
    (root / ".tmp-a-file").write_text("a file, not a staging directory")
    Pretrainer(resume_config(out), resume=True)
    assert sorted(os.listdir(root)) == [".other", ".tmp-a-file", ".tmp-link", "notes",
                                        "notes.tmp-x", "step_0000002.bak", "step_0000004"]
    assert elsewhere.is_dir()


# A training process that kills itself (SIGKILL) at a dangerous moment of a checkpoint.
KILLED_TRAINER = """
import json, os, shutil, signal, sys
from pathlib import Path
from mlx_localnorm.train import PretrainConfig, Pretrainer  # first: it picks the BLAS
import mlx.core as mx

fault, fields = sys.argv[1], json.loads(sys.argv[2])
kill = lambda: os.kill(os.getpid(), signal.SIGKILL)
if fault == "write":  # half of step 8's optimizer file is on disk
    real_save, optimizer_files = mx.save_safetensors, []

    def save(path, arrays, *args, **kw):
        if path.endswith("optimizer.safetensors"):
            optimizer_files.append(path)
            if len(optimizer_files) == 2:
                real_save(path, {"partial": mx.zeros(3)})
                kill()
        real_save(path, arrays, *args, **kw)

    mx.save_safetensors = save
else:  # deleting the oldest checkpoint: one file is gone
    real_rmtree = shutil.rmtree

    def rmtree(path, *args, **kw):
        for weights in Path(path).rglob("model.safetensors"):
            weights.unlink()
            kill()
        real_rmtree(path, *args, **kw)

    shutil.rmtree = rmtree
Pretrainer(PretrainConfig(**fields)).run()
"""


@pytest.mark.parametrize("fault, survivor", [("write", "step_0000004"),
                                             ("delete", "step_0000008")])
def test_kill_during_a_checkpoint_then_restart(prepared, tmp_path, full_run, fault,
                                               survivor):
    """kill -9 while step 8 is written, or while step 4 is deleted after step 8 is in
    place (keep 1): the restart finds only complete checkpoints, removes the leftovers and
    resumes to the uninterrupted run's losses."""
    reference, _ = full_run
    out = run_dir(prepared, tmp_path)
    fields = {**TINY, "out_dir": str(out), "keep_checkpoints": 1}
    # The same CPU BLAS as this process (loading a saved model turns the fast one off here).
    env = {**os.environ, "MLX_LOCALNORM_FAST_BLAS": "1" if fast_blas.status == "loaded" else "0"}
    proc = subprocess.run([sys.executable, "-c", KILLED_TRAINER, fault, json.dumps(fields)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert len(list((out / "checkpoints").iterdir())) == 2  # the survivor and a leftover
    restarted = Pretrainer(resume_config(out), resume=True)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [survivor]
    assert restarted.step == int(survivor[len("step_"):])
    restarted.run()
    assert losses(out) == losses(reference)


def test_run_directory_rules(prepared, tmp_path):
    out = run_dir(prepared, tmp_path)
    with pytest.raises(CheckpointError, match="has no checkpoint to resume from"):
        Pretrainer(config(out), resume=True)
    Pretrainer(config(out)).run(until=4)
    with pytest.raises(ValueError, match=r"already holds a run .* pass --resume"):
        Pretrainer(config(out))
    with pytest.raises(FileNotFoundError, match="train_config.json does not exist"):
        resume_config(tmp_path / "nowhere")


def test_metrics_file_is_readable_by_others_like_any_result(tmp_path):
    from mlx_localnorm.train.metrics import MetricsLog
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.log({"step": 1, "loss": 2.0})
    assert (tmp_path / "metrics.jsonl").stat().st_mode & 0o044 == 0o044


def test_a_failed_metrics_rewrite_leaves_no_temporary_file(tmp_path, monkeypatch):
    from mlx_localnorm.train.metrics import MetricsLog
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n')

    def full_disk(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError, match="No space"):
        MetricsLog(path, resume_step=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
    assert path.read_text() == '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'
