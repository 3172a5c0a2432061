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
from test_train import _flags as flags

# A model and run small enough for a few seconds per command.
TINY = dict(vocab_size=400, hidden_size=32, num_layers=1, num_heads=2, seq_len=16,
            batch_size=2, steps=4, save_every=2, eval_every=2, eval_batches=1, warmup_steps=1,
            sample_tokens=0, progress=False)
# Hand-written from SPEC.md / DESIGN.md, not read from the package.
NORM_NAMES = {"rmsnorm", "layernorm", "seednorm", "patchnorm", "dyt", "l2norm", "angpt"}
PLACEMENT_NAMES = {"post", "pre", "mix", "peri", "sandwich", "lnscaling", "ngpt", "angpt"}
OPTIMIZER_NAMES = {"adamw", "muon", "normuon", "scion", "lamb", "lars"}


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
    with pytest.raises(TypeError, match=r"progress must be True or False, got 'yes'"):
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
                          *flags(TINY))
    assert_one_line_error(proc, {"missing": "missing.txt", "empty": "empty.txt",
                                 "bad jsonl": "bad.jsonl:2", "too small a text": "vocab"}[kind])


def test_real_command_reports_an_empty_corpus_in_one_line(tmp_path):
    (tmp_path / "empty.txt").write_text("\n")
    proc = mlx_localnorm("pretrain", "--out-dir", tmp_path / "run", "--corpus",
                         tmp_path / "empty.txt", *flags(TINY))
    assert_one_line_error(proc, "empty.txt", "empty")


def test_existing_run_is_one_line(interrupted_run, tmp_path):
    out = copy_run(interrupted_run, tmp_path)
    proc = mlx_localnorm("pretrain", "--out-dir", out, *flags(TINY))
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
         str(disk / "run"), "--corpus", str(corpus), *flags(TINY)],
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
                          *flags(TINY), "--optimizer", "adamw", "--learning-rate", "1e30")
    assert_one_line_error(proc, "training loss is", "lower the learning_rate")


@pytest.mark.parametrize("args, names", [
    (["data", "--vocab-size", "10"], ["vocab_size", "10"]),
    (["optim", "--shapes", "0x8"], ["0x8"]),
])
def test_bad_bench_arguments_are_one_line(args, names, capsys, tmp_path):
    proc = run_in_process(capsys, "bench", *args, "--out", tmp_path)
    assert_one_line_error(proc, *names)
    assert proc.returncode == 2


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


# ----------------------------------------------------------------------------- item 10
def test_list_names_every_norm_placement_and_optimizer():
    proc = mlx_localnorm("list")
    assert proc.returncode == 0, proc.stderr
    rows = [line.split(maxsplit=2) for line in proc.stdout.strip().splitlines()]
    assert all(len(r) == 3 and len(r[2]) > 10 for r in rows), rows  # kind, name, description
    by_kind = {}
    for kind, name, _ in rows:
        by_kind.setdefault(kind, []).append(name)
    assert {k: sorted(v) for k, v in by_kind.items()} == {
        "norm": sorted(NORM_NAMES), "placement": sorted(PLACEMENT_NAMES),
        "optimizer": sorted(OPTIMIZER_NAMES)}


def test_showcase_table():
    proc = mlx_localnorm("showcase", "--rows", 16, "--dims", 64, "--repeat", 1)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    header = lines.index(next(line for line in lines if line.startswith("norm ")))
    columns = re.split(r"\s{2,}", lines[header].strip())
    assert columns == ["norm", "params", "out RMS", "|f(2x)-f(x)|", "fwd ms", "fwd+bwd ms",
                       "vs rms_norm"]
    rows = {}
    for line in lines[header + 2: header + 2 + len(NORM_NAMES)]:
        cells = re.split(r"\s{2,}", line.strip())
        rows[cells[0]] = dict(zip(columns, cells))
    assert set(rows) == NORM_NAMES
    assert int(rows["rmsnorm"]["params"]) == 64  # one gain per feature
    assert int(rows["layernorm"]["params"]) == 128  # gain and bias
    mean, spread = map(float, rows["rmsnorm"]["out RMS"].split(" +- "))
    assert abs(mean - 1) < 1e-3 and spread < 1e-3  # unit gain: every row has RMS 1
    # scale invariant up to eps (rows of RMS ~0.05 move by ~eps / RMS^2); tanh(alpha x) is not
    assert float(rows["rmsnorm"]["|f(2x)-f(x)|"]) < 1e-2
    assert float(rows["dyt"]["|f(2x)-f(x)|"]) > 0.1
    assert all(float(r["fwd ms"]) > 0 for r in rows.values())


