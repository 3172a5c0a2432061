"""The study: grid files, run measures, the resumable runner on a tiny grid, the vision
classifiers, and the command's one-line errors."""

import csv
import json
import math
import shutil
from pathlib import Path

import mlx_localnorm as ln
import mlx.core as mx
import numpy as np
import pytest

from mlx_localnorm.cli import main
from mlx_localnorm.study import Study, parse_grid, read_grid, runner
from mlx_localnorm.study.results import LM_COLUMNS, count_spikes, summarize
from mlx_localnorm.study.vision import ConvBlock, ConvClassifier, VisionConfig, train_vision

BASE = dict(vocab_size=512, hidden_size=32, num_layers=2, num_heads=2, seq_len=32,
            batch_size=4, steps=6, eval_every=3, eval_batches=1, save_every=3,
            keep_checkpoints=1, warmup_steps=1, optimizer="adamw")


def grid_values(**study):
    return {"study": {"seeds": [0], "target_loss": 6.5, **study}, "base": dict(BASE),
            "family": {"pre": {"group": "g", "norm": "rmsnorm", "placement": "pre",
                               "learning_rates": [1e-3, 3e-3]}}}


# ---------------------------------------------------------------------- grid files
def test_grid_from_toml_and_json_are_the_same(tmp_path):
    toml = tmp_path / "g.toml"
    toml.write_text('[study]\nseeds = [0]\ntarget_loss = 6.5\n[base]\n'
                    + "".join(f"{k} = {json.dumps(v)}\n" for k, v in BASE.items())
                    + '[family.pre]\ngroup = "g"\nnorm = "rmsnorm"\nplacement = "pre"\n'
                    'learning_rates = [1e-3, 3e-3]\n')
    (tmp_path / "g.json").write_text(json.dumps(grid_values()))
    a, b = read_grid(toml), read_grid(tmp_path / "g.json")
    assert a == b
    family = a.families[0]
    assert (family.name, family.group, family.learning_rates) == ("pre", "g", (1e-3, 3e-3))
    config = family.config(tmp_path / "run", 3e-3, 7)
    assert (config.learning_rate, config.seed, config.norm, config.hidden_size,
            config.progress) == (3e-3, 7, "rmsnorm", 32, False)


@pytest.mark.parametrize("edit,match", [
    (lambda g: g.update(extra={}), r"unknown section\(s\) \['extra'\]"),
    (lambda g: g["study"].update(seed=[1]), r"\[study\] has unknown key 'seed'"),
    (lambda g: g["study"].update(seeds=[0, 0]), r"\[study\] seeds must be .* distinct"),
    (lambda g: g["study"].update(target_loss="low"), r"\[study\] target_loss must be a number"),
    (lambda g: g["base"].update(seed=3), r"\[base\]: seed cannot be set here: the study sets it"),
    (lambda g: g["base"].update(hiden_size=3), r"\[family.pre\].*unknown config field.*hiden_size"),
    (lambda g: g["family"]["pre"].update(norm="rmsnrom"), r"\[family.pre\].*norm must be one of"),
    (lambda g: g["family"]["pre"].update(learning_rate=0.1), r"\[family.pre\]: learning_rate .*"
                                                               r"learning_rates"),
    (lambda g: g["family"]["pre"].update(learning_rates=[0.1, 0]),
     r"\[family.pre\]: learning_rates must be a non-empty list of distinct numbers > 0"),
    (lambda g: g["family"]["pre"].update(learning_rates=[0.1, 0.1]),
     r"\[family.pre\]: learning_rates must be .*distinct"),
    (lambda g: g["family"]["pre"].pop("learning_rates"), r"\[family.pre\]: learning_rates"),
    (lambda g: g["family"]["pre"].update(kind="audio"), r"\[family.pre\]: kind must be one of"),
    (lambda g: g["family"]["pre"].update(kind="vision"), r"\[family.pre\]: VisionConfig: unknown"),
    (lambda g: g.pop("family"), r"no \[family.NAME\] table"),
    (lambda g: g["family"].update(bad=[1]), r"\[family.bad\] must be a table"),
    (lambda g: g["family"]["pre"].update(group=["a", ""]), r"\[family.pre\]: group must be"),
])
def test_bad_grids_name_the_key(edit, match):
    values = grid_values()
    edit(values)
    with pytest.raises((ValueError, TypeError), match=match) as info:
        parse_grid(values, "g.toml")
    assert "\n" not in str(info.value) and str(info.value).startswith("g.toml")


