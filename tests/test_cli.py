"""The ``mlx-localnorm`` command line, run as a user runs it: a subprocess per command.

User errors end with a non-zero exit and one line on stderr (no traceback); ``list``,
``showcase``, ``demo`` and every ``bench`` subcommand run on tiny sizes and their output
(tables, CSV files) is checked against expectations written out here.
"""

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlx_localnorm as ln
import mlx.core as mx
import pytest
from mlx_localnorm import cli
from mlx_localnorm.train import PretrainConfig, Pretrainer, list_checkpoints, read_metrics

# A model and run small enough for a few seconds per command.
TINY = dict(vocab_size=400, hidden_size=32, num_layers=1, num_heads=2, seq_len=16,
            batch_size=2, steps=4, save_every=2, eval_every=2, eval_batches=1, warmup_steps=1,
            sample_tokens=0, progress=False)
# Hand-written from SPEC.md / DESIGN.md, not read from the package.
NORM_NAMES = {"rmsnorm", "layernorm", "seednorm", "patchnorm", "dyt", "l2norm", "angpt"}
PLACEMENT_NAMES = {"post", "pre", "mix", "peri", "sandwich", "lnscaling", "ngpt", "angpt"}
OPTIMIZER_NAMES = {"adamw", "muon", "normuon", "scion", "lamb", "lars"}


def flags(**fields) -> list[str]:
    out = []
    for key, value in fields.items():
        flag = "--" + key.replace("_", "-")
        out += [flag if value else "--no-" + flag[2:]] if isinstance(value, bool) else [
            flag, str(value)]
    return out


def mlx_localnorm(*args, cwd=None, timeout=180) -> subprocess.CompletedProcess:
    """``python -m mlx_localnorm ARGS`` (what the ``mlx-localnorm`` script runs)."""
    return subprocess.run([sys.executable, "-m", "mlx_localnorm", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=timeout, check=False)


def run_in_process(capsys, *args) -> subprocess.CompletedProcess:
    """``cli.main(ARGS)`` in this process: the same code path, without the start-up cost."""
    try:
        status = cli.main([str(a) for a in args])
    except SystemExit as exit:  # argparse's usage errors
        status = exit.code
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, status, out.out, out.err)


def assert_one_line_error(proc: subprocess.CompletedProcess, *names: str) -> str:
    """A failed command: non-zero exit, no traceback, one stderr line naming ``names``."""
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


def read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two documents cut from the embedded Shakespeare: one for training, one held out."""
    folder = tmp_path_factory.mktemp("corpus")
    works = ln.data.load_corpus().train
    (folder / "a.txt").write_text(works[1][:6000])  # a.txt hashes into the validation split
    (folder / "b.txt").write_text(works[0][:30000])
    return folder


@pytest.fixture(scope="module")
def interrupted_run(corpus, tmp_path_factory):
    """A tiny run stopped after step 2 (its checkpoint saved), as a Ctrl-C leaves it."""
    out = tmp_path_factory.mktemp("interrupted") / "run"
    summary = Pretrainer(PretrainConfig(out_dir=str(out), corpus=str(corpus), **TINY)).run(
        until=2)
    assert summary["interrupted"] and [p.name for p in list_checkpoints(out)] == [
        "step_0000002"]
    return out


def copy_run(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


def steps_logged(out: Path) -> list[int]:
    return [r["step"] for r in read_metrics(out / "metrics.jsonl")]


# ----------------------------------------------------------------------------- item 6: errors
# (flags, words the error line must contain); each fails before any work is done.
CONFIG_ERRORS = {
    "unknown optimizer": (["--optimizer", "sgd"], ["optimizer", "'sgd'", "muon"]),
    "unknown norm": (["--norm", "nope"], ["norm", "'nope'", "seednorm"]),
    "unknown placement": (["--placement", "nope"], ["placement", "'nope'", "peri"]),
    "unknown qk_norm": (["--qk-norm", "nope"], ["qk_norm", "'nope'", "rmsnorm"]),
    "vocab_size below the byte pieces": (["--vocab-size", "100"], ["vocab_size", "261", "100"]),
    "NaN learning rate": (["--learning-rate", "nan"], ["learning_rate", "nan"]),
    "zero learning rate": (["--learning-rate", "0"], ["learning_rate", "0"]),
    "negative learning rate": (["--learning-rate", "-0.1"], ["learning_rate", "-0.1"]),
    "infinite AdamW learning rate": (["--adamw-learning-rate", "inf"],
                                     ["adamw_learning_rate", "inf"]),
    "NaN weight decay": (["--weight-decay", "nan"], ["weight_decay", "nan"]),
    "infinite grad_clip": (["--grad-clip", "inf"], ["grad_clip", "inf"]),
    "NaN grad_clip": (["--grad-clip", "nan"], ["grad_clip", "nan"]),
    "NaN min_lr_ratio": (["--min-lr-ratio", "nan"], ["min_lr_ratio", "nan"]),
    "heads that do not divide the width": (["--num-heads", "3"], ["num_attention_heads=3",
                                                                  "hidden_size=256"]),
    "a bad norm option": (["--norm-options", '{"num_heads": 3}'], ["num_heads"]),
    "qk_norm on nGPT": (["--placement", "ngpt", "--qk-norm", "rmsnorm"], ["ngpt", "qk_norm"]),
    "not a number": (["--steps", "ten"], ["--steps", "'ten'"]),
}


@pytest.mark.parametrize("case", list(CONFIG_ERRORS))
def test_bad_config_is_one_line_before_any_work(case, tmp_path, capsys):
    args, words = CONFIG_ERRORS[case]
    proc = run_in_process(capsys, "pretrain", "--out-dir", tmp_path / "run", *args)
    assert_one_line_error(proc, *words)
    assert proc.returncode == 2
    assert not (tmp_path / "run").exists()  # validated before any data was prepared


def test_config_file_errors_name_the_file(tmp_path, capsys):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("steps: [1, 2\nseed: 3\n")
    assert_one_line_error(run_in_process(capsys, "pretrain", "--config", bad_yaml),
                          str(bad_yaml), "not valid YAML")
    wrong_type = tmp_path / "wrong.json"
    wrong_type.write_text(json.dumps({"steps": "ten"}))
    assert_one_line_error(run_in_process(capsys, "pretrain", "--config", wrong_type),
                          str(wrong_type), "steps", "'ten'")
    assert_one_line_error(run_in_process(capsys, "pretrain", "--config",
                                         tmp_path / "missing.json"), str(tmp_path / "missing.json"))


def test_real_command_reports_config_errors_in_one_line(tmp_path):
    """The installed entry point, as a user runs it: the issue's two examples."""
    proc = mlx_localnorm("pretrain", "--out-dir", tmp_path / "run", "--optimizer", "sgd")
    assert_one_line_error(proc, "optimizer", "'sgd'")
    assert proc.returncode == 2 and not (tmp_path / "run").exists()
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"steps": 10,\n "seed": }')
    proc = mlx_localnorm("pretrain", "--config", bad_json)
    assert_one_line_error(proc, str(bad_json), "not valid JSON", "line 2")


