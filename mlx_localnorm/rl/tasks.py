"""Verifiable tasks shipped with the package: prompt generators and their reward.

- ``"reverse"``: ``"reverse abcd ="`` -> ``"dcba"`` (3 to 6 random lowercase letters).
- ``"add"``: ``"23+45="`` -> ``"68"`` (two numbers 0-99).
- ``"add1"``: ``"3+4="`` -> ``"7"`` (two 1-digit numbers: 100 prompts, 16 of them held out).
- ``"bookends"``: ``"s..t ="`` -> a word of :func:`word_list` that starts with ``s`` and
  ends with ``t`` (``"sweet"``, ``"spirit"``, ...; :func:`bookends_match` gives partial
  credit); 232 letter pairs, 27 held out. Its warm-up completes one prompt in five with a
  fitting word and the rest with random list words, so GRPO has most of it to learn.

Records are ``{"prompt": ..., fields}``, the same form as a prompts file
(:func:`~mlx_localnorm.rl.load_prompts`): ``answer`` for the first three (scored by
:func:`answer_match`, which also scores your own prompts that carry an ``answer``),
``first`` and ``last`` for ``bookends`` (:func:`bookends_match`). :func:`task_reward` gives
each task's reward.
"""

from __future__ import annotations

import functools
import random
import re
import string
import zlib
from collections import Counter

from ..data.corpus import load_corpus
from ..ops._checks import check_choice, check_size

SPLITS = ("train", "test")
# bookends' words: lowercase words of 3-7 letters written at least 30 times (in lowercase,
# so names and speaker tags are out) in the training works of the embedded Shakespeare.
WORD_LENGTHS = (3, 7)
WORD_MIN_COUNT = 30
# Share of bookends warm-up demonstrations whose word fits the prompt (the rest are random).
BOOKENDS_FIT = 0.2


def _reverse(rng: random.Random) -> dict:
    word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 6)))
    return {"prompt": f"reverse {word} =", "answer": word[::-1]}


def _add(rng: random.Random) -> dict:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return {"prompt": f"{a}+{b}=", "answer": str(a + b)}


def _add1(rng: random.Random) -> dict:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return {"prompt": f"{a}+{b}=", "answer": str(a + b)}


@functools.lru_cache(maxsize=1)
def word_list() -> tuple[str, ...]:
    """The ``bookends`` vocabulary, sorted: 1,749 words (``WORD_LENGTHS``, ``WORD_MIN_COUNT``)."""
    counts = Counter(w for text in load_corpus().train for w in re.findall(r"[A-Za-z]+", text)
                     if w.islower())
    low, high = WORD_LENGTHS
    return tuple(sorted(w for w, c in counts.items()
                        if c >= WORD_MIN_COUNT and low <= len(w) <= high))


@functools.lru_cache(maxsize=1)
def _word_set() -> frozenset[str]:
    return frozenset(word_list())


@functools.lru_cache(maxsize=1)
def bookend_pairs() -> tuple[tuple[str, str], ...]:
    """The (first, last) letter pairs ``bookends`` asks for: those of two or more list words,
    so every prompt has a choice of right answers."""
    pairs = Counter((w[0], w[-1]) for w in word_list())
    return tuple(sorted(p for p, n in pairs.items() if n >= 2))


def _bookends(rng: random.Random) -> dict:
    first, last = rng.choice(bookend_pairs())
    return {"prompt": f"{first}..{last} =", "first": first, "last": last}


TASKS = {"reverse": _reverse, "add": _add, "add1": _add1, "bookends": _bookends}


def _split_of(prompt: str) -> str:
    # A fixed hash, not the seed, picks the split: held-out prompts never appear in training.
    return "test" if zlib.crc32(prompt.encode()) % 10 == 0 else "train"


def make_prompts(task: str, n: int, seed: int = 0, split: str = "train") -> list[dict]:
    """``n`` records ``{"prompt", "answer"}`` of ``task``, the same for the same ``seed``.

    About one prompt in ten belongs to the ``"test"`` split, the rest to ``"train"``.
    """
    owner = "make_prompts"
    check_choice(task, tuple(TASKS), "task", owner)
    check_size(n, "n", owner)
    check_choice(split, SPLITS, "split", owner)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"{owner}: seed must be an int, got {seed!r}")
    rng = random.Random(seed)
    records = []
    while len(records) < n:
        record = TASKS[task](rng)
        if _split_of(record["prompt"]) == split:
            records.append(record)
    return records


def answer_match(prompt: str, completion: str, answer: str, **fields) -> float:
    r"""Share of the answer's characters matched in place by the completion's first line.

    .. math:: r = \frac{\#\{i : c_i = a_i\}}{\max(|c|, |a|)}

    with :math:`c` the completion's first line stripped of spaces: 1 exactly for the right
    answer, partial credit otherwise (a denser signal for a small model).
    """
    if not isinstance(answer, str) or not answer:
        raise TypeError(f"answer_match: answer must be a non-empty string, got {answer!r}")
    got = completion.split("\n", 1)[0].strip()
    matches = sum(c == a for c, a in zip(got, answer))
    return matches / max(len(got), len(answer))


def bookends_match(prompt: str, completion: str, first: str, last: str, **fields) -> float:
    r"""1/2 for the right first letter, 1/4 more if it begins a list word, 1/4 more if that
    word also ends in the right letter.

    .. math:: r = [w_1 = f]\,\big(\tfrac12 + \tfrac14 [w \in W]
              + \tfrac14 [w \in W]\,[w_{|w|} = l]\big)

    with :math:`w` the completion's first line stripped of spaces and :math:`W` the
    :func:`word_list`. The first letter gates the rest, so one word said to every prompt
    earns little; a non-word earns less than a word.
    """
    for name, letter in (("first", first), ("last", last)):
        if not (isinstance(letter, str) and len(letter) == 1 and letter.islower()):
            raise TypeError(f"bookends_match: {name} must be one lowercase letter, got "
                            f"{letter!r}")
    word = completion.split("\n", 1)[0].strip()
    if not word.startswith(first):
        return 0.0
    if word not in _word_set():
        return 0.5
    return 0.75 + 0.25 * (word[-1] == last)


TASK_REWARDS = {"reverse": answer_match, "add": answer_match, "add1": answer_match,
                "bookends": bookends_match}


def task_reward(task: str):
    """The reward function of a shipped task."""
    check_choice(task, tuple(TASKS), "task", "task_reward")
    return TASK_REWARDS[task]


def demonstration(record: dict) -> str:
    """The text of a correct completion: prompt, answer, newline (for a supervised warm-up)."""
    return f"{record['prompt']} {record['answer']}\n"


def demonstrations(task: str, n: int, seed: int = 0) -> list[str]:
    """``n`` warm-up documents from ``task``'s train split: prompt, completion, newline.

    The completion is the answer, except for ``bookends``: a word that fits both letters
    only for a share ``BOOKENDS_FIT`` of the prompts, a random list word otherwise, so the
    warm-up teaches the format, the words and a little of the task, and GRPO has the rest
    to learn.
    """
    records = make_prompts(task, n, seed=seed, split="train")
    if task != "bookends":
        return [demonstration(r) for r in records]
    words, rng = word_list(), random.Random(f"bookends-words-{seed}")
    fitting = {}
    for w in words:
        fitting.setdefault((w[0], w[-1]), []).append(w)
    texts = []
    for r in records:
        fits = rng.random() < BOOKENDS_FIT
        word = rng.choice(fitting[r["first"], r["last"]] if fits else words)
        texts.append(f"{r['prompt']} {word}\n")
    return texts
