"""``save_model`` never destroys what it was not asked to replace, and survives crashes."""

import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from mlx.utils import tree_flatten
from test_models import TOKENS, tiny_model, tiny_tokenizer

from mlx_localnorm.models import save_model

TESTS = Path(__file__).parent


def snapshot(root: Path) -> dict:
    """Every file under ``root`` with its bytes (directories included as None)."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


def saved_weights_equal(path: Path, seed: int) -> bool:
    """``path`` holds the complete weights of ``tiny_model(seed)``."""
    want = dict(tree_flatten(tiny_model(seed).parameters()))
    got = mx.load(str(path / "model.safetensors"))
    return got.keys() == want.keys() and all(
        np.array_equal(np.array(got[k]), np.array(want[k])) for k in want)


class FailingTokenizer:
    def save_pretrained(self, path):
        raise RuntimeError("disk full")


def test_refuses_a_run_directory_and_leaves_it_untouched(tmp_path):
    run = tmp_path / "runs" / "demo"
    step = run / "checkpoints" / "step_0000010"
    step.mkdir(parents=True)
    (step / "model.safetensors").write_bytes(b"weights of step 10")
    (run / "config.json").write_text('{"model_type": "localnorm"}')
    before = snapshot(run)
    with pytest.raises(ValueError, match=r"(?s)save_model: path .*demo.* is not empty.*"
                                         r"checkpoints.*overwrite=True"):
        save_model(tiny_model(), tiny_tokenizer(), run)
    assert snapshot(run) == before
    assert os.listdir(run.parent) == ["demo"]  # no staging directory left behind


def test_refuses_a_file_unless_told_to_overwrite(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("my notes")
    with pytest.raises(ValueError, match=r"(?s)notes\.txt.* is a file.*overwrite=True"):
        save_model(tiny_model(), tiny_tokenizer(), path)
    assert path.read_text() == "my notes"
    save_model(tiny_model(), tiny_tokenizer(), path, overwrite=True)
    assert saved_weights_equal(path, seed=0)
    assert os.listdir(tmp_path) == ["notes.txt"]


def test_refuses_a_saved_model_with_files_added_by_the_user(tmp_path):
    path = save_model(tiny_model(), tiny_tokenizer(), tmp_path / "m")
    (path / "README.md").write_text("my model card")
    with pytest.raises(ValueError, match=r"(?s)is not empty.*README\.md.*overwrite=True"):
        save_model(tiny_model(seed=1), tiny_tokenizer(), path)
    assert (path / "README.md").read_text() == "my model card"
    assert saved_weights_equal(path, seed=0)


def test_replaces_an_empty_directory_and_its_own_model(tmp_path):
    path = tmp_path / "m"
    path.mkdir()
    save_model(tiny_model(seed=0), tiny_tokenizer(), path)
    save_model(tiny_model(seed=1), tiny_tokenizer(), path)
    loaded, _ = mlx_lm.load(str(path), trust_remote_code=True)
    np.testing.assert_array_equal(np.array(loaded(TOKENS)), np.array(tiny_model(seed=1)(TOKENS)))
    assert os.listdir(tmp_path) == ["m"]


def test_a_failed_save_keeps_the_previous_model(tmp_path):
    path = save_model(tiny_model(seed=0), tiny_tokenizer(), tmp_path / "m")
    with pytest.raises(RuntimeError, match="disk full"):
        save_model(tiny_model(seed=1), FailingTokenizer(), path)
    assert saved_weights_equal(path, seed=0)
    assert os.listdir(tmp_path) == ["m"]


def test_an_error_between_the_renames_puts_the_previous_model_back(tmp_path, monkeypatch):
    path = save_model(tiny_model(seed=0), tiny_tokenizer(), tmp_path / "m")
    real_rename, calls = os.rename, []

    def rename(src, dst):
        calls.append(src)
        if len(calls) == 2:  # the new model into place, after the old one was moved aside
            raise OSError("I/O error")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="I/O error"):
        save_model(tiny_model(seed=1), tiny_tokenizer(), path)
    monkeypatch.undo()
    assert saved_weights_equal(path, seed=0)
    assert os.listdir(tmp_path) == ["m"]


# A process killed (no cleanup at all) at one point of save_model's sequence.
CRASH_SCRIPT = """
import os, shutil, sys
sys.path.insert(0, sys.argv[3])
import mlx_localnorm
from test_models import tiny_model, tiny_tokenizer
from mlx_localnorm.models import save_model

point, path = sys.argv[1], sys.argv[2]
real_rename, real_rmtree, renames = os.rename, shutil.rmtree, []

def rename(src, dst):
    renames.append(src)
    if (point, len(renames)) in (("before_renames", 1), ("between_renames", 2)):
        os._exit(9)
    real_rename(src, dst)

def rmtree(p, *args, **kwargs):
    if point == "while_deleting_old":
        os.remove(os.path.join(p, "model.safetensors"))  # half deleted, then killed
        os._exit(9)
    real_rmtree(p, *args, **kwargs)

os.rename, shutil.rmtree = rename, rmtree
save_model(tiny_model(seed=1), tiny_tokenizer(), path)
"""


@pytest.mark.parametrize("point,survivor", [
    ("before_renames", 0), ("between_renames", 0), ("while_deleting_old", 1)])
def test_a_kill_at_any_point_loses_no_model(tmp_path, point, survivor):
    path = save_model(tiny_model(seed=0), tiny_tokenizer(), tmp_path / "m")
    killed = subprocess.run([sys.executable, "-c", CRASH_SCRIPT, point, str(path), str(TESTS)],
                            capture_output=True, text=True)
    assert killed.returncode == 9, killed.stderr
    # The next save cleans up, restores a model moved aside, and still refuses nothing of ours.
    with pytest.raises(RuntimeError, match="disk full"):
        save_model(tiny_model(seed=2), FailingTokenizer(), path)
    assert saved_weights_equal(path, seed=survivor)
    assert os.listdir(tmp_path) == ["m"]
    save_model(tiny_model(seed=2), tiny_tokenizer(), path)
    assert saved_weights_equal(path, seed=2)
    assert os.listdir(tmp_path) == ["m"]


LOAD_SCRIPT = """
import os, sys, warnings
import mlx_lm  # imports MLX first, as every mlx-lm user does
warnings.simplefilter("error")
mlx_lm.load(sys.argv[1], trust_remote_code=True)
print(os.environ.get("MLX_LOCALNORM_FAST_BLAS", "unset"))
"""


def test_loading_a_saved_model_changes_no_environment_and_warns_nothing(tmp_path):
    """The model file must not leak a BLAS choice into processes the loader starts later."""
    save_model(tiny_model(), tiny_tokenizer(), tmp_path / "m")
    env = {k: v for k, v in os.environ.items() if k != "MLX_LOCALNORM_FAST_BLAS"}
    loaded = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, str(tmp_path / "m")],
                            capture_output=True, text=True, env=env, timeout=120)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.split() == ["unset"]