def test_config_is_validated_in_the_api_too():
    """The CLI's checks live in PretrainConfig, so Pretrainer users get them as well."""
    with pytest.raises(ValueError, match=r"optimizer must be one of .*got 'sgd'"):
        PretrainConfig(optimizer="sgd")
    with pytest.raises(ValueError, match=r"vocab_size must be an int >= 261 .*got 260"):
        PretrainConfig(vocab_size=260)
    with pytest.raises(ValueError, match=r"grad_clip must be a finite number, got inf"):
        PretrainConfig(grad_clip=float("inf"))
    with pytest.raises(ValueError, match=r"learning_rate must be > 0, got 0"):
        PretrainConfig(learning_rate=0)
    with pytest.raises(TypeError, match=r"norm must be a string, got 3"):
        PretrainConfig(norm=3)
    with pytest.raises(TypeError, match=r"progress must be a bool, got 'yes'"):
        PretrainConfig(progress="yes")


@pytest.mark.parametrize("kind", ["missing", "empty", "bad jsonl", "too small a text"])
def test_bad_corpus_is_one_line(kind, tmp_path, capsys):
    path = tmp_path / {"missing": "missing.txt", "empty": "empty.txt", "bad jsonl": "bad.jsonl",
                       "too small a text": "tiny.txt"}[kind]
    text = {"empty": "", "bad jsonl": '{"text": "fine"}\n{"body": "no text"}\n',
            "too small a text": "To be.\n"}
    if kind in text:
        path.write_text(text[kind])
    proc = run_in_process(capsys, "pretrain", "--out-dir", tmp_path / "run", "--corpus", path,
                          *flags(**TINY))
    assert_one_line_error(proc, {"missing": "missing.txt", "empty": "empty.txt",
                                 "bad jsonl": "bad.jsonl:2", "too small a text": "vocab"}[kind])


def test_real_command_reports_an_empty_corpus_in_one_line(tmp_path):
    (tmp_path / "empty.txt").write_text("\n")
    proc = mlx_localnorm("pretrain", "--out-dir", tmp_path / "run", "--corpus",
                         tmp_path / "empty.txt", *flags(**TINY))
    assert_one_line_error(proc, "empty.txt", "empty")


def test_existing_run_is_one_line(interrupted_run, tmp_path):
    out = copy_run(interrupted_run, tmp_path)
    proc = mlx_localnorm("pretrain", "--out-dir", out, *flags(**TINY))
    assert_one_line_error(proc, str(out), "already holds a run", "--resume")