def test_demo_starts_fresh_in_a_new_directory(corpus, tmp_path):
    out = tmp_path / "demo"
    proc = mlx_localnorm("demo", "--out-dir", out, "--corpus", corpus, *flags(TINY))
    assert proc.returncode == 0, proc.stderr
    assert "continuing" not in proc.stdout
    assert steps_logged(out) == [1, 2, 3, 4]
    assert [p.name for p in list_checkpoints(out)] == ["step_0000002", "step_0000004"]


def test_demo_continues_an_interrupted_demo(interrupted_run, tmp_path):
    out = copy_run(interrupted_run, tmp_path)
    proc = mlx_localnorm("demo", "--out-dir", out)  # the saved config, not the demo defaults
    assert proc.returncode == 0, proc.stderr
    assert f"{out} holds an earlier run: continuing it" in proc.stdout
    assert "Done: step 4" in proc.stdout
    assert steps_logged(out) == [1, 2, 3, 4]
    assert list_checkpoints(out)[-1].name == "step_0000004"


def test_demo_continues_with_a_longer_budget(interrupted_run, tmp_path):
    """Flags a resumed run may change (here steps) apply when the demo continues."""
    out = copy_run(interrupted_run, tmp_path)
    proc = mlx_localnorm("demo", "--out-dir", out, "--steps", 6)
    assert proc.returncode == 0, proc.stderr
    assert steps_logged(out) == [1, 2, 3, 4, 5, 6]


# bench name -> (flags for a tiny run, {csv file: columns}); columns are written out here.
BENCHES = {
    "data": (["--model-types", "bpe", "--vocab-size", 400, "--batch-size", 2, "--seq-len", 8,
              "--repeat", 1],
             {"data.csv": ["machine", "device", "mlx", "stage", "model_type", "vocab_size",
                           "size", "seconds", "throughput", "unit"]}),
    "emulate": (["--shapes", "4x64", "--dtypes", "float32", "--repeat", 1],
                {"emulate.csv": ["machine", "kernel", "dtype", "rows", "dims", "threads",
                                 "threadgroups", "first_call_s", "seconds", "mthreads_per_s",
                                 "bytes_moved", "minimum_bytes", "traffic_ratio"]}),
    "grpo": (["--hidden", 32, "--layers", 1, "--heads", 2, "--vocab", 300, "--group-sizes", "2,3",
              "--max-tokens", 4, "--prompt-len", 5, "--repeat", 2],
             {"grpo.csv": ["machine", "device", "mlx", "model", "prompt_tokens", "group_size",
                           "max_tokens", "method", "tokens", "seconds", "tokens_per_s",
                           "vs_sequential"]}),
    "kernels": (["--shapes", "4x64", "--traffic-shapes", "4x64", "--dtypes", "float32",
                 "--repeat", 1],
                {"kernels_timing.csv": ["machine", "os", "device", "mlx", "dtype", "shape",
                                        "method", "path", "pass", "ms", "gbps", "pct_copy"],
                 "kernels_traffic.csv": ["machine", "os", "device", "mlx", "dtype", "shape",
                                         "kernel", "pass", "launches", "bytes_per_element",
                                         "min_bytes_per_element", "ratio"]}),
    "model": (["--hidden", 32, "--layers", 1, "--heads", 2, "--kv-heads", 1, "--mlp", 64,
               "--vocab", 64, "--batch", 1, "--seq-len", 8, "--norms", "rmsnorm,seednorm",
               "--placements", "pre,peri", "--rounds", 1, "--pair-rounds", 2],
              {"model.csv": ["machine", "device", "mlx", "dtype", "model", "norm", "placement",
                             "params", "tokens_per_step", "ms_per_step", "ms_median",
                             "tokens_per_s", "vs_llama", "vs_pre_rmsnorm"],
               "model_pairs.csv": ["pair", "llama_ms", "localnorm_ms", "vs_llama"]}),
    "norms": (["--shape", "8,64", "--dtypes", "float32", "--norms", "rmsnorm,seednorm",
               "--repeat", 1, "--matmul-size", 64],
              {"norms.csv": ["machine", "device", "mlx", "dtype", "shape", "norm", "path",
                             "pass", "ms", "ratio"]}),
    "optim": (["--shapes", "32x16", "--dtypes", "float32", "--repeat", 1, "--runs",
               "adamw,muon", "--steps", 3, "--batch", 2, "--seq-len", 16, "--eval-every", 2],
              {"optim_orth.csv": ["machine", "device", "mlx", "shape", "dtype", "what", "ms",
                                  "ratio_to_mlx_muon_step", "cpu_ms",
                                  "cpu_ratio_to_mlx_muon_step", "samples", "load_avg_1min"],
               "optim_loss.csv": ["machine", "device", "mlx", "adamw_lr", "muon_lr", "batch",
                                  "seq_len", "seed", "optimizer", "step", "tokens",
                                  "train_loss", "valid_loss"]}),
    "train": (["--vocab", 300, "--hidden", 32, "--layers", 1, "--heads", 2, "--batch", 1,
               "--seq-len", 8, "--rounds", 1],
              {"train.csv": ["machine", "device", "mlx", "configuration", "model", "norm",
                             "placement", "optimizer", "tokens_per_step", "ms_per_step",
                             "tokens_per_s", "vs_llama", "vs_rmsnorm_pre_adamw",
                             "peak_memory_mb"]}),
}


