"""Reward functions: checked calls, weighted combinations, ``MODULE:FUNCTION`` specs and
prompt files.

A reward function is any callable ``reward(prompt, completion, **fields) -> float``; the
fields are the other entries of the prompt's record (e.g. ``answer``).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import numbers
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from ..ops._checks import check_number

RewardFn = Callable[..., float]


class RewardError(ValueError):
    """A reward function raised or returned a non-finite value; the message names the
    function and the prompt."""


class RewardTypeError(RewardError, TypeError):
    """A reward function returned something that is not a number."""


def reward_name(fn) -> str:
    """``module:qualname`` of a function (the form :func:`load_reward` reads), else its repr."""
    qualname = getattr(fn, "__qualname__", None)
    return f"{getattr(fn, '__module__', '?')}:{qualname}" if qualname else repr(fn)


def _short(value: object, limit: int = 120) -> str:
    """``repr(value)``, cut to ``limit`` characters: prompts can be long."""
    shown = repr(value)
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


def call_reward(fn: RewardFn, prompt: str, completion: str, fields: dict) -> float:
    """``fn(prompt, completion, **fields)`` as a finite float, or an error naming both."""
    try:
        value = fn(prompt, completion, **fields)
    except RewardError:
        raise
    except Exception as e:
        raise RewardError(f"reward {reward_name(fn)} raised {type(e).__name__}: {e} "
                          f"on prompt {_short(prompt)}") from e
    if not isinstance(value, numbers.Real):
        raise RewardTypeError(f"reward {reward_name(fn)} returned {_short(value)}, expected a "
                              f"number (int or float), on prompt {_short(prompt)}")
    if not math.isfinite(value):
        raise RewardError(f"reward {reward_name(fn)} returned {value}, expected a finite "
                          f"number, on prompt {_short(prompt)}")
    return float(value)


def _check_reward(fn, name: str, owner: str) -> RewardFn:
    if not callable(fn):
        raise TypeError(f"{owner}: {name} must be callable (prompt, completion, **fields) -> "
                        f"float, got {fn!r}")
    return fn


def score_completions(reward: RewardFn, records: Sequence[dict],
                      completions: Sequence[str]) -> list[float]:
    """The reward of each completion; ``records[i]`` holds its ``prompt`` and the fields."""
    owner = "score_completions"
    _check_reward(reward, "reward", owner)
    if len(completions) != len(records):
        raise ValueError(f"{owner}: completions must number {len(records)} (one per record), "
                         f"got {len(completions)}")
    scores = []
    for record, completion in zip(records, completions):
        fields = {k: v for k, v in record.items() if k != "prompt"}
        scores.append(call_reward(reward, record["prompt"], completion, fields))
    return scores


class WeightedReward:
    r"""Weighted sum of reward functions, :math:`r = \sum_k w_k r_k`; each is checked alone."""

    def __init__(self, functions: Sequence[RewardFn], weights: Sequence[float]):
        self.functions, self.weights = list(functions), list(weights)
        self.__qualname__ = "combine_rewards(" + ", ".join(
            f"{w:g}*{reward_name(f)}" for f, w in zip(self.functions, self.weights)) + ")"

    def __call__(self, prompt: str, completion: str, **fields) -> float:
        return sum(w * call_reward(f, prompt, completion, fields)
                   for f, w in zip(self.functions, self.weights))


def combine_rewards(functions: Sequence[RewardFn],
                    weights: Sequence[float] | None = None) -> WeightedReward:
    """One reward function from several, weighted (default: all weights 1)."""
    owner = "combine_rewards"
    functions = list(functions)
    if not functions:
        raise ValueError(f"{owner}: functions must hold at least one reward, got []")
    for i, fn in enumerate(functions):
        _check_reward(fn, f"functions[{i}]", owner)
    weights = [1.0] * len(functions) if weights is None else list(weights)
    if len(weights) != len(functions):
        raise ValueError(f"{owner}: weights must hold {len(functions)} number(s), one per "
                         f"function, got {len(weights)}")
    weights = [check_number(w, f"weights[{i}]", owner) for i, w in enumerate(weights)]
    return WeightedReward(functions, weights)


def _import_module(module: str):
    """A module by dotted name, or a ``.py`` file by path (not on ``sys.path``)."""
    if not module.endswith(".py"):
        return importlib.import_module(module)
    path = Path(module)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    if not path.is_file() or spec is None:
        raise FileNotFoundError(f"no such file: {module}")
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return loaded


def load_reward(spec: str) -> RewardFn:
    """The reward function named by ``"MODULE:FUNCTION"`` or ``"path/to/file.py:FUNCTION"``."""
    expected = "reward spec must be 'MODULE:FUNCTION' or 'FILE.py:FUNCTION'"
    if not isinstance(spec, str):
        raise TypeError(f"load_reward: {expected}, got {spec!r}")
    module, _, attr = spec.rpartition(":")
    if not module or not attr:
        raise ValueError(f"load_reward: {expected}, got {spec!r}")
    try:
        target = _import_module(module)
    except Exception as e:
        raise ValueError(f"reward spec {spec!r}: cannot import {module}: "
                         f"{type(e).__name__}: {e}") from e
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ValueError(f"reward spec {spec!r}: {module} has no attribute {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise TypeError(f"reward spec {spec!r} is not callable, it is a "
                        f"{type(target).__name__}")
    return target


def _prompt_record(line: str, where: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f'{where}: not a JSON object ({e.msg}); expected {{"prompt": "...", '
                         f'...fields for the reward}}') from None
    if not isinstance(record, dict) or "prompt" not in record:
        got = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ValueError(f'{where}: record has no "prompt" field (got {got})')
    if not isinstance(record["prompt"], str):
        raise TypeError(f'{where}: "prompt" must be a string, got '
                        f'{type(record["prompt"]).__name__}')
    if "completion" in record:
        raise ValueError(f'{where}: the field "completion" is reserved for the sampled '
                         f'completion; rename it (e.g. "answer")')
    return record


def load_prompts(path: str | os.PathLike) -> list[dict]:
    """Prompt records from a JSONL file: ``{"prompt": ..., **fields}`` per line.

    The fields (all but ``prompt``) reach the reward function as keyword arguments.
    """
    records = []
    try:
        with open(path, encoding="utf-8-sig") as f:
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    records.append(_prompt_record(line, f"{path}:{lineno}"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not records:
        raise ValueError(f"{path}: no prompts (expected one JSON object per line)")
    return records