def test_resume_without_a_checkpoint_is_one_line(interrupted_run, tmp_path):
    proc = mlx_localnorm("pretrain", "--out-dir", tmp_path / "nowhere", "--resume")
    assert_one_line_error(proc, "train_config.json does not exist")
    out = copy_run(interrupted_run, tmp_path)
    shutil.rmtree(out / "checkpoints")
    proc = mlx_localnorm("pretrain", "--out-dir", out, "--resume")
    assert_one_line_error(proc, str(out), "no checkpoint")


def test_corrupt_checkpoint_is_one_line(interrupted_run, tmp_path):
    out = copy_run(interrupted_run, tmp_path)
    weights = list_checkpoints(out)[-1] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    proc = mlx_localnorm("pretrain", "--out-dir", out, "--resume")
    assert_one_line_error(proc, "step_0000002", "unreadable")


def test_foreign_checkpoint_is_one_line(interrupted_run, tmp_path):
    """A checkpoint of another model: one tensor has another shape."""
    out = copy_run(interrupted_run, tmp_path)
    path = list_checkpoints(out)[-1] / "model.safetensors"
    weights = mx.load(str(path))
    name = next(k for k in weights if k.endswith("embed_tokens.weight"))
    weights[name] = mx.zeros((400, 48))
    mx.save_safetensors(str(path), weights)
    proc = mlx_localnorm("pretrain", "--out-dir", out, "--resume")
    assert_one_line_error(proc, "step_0000002", name, "(400, 48)")


def _can_mount_tmpfs() -> bool:
    if not sys.platform.startswith("linux") or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--map-root-user", "--mount", "sh", "-c",
                            "mount -t tmpfs -o size=4k tmpfs /mnt"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_mount_tmpfs(),
                    reason="a real full disk needs a private tmpfs mount (Linux unshare)")
@pytest.mark.parametrize("free_kb", [40, 200], ids=["while preparing data",
                                                    "while writing a checkpoint"])
def test_full_disk_is_one_line_and_leaves_nothing_half_written(corpus, tmp_path, free_kb):
    """A real full disk: the run directory is a tiny tmpfs in a private mount namespace.

    40 kB fill up while the token files are written (Python's OSError), 200 kB while the
    first checkpoint is (MLX's own write error).
    """
    disk = tmp_path / "disk"
    disk.mkdir()
    listing = tmp_path / "listing.txt"
    script = ('mount -t tmpfs -o size="$1" tmpfs "$2" || exit 99; shift 2; "$@"; rc=$?; '
              'find "$DISK" -mindepth 1 -printf "%P\\n" > "$LISTING"; exit $rc')
    proc = subprocess.run(
        ["unshare", "--map-root-user", "--mount", "sh", "-c", script, "sh", f"{free_kb}k",
         str(disk), sys.executable, "-m", "mlx_localnorm", "pretrain", "--out-dir",
         str(disk / "run"), "--corpus", str(corpus), *flags(**TINY)],
        capture_output=True, text=True, timeout=180,
        env={**os.environ, "DISK": str(disk), "LISTING": str(listing)})
    assert proc.returncode not in (0, 99), proc.stderr
    line = assert_one_line_error(proc, str(disk / "run"))
    assert re.search(r"No space left on device|is the disk full\?", line), line
    paths = listing.read_text().split()
    assert not [p for p in paths if ".tmp" in p], paths  # no staging file or directory left
    for checkpoint in {p.split("/")[2] for p in paths if p.startswith("run/checkpoints/")}:
        assert {p.rsplit("/", 1)[1] for p in paths if p.startswith(
            f"run/checkpoints/{checkpoint}/")} == {"model.safetensors", "optimizer.safetensors",
                                                   "state.json"}


def test_ctrl_c_outside_training_is_one_line(monkeypatch, capsys):
    def interrupted(args, rest):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_cmd_list", interrupted)
    assert cli.main(["list"]) == 130
    assert capsys.readouterr().err.strip() == "mlx-localnorm list: interrupted"


def test_diverged_loss_is_one_line(corpus, tmp_path, capsys):
    proc = run_in_process(capsys, "pretrain", "--out-dir", tmp_path / "run", "--corpus", corpus,
                          *flags(**TINY), "--optimizer", "adamw", "--learning-rate", "1e30")
    assert_one_line_error(proc, "training loss is", "lower the learning_rate")


def test_a_bug_still_shows_its_traceback(interrupted_run, tmp_path, monkeypatch):
    """Only user errors are shortened: a programming error keeps its traceback."""
    def buggy(args, rest):
        return {}["missing"]

    monkeypatch.setattr(cli, "_cmd_list", buggy)
    with pytest.raises(KeyError):
        cli.main(["list"])

    def mlx_bug(self, until=None):  # an MLX error that is not a failed file write
        raise RuntimeError("[matmul] Last dimension of first input with shape (2,3) ...")

    monkeypatch.setattr(Pretrainer, "run", mlx_bug)
    with pytest.raises(RuntimeError, match="matmul"):
        cli.main(["pretrain", "--out-dir", str(copy_run(interrupted_run, tmp_path)), "--resume"])