@pytest.fixture
def bench(tmp_path, corpus):
    """Run ``bench NAME`` on its tiny size; return {csv name: rows} after checking headers."""
    def run(name):
        args, files = BENCHES[name]
        if name == "data":
            args = [*args, "--corpus", corpus]
        proc = mlx_localnorm("bench", name, "--out", tmp_path, *args)
        assert proc.returncode == 0, proc.stderr
        tables = {}
        for file, columns in files.items():
            header, rows = read_csv(tmp_path / file)
            assert header == columns, file
            assert rows, file
            tables[file] = rows
        return tables
    return run


def test_bench_data(bench):
    rows = bench("data")["data.csv"]
    assert [r["stage"] for r in rows] == ["train_tokenizer", "write_tokens (sentencepiece)",
                                          "encode (mlx-lm tokenizer)", "next(Batches)"]
    assert {r["model_type"] for r in rows} == {"bpe"} and {r["vocab_size"] for r in rows} == {
        "400"}
    assert rows[3]["size"] == "2x8"
    written, encoded = (int(r["size"].split()[0]) for r in rows[1:3])
    assert written > 0 and encoded > 0
    assert all(float(r["seconds"]) > 0 and float(r["throughput"]) > 0 for r in rows)


def test_bench_emulate(bench):
    rows = {r["kernel"]: r for r in bench("emulate")["emulate.csv"]}
    assert set(rows) == {"rms_norm", "copy_float4"}
    copy = rows["copy_float4"]
    assert int(copy["threads"]) == 4 * 64 // 4  # one float4 per thread
    assert int(copy["minimum_bytes"]) == 2 * 4 * 64 * 4  # read x once, write it once
    for r in rows.values():
        assert (r["dtype"], r["rows"], r["dims"]) == ("float32", "4", "64")
        assert int(r["bytes_moved"]) >= int(r["minimum_bytes"])
        assert float(r["traffic_ratio"]) == pytest.approx(
            int(r["bytes_moved"]) / int(r["minimum_bytes"]), abs=1e-3)


def test_bench_grpo(bench):
    rows = {(r["group_size"], r["method"]): r for r in bench("grpo")["grpo.csv"]}
    assert set(rows) == {(g, m) for g in ("2", "3") for m in ("sequential", "batched")}
    for (g, _), r in rows.items():
        assert (r["model"], r["prompt_tokens"], r["max_tokens"]) == ("1x32, vocab 300", "5", "4")
        # Nothing stops early: both methods generate G full completions of 4 tokens.
        assert int(r["tokens"]) == int(g) * 4
        assert float(r["tokens_per_s"]) == pytest.approx(
            int(r["tokens"]) / float(r["seconds"]), rel=1e-3, abs=0.06)
        sequential = float(rows[g, "sequential"]["tokens_per_s"])
        assert float(r["vs_sequential"]) == pytest.approx(
            float(r["tokens_per_s"]) / sequential, rel=2e-3, abs=1e-3)
    assert all(float(rows[g, "sequential"]["vs_sequential"]) == 1.0 for g in ("2", "3"))


def test_bench_kernels(bench):
    tables = bench("kernels")
    timing = tables["kernels_timing.csv"]
    methods = {r["method"] for r in timing}
    assert {"mx.fast.rms_norm", "mx.fast.layer_norm", "seednorm ops",
            "patchnorm ops (k=4)"} <= methods
    # every method in every pass and path, once
    assert sorted((r["method"], r["pass"], r["path"]) for r in timing) == sorted(
        (m, p, q) for m in methods for p in ("forward", "forward+backward")
        for q in ("eager", "compiled"))
    assert all(float(r["ms"]) > 0 and r["shape"] == "4x64" for r in timing)
    traffic = {(r["kernel"], r["pass"]): r for r in tables["kernels_traffic.csv"]}
    assert {k for k, _ in traffic} == {"seednorm", "seednorm, 8 heads", "seednorm, frozen",
                                       "seednorm + residual", "rms_norm",
                                       "patchnorm k=4 (fused division)"} | {
        f"{norm} add norm ({how})" for norm in ("seednorm", "rms_norm")
        for how in ("fused", "unfused")}
    # rms_norm forward must read x (4 bytes), write y (4 bytes) and read the 64 weights once.
    assert float(traffic["rms_norm", "forward"]["min_bytes_per_element"]) == pytest.approx(
        (2 * 4 * 64 * 4 + 64 * 4) / (4 * 64))
    for r in traffic.values():
        assert float(r["ratio"]) == pytest.approx(
            float(r["bytes_per_element"]) / float(r["min_bytes_per_element"]), abs=2e-3)
        assert float(r["ratio"]) >= 1 and int(r["launches"]) >= 1