def test_study_command_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[family.x\n")
    assert main(["study", "--grid", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not valid TOML" in err
    assert main(["study", "--grid", str(tmp_path / "none.toml")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main(["study", "--grid", str(bad), "--seeds", "1", "1"]) == 2
    assert "--seeds must be" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["study"])
    assert info.value.code == 2 and capsys.readouterr().err.count("\n") == 1
    with pytest.raises(SystemExit) as info:
        main(["study", "--grid", str(bad), "--jobs", "0"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1
    assert "--jobs: expected a positive int, got '0'" in err


# ---------------------------------------------------------------------- measures
def test_count_spikes_on_hand_made_curves():
    flat = [5.0] * 30
    assert count_spikes(flat, 0.5) == 0
    one = flat[:25] + [5.6] + flat[:4]
    assert count_spikes(one, 0.5) == 1
    assert count_spikes(one, 0.6) == 0  # 5.6 is not above 5.0 + 0.6
    long = flat[:25] + [6.0, 6.0, 6.0] + flat[:4]  # one spike lasting three steps
    assert count_spikes(long, 0.5) == 1
    two = flat[:22] + [6.0] + flat[:4] + [6.0] + flat[:2]
    assert count_spikes(two, 0.5) == 2
    early = [9.0, 5.0, 9.0] + flat  # within the first window: the initial fall
    assert count_spikes(early, 0.5) == 0


def test_summarize_hand_made_records():
    records = [{"step": s, "loss": 7.0 - 0.1 * s, "tokens": 100 * s,
                "tokens_per_s": [1.0, 500.0, 700.0, 600.0][s - 1]} for s in range(1, 5)]
    records[1].update(val_loss=6.8)
    records[3].update(val_loss=6.2)
    row = summarize(records, diverged=False, target_loss=6.5, spike_threshold=0.5)
    assert row["final_val_loss"] == 6.2 and row["best_val_loss"] == 6.2
    assert row["tokens_to_target"] == 400
    assert row["tokens_per_s"] == 600.0  # median without the first (compiling) step
    assert (row["steps"], row["tokens"], row["diverged"]) == (4, 400, "no")
    missed = summarize(records, diverged=False, target_loss=6.0, spike_threshold=0.5)
    assert math.isnan(missed["tokens_to_target"])
    diverged = summarize(records + [{"step": 5, "loss": math.nan, "tokens": 500}], True,
                         6.5, 0.5)
    assert math.isnan(diverged["final_val_loss"]) and diverged["best_val_loss"] == 6.2
    assert diverged["diverged"] == "yes" and diverged["steps"] == 5


# ---------------------------------------------------------------------- the runner
@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    ln.data.prepare_data(None, out, vocab_size=512)
    return out


def study_dir(prepared, tmp_path):
    """A study directory whose shared data is already prepared (saves tokenizing again)."""
    out = tmp_path / "study"
    shutil.copytree(prepared, out / "data" / "shakespeare-bpe512")
    return out


class Recorder:
    """Wraps the runner's Pretrainer: records each (run, resume) and can fail a run."""

    def __init__(self, monkeypatch, diverge=()):
        self.calls, self.diverge = [], diverge
        real = runner.Pretrainer

        def make(config, resume=False):
            self.calls.append((Path(config.out_dir).name, resume))
            trainer = real(config, resume=resume)
            if Path(config.out_dir).name in self.diverge:
                def run(_real_run=trainer.run):
                    _real_run(until=2)
                    raise FloatingPointError("training loss is nan at step 3")
                trainer.run = run
            return trainer

        monkeypatch.setattr(runner, "Pretrainer", make)


def test_runner_sweeps_selects_resumes_and_writes_results(prepared, tmp_path, monkeypatch):
    out = study_dir(prepared, tmp_path)
    grid = parse_grid(grid_values(diagnose=False))
    # A run interrupted after 3 of its 6 steps, before the study starts.
    interrupted = runner.run_path(out, "pre", 3e-3, 0)
    interrupted.mkdir(parents=True)
    runner.link_shared_data(out, grid.families[0].config(interrupted, 3e-3, 0), interrupted)
    ln.train.Pretrainer(grid.families[0].config(interrupted, 3e-3, 0)).run(until=3)

    calls = Recorder(monkeypatch).calls
    rows = Study(grid, out, progress=False).run()
    assert calls == [("lr0.001-seed0", False), ("lr0.003-seed0", True)]
    header = (out / "results.csv").read_text().splitlines()[0].split(",")
    assert tuple(header) == LM_COLUMNS
    for name in ("loss_curves.png", "final_val_loss.png", "table.md"):
        assert (out / name).stat().st_size > 0
    best = min(rows, key=lambda r: r["final_val_loss"])
    assert [r["selected"] for r in rows] == ["yes" if r is best else "no" for r in rows]
    assert all(r["steps"] == 6 and r["tokens"] == 6 * 4 * 32 for r in rows)
    metrics = ln.train.read_metrics(interrupted / "metrics.jsonl")
    assert [r["step"] for r in metrics] == list(range(1, 7))  # resumed, not restarted

    # Again: every run is finished, nothing trains; a second seed trains only at the best rate.
    calls.clear()
    again = Study(grid, out, progress=False).run()
    assert calls == [] and [r["final_val_loss"] for r in again] == [
        r["final_val_loss"] for r in rows]
    Study(grid, out, seeds=(0, 5), progress=False).run()
    assert calls == [(f"lr{best['lr']:g}-seed5", False)]


def test_parallel_families_give_the_serial_results(prepared, tmp_path):
    values = grid_values(diagnose=False)
    values["family"]["post"] = {"group": "g", "norm": "rmsnorm", "placement": "post",
                                "learning_rates": [1e-3, 3e-3]}
    grid = parse_grid(values)
    serial = Study(grid, study_dir(prepared, tmp_path / "serial"), progress=False).run()
    # No data prepared in advance: the main process makes it once for both workers.
    parallel_dir = tmp_path / "parallel"
    parallel = Study(grid, parallel_dir, progress=False).run(jobs=2)
    def measures(rows):  # all but the timings and the run's memory; NaN (never) as None
        return [{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()
                 if k not in ("tokens_per_s", "peak_memory_mb")} for r in rows]

    assert [r["family"] for r in parallel] == ["pre", "pre", "post", "post"]
    assert measures(parallel) == measures(serial)
    assert len((parallel_dir / "results.csv").read_text().splitlines()) == 5
    assert [p.name for p in (parallel_dir / "data").iterdir()] == ["shakespeare-bpe512"]


@pytest.mark.parametrize("jobs", [0, -1, 1.5, True])
def test_jobs_must_be_a_positive_int(jobs, tmp_path):
    with pytest.raises(ValueError, match=rf"jobs must be a positive int, got {jobs!r}"):
        Study(parse_grid(grid_values()), tmp_path, progress=False).run(jobs=jobs)


def test_a_diverged_run_is_recorded_not_raised(prepared, tmp_path, monkeypatch):
    out = study_dir(prepared, tmp_path)
    values = grid_values(diagnose=True)
    values["family"]["pre"].update(learning_rates=[3e-3, 1e-3], group=["g", "h"])
    Recorder(monkeypatch, diverge=("lr0.003-seed0",))
    rows = Study(parse_grid(values), out, progress=False).run()
    by_lr = {r["lr"]: r for r in rows}
    assert by_lr[3e-3]["diverged"] == "yes" and math.isnan(by_lr[3e-3]["final_val_loss"])
    assert by_lr[3e-3]["steps"] == 2
    assert by_lr[1e-3]["selected"] == "yes" and by_lr[3e-3]["selected"] == "no"
    with open(out / "results.csv", newline="") as f:
        saved = {r["lr"]: r for r in csv.DictReader(f)}
    assert (saved["0.003"]["diverged"], saved["0.003"]["final_val_loss"]) == ("yes", "")
    # The diagnostics of the selected run, grouped.
    for group in ("g", "h"):  # a family in two groups is in both plots
        assert (out / "diagnostics" / group / "diagnostics.png").stat().st_size > 0
    copied = runner.publish(out, tmp_path / "docs")
    names = {str(p.relative_to(tmp_path / "docs")) for p in copied}
    assert {"results.csv", "table.md", "loss_curves.png", "final_val_loss.png",
            "diagnostics/g/diagnostics.png", "diagnostics/h/diagnostics.csv"} <= names
    assert not any(n.startswith(("runs", "data")) for n in names)
    assert (runner.run_path(out, "pre", 1e-3, 0) / "diagnostics.csv").is_file()


def test_a_changed_grid_does_not_resume_a_run_silently(prepared, tmp_path):
    out = study_dir(prepared, tmp_path)
    values = grid_values(diagnose=False)
    values["family"]["pre"]["learning_rates"] = [1e-3]
    directory = runner.run_path(out, "pre", 1e-3, 0)
    grid = parse_grid(values)
    directory.mkdir(parents=True)
    runner.link_shared_data(out, grid.families[0].config(directory, 1e-3, 0), directory)
    ln.train.Pretrainer(grid.families[0].config(directory, 1e-3, 0)).run(until=3)
    values["base"]["hidden_size"] = 64
    with pytest.raises(ValueError, match="hidden_size cannot change"):
        Study(parse_grid(values), out, progress=False).run()


# ---------------------------------------------------------------------- vision
def test_conv_blocks_keep_the_shape_and_the_1d_ones_are_causal():
    for norm in ("patchnorm", "layernorm", "rmsnorm", "groupnorm", "none"):
        mx.random.seed(0)
        block2 = ConvBlock(VisionConfig(norm=norm, channels=8), 1, 2)
        assert block2(mx.random.normal((2, 8, 8, 1))).shape == (2, 8, 8, 8)
        block1 = ConvBlock(VisionConfig(norm=norm, channels=8, kernel_size=3), 1, 1)
        x = np.random.default_rng(0).normal(size=(1, 12, 1)).astype(np.float32)
        changed = x.copy()
        changed[0, 7:] += 5.0  # the future from position 7 on
        a, b = np.array(block1(mx.array(x))), np.array(block1(mx.array(changed)))
        assert a.shape == (1, 12, 8)
        assert not np.allclose(a[0, 7:], b[0, 7:]), norm
        if norm != "groupnorm":  # GroupNorm's statistics span every position
            np.testing.assert_array_equal(a[0, :7], b[0, :7], err_msg=norm)


def test_vision_config_errors_name_the_field():
    with pytest.raises(ValueError, match="dataset must be one of"):
        VisionConfig(dataset="cifar")
    with pytest.raises(ValueError, match="groups=3 must divide channels=8"):
        VisionConfig(norm="groupnorm", channels=8, groups=3)
    with pytest.raises(TypeError, match="steps must be an int, got 2.5"):
        VisionConfig(steps=2.5)


def test_vision_smoke_on_digits(tmp_path):
    pytest.importorskip("sklearn")
    records = train_vision(VisionConfig(out_dir=str(tmp_path), dataset="digits", channels=8,
                                        depth=1, steps=4, eval_every=2, batch_size=16))
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [r["step"] for r in records if "val_accuracy" in r] == [2, 4]
    assert all(0 <= r["val_accuracy"] <= 1 for r in records if "val_accuracy" in r)
    assert ln.train.read_metrics(tmp_path / "metrics.jsonl") == records


def test_mnist1d_classifier_shapes(monkeypatch):
    mnist1d = pytest.importorskip("mnist1d.data")
    from mlx_localnorm.study.vision import load_dataset

    small = mnist1d.get_dataset_args()
    small.num_samples = 200  # the study uses the default 5,000; this is about the plumbing
    monkeypatch.setattr(mnist1d, "get_dataset_args", lambda: small)
    state = np.random.get_state()
    data = load_dataset("mnist1d")
    assert np.random.get_state()[1].tolist() == state[1].tolist()  # global RNG untouched
    assert data["x"].shape == (160, 40, 1) and data["x_test"].shape == (40, 40, 1)
    assert data["y"].dtype == np.int32 and set(data["y"].tolist()) <= set(range(10))
    model = ConvClassifier(VisionConfig(dataset="mnist1d", channels=8))
    assert model(mx.array(data["x"][:3])).shape == (3, 10)


def test_estimate_times_each_family_and_writes_its_csv(prepared, tmp_path):
    from mlx_localnorm.study.estimate import COLUMNS, estimate

    out = study_dir(prepared, tmp_path)
    values = grid_values()
    values["family"]["pre"]["learning_rates"] = [1e-3]
    grid = parse_grid(values)
    rows = estimate(grid, out, seeds=(0, 1), short=1, long=2)
    (row,) = rows
    assert (row["family"], row["runs"], row["steps"]) == ("pre", 2, 6)
    assert row["cpu_family_s"] == pytest.approx(2 * row["cpu_run_s"])
    assert row["cpu_run_s"] >= row["cpu_overhead_s"] >= 0
    header = (out / "estimate.csv").read_text().splitlines()[0]
    assert tuple(header.split(",")) == COLUMNS
    assert not list(out.glob(".estimate-*"))  # the scratch runs are gone


def test_estimate_splits_step_and_fixed_seconds():
    from mlx_localnorm.study.estimate import _split

    assert _split(2.0, 5.0, 3, 9) == pytest.approx((0.5, 0.5))
    step, fixed = _split(5.0, 4.0, 3, 9)  # noise: the longer run was faster
    assert step == pytest.approx(4.0 / 9) and fixed == pytest.approx(5.0 - 3 * 4.0 / 9)
