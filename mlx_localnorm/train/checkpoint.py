"""Atomic, self-checking checkpoints: model, optimizer state, data position, RNG, config.

A checkpoint is a directory ``step_NNNNNNN`` holding ``model.safetensors``,
``optimizer.safetensors`` and ``state.json``. It is written into a hidden staging directory
and renamed into place, so a crash or a full disk leaves the previous checkpoints
untouched; a saved step is never overwritten. Only the newest ``keep`` are kept: an old one
is first renamed into a hidden trash directory, then deleted, so a crash never leaves a
half-deleted checkpoint under its listed name. :func:`remove_leftovers` deletes the
staging and trash directories a killed process left behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten

FORMAT = 1
PREFIX = "step_"
# Hidden directories of a checkpoint being written / being deleted.
STAGING, TRASH = ".tmp-", ".trash-"


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or does not fit the run."""


def checkpoint_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary directories are ignored)."""
    root = checkpoint_dir(out_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
             and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def save_checkpoint(out_dir: str | Path, step: int, model: nn.Module,
                    optimizer: optim.Optimizer, state: dict[str, Any], keep: int = 3) -> Path:
    """Write checkpoint ``step`` atomically and prune all but the newest ``keep``.

    Raises ``FileExistsError`` if ``step`` is already saved: replacing it would leave a
    moment with no complete checkpoint of that step.
    """
    if not _is_int(step) or step < 0:
        raise ValueError(f"save_checkpoint: step must be an int >= 0, got {step!r}")
    if not _is_int(keep) or keep < 1:
        raise ValueError(f"save_checkpoint: keep must be a positive int, got {keep!r}")
    root = checkpoint_dir(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:07d}"
    if final.exists():
        raise FileExistsError(f"checkpoint {final} already exists; a saved step is never "
                              "overwritten (delete it first to save this step again)")
    staging = Path(tempfile.mkdtemp(prefix=STAGING, dir=root))
    try:
        mx.save_safetensors(str(staging / "model.safetensors"),
                            dict(tree_flatten(model.parameters())))
        mx.save_safetensors(str(staging / "optimizer.safetensors"),
                            dict(tree_flatten(optimizer.state)))
        payload = {"format": FORMAT, "step": step, **state}
        (staging / "state.json").write_text(json.dumps(payload, indent=1))
        os.rename(staging, final)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    for old in list_checkpoints(out_dir)[:-keep]:
        delete_checkpoint(old)
    return final


def delete_checkpoint(path: str | Path) -> None:
    """Delete checkpoint ``path``: renamed out of the listing first, then removed."""
    path = Path(path)
    trash = Path(tempfile.mkdtemp(prefix=TRASH, dir=path.parent))
    os.rename(path, trash / path.name)
    shutil.rmtree(trash)


def remove_leftovers(out_dir: str | Path) -> list[Path]:
    """Delete the staging and trash directories of a killed run; return what was removed.

    Only hidden directories this module creates (``.tmp-*``, ``.trash-*``) inside the
    run's ``checkpoints`` directory are touched. Call it when no process writes checkpoints.
    """
    root = checkpoint_dir(out_dir)
    if not root.is_dir():
        return []
    stale = [p for p in root.iterdir() if p.is_dir() and not p.is_symlink()
             and p.name.startswith((STAGING, TRASH))]
    for path in stale:
        shutil.rmtree(path)
    return stale


def load_checkpoint(path: str | Path, model: nn.Module,
                    optimizer: optim.Optimizer) -> dict[str, Any]:
    """Restore ``model`` and ``optimizer`` from ``path``; return its ``state.json``.

    Everything is read and checked against the model and optimizer before either is
    changed, so a bad checkpoint raises :class:`CheckpointError` and alters nothing.
    """
    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text())
        weights = mx.load(str(path / "model.safetensors"))
        opt_state = mx.load(str(path / "optimizer.safetensors"))
    except (OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"checkpoint {path} is unreadable ({err}); delete it to resume "
                              "from the one before") from err
    if state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {state.get('format')!r}, "
                              f"expected {FORMAT}")
    _check_same_tree(dict(tree_flatten(model.parameters())), weights, f"{path} model")
    _check_same_tree(dict(tree_flatten(optimizer.state)), opt_state, f"{path} optimizer")
    model.load_weights(list(weights.items()))
    optimizer.state = tree_unflatten(list(opt_state.items()))
    return state


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_same_tree(expected: dict[str, mx.array], got: dict[str, mx.array],
                     what: str) -> None:
    missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    if missing or extra:
        raise CheckpointError(f"{what} does not fit this run: missing {missing[:5]}, "
                              f"unexpected {extra[:5]}")
    for key, value in expected.items():
        if value.shape != got[key].shape or value.dtype != got[key].dtype:
            raise CheckpointError(f"{what}: {key} is {got[key].shape} {got[key].dtype}, the "
                                  f"run expects {value.shape} {value.dtype}")