def test_bench_model(bench):
    tables = bench("model")
    rows = {(r["model"], r["norm"], r["placement"]): r for r in tables["model.csv"]}
    assert set(rows) == {("mlx_lm.llama", "rmsnorm", "pre"), ("localnorm", "rmsnorm", "pre"),
                         ("localnorm", "seednorm", "pre"), ("localnorm", "rmsnorm", "peri"),
                         ("localnorm", "seednorm", "peri")}
    # vocab 64 x 32 tied embedding; q, o 32x32, k, v 32x16 (1 kv head of 16); MLP 3 x 32x64;
    # two block norms and the final norm of 32
    params = 64 * 32 + 2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 64 + 3 * 32
    assert int(rows["mlx_lm.llama", "rmsnorm", "pre"]["params"]) == params
    assert int(rows["localnorm", "rmsnorm", "pre"]["params"]) == params  # like for like
    assert float(rows["mlx_lm.llama", "rmsnorm", "pre"]["vs_llama"]) == 1.0
    assert float(rows["localnorm", "rmsnorm", "pre"]["vs_pre_rmsnorm"]) == 1.0
    assert all(r["tokens_per_step"] == "8" and float(r["ms_per_step"]) > 0
               for r in rows.values())
    assert [p["pair"] for p in tables["model_pairs.csv"]] == ["0", "1"]


def test_bench_norms(bench):
    rows = bench("norms")["norms.csv"]
    norm_rows = [r for r in rows if r["norm"] != "matmul"]
    assert sorted((r["norm"], r["pass"], r["path"]) for r in norm_rows) == sorted(
        (n, p, q) for n in ("mx.fast.rms_norm", "rmsnorm", "seednorm")
        for p in ("forward", "forward+backward") for q in ("eager", "compiled"))
    assert all(float(r["ratio"]) == 1.0 for r in norm_rows if r["norm"] == "mx.fast.rms_norm")
    assert all((r["dtype"], r["shape"]) == ("float32", "8x64") for r in norm_rows)
    matmul = [r for r in rows if r["norm"] == "matmul"]
    assert [r["shape"] for r in matmul] == ["64x64x64"] * len(matmul)


def test_bench_optim(bench):
    tables = bench("optim")
    orth = {r["what"]: r for r in tables["optim_orth.csv"]}
    assert set(orth) == {"newton_schulz", "polar_express", "muon_step", "mlx_muon_step"}
    assert all((r["shape"], r["dtype"]) == ("32x16", "float32") for r in orth.values())
    assert float(orth["mlx_muon_step"]["ratio_to_mlx_muon_step"]) == 1.0
    loss = tables["optim_loss.csv"]
    assert [(r["optimizer"], r["step"]) for r in loss] == [
        (o, str(s)) for o in ("adamw", "muon") for s in (1, 2, 3)]
    assert all(int(r["tokens"]) == int(r["step"]) * 2 * 16 for r in loss)
    evaluated = [(r["optimizer"], r["step"]) for r in loss if r["valid_loss"]]
    assert evaluated == [(o, s) for o in ("adamw", "muon") for s in ("2", "3")]
    assert all(0 < float(r["train_loss"]) < 10 for r in loss)


def test_bench_train(bench):
    rows = bench("train")["train.csv"]
    assert [(r["model"], r["norm"], r["placement"], r["optimizer"]) for r in rows] == [
        ("llama", "rmsnorm", "pre", "adamw"), ("localnorm", "rmsnorm", "pre", "adamw"),
        ("localnorm", "seednorm", "pre", "adamw"), ("localnorm", "rmsnorm", "peri", "adamw"),
        ("localnorm", "rmsnorm", "pre", "muon"), ("localnorm", "seednorm", "peri", "muon")]
    assert float(rows[0]["vs_llama"]) == 1.0 and float(rows[1]["vs_rmsnorm_pre_adamw"]) == 1.0
    assert all(r["tokens_per_step"] == "8" and float(r["peak_memory_mb"]) > 0 for r in rows)
