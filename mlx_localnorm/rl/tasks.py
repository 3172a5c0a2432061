"""Verifiable tasks shipped with the package: prompt generators and their reward.

- ``"reverse"``: ``"reverse abcd ="`` -> ``"dcba"`` (3 to 6 random lowercase letters).
- ``"add"``: ``"23+45="`` -> ``"68"`` (two numbers 0-99).
- ``"add1"``: ``"3+4="`` -> ``"7"`` (two 1-digit numbers: 100 prompts, 16 of them held out);
  small enough for a tiny model to learn in minutes on a CPU (see docs/rl.md).

Records are ``{"prompt": ..., "answer": ...}``, the same form as a prompts file
(:func:`~mlx_localnorm.rl.load_prompts`), so :func:`answer_match` also scores your own
prompts that carry an ``answer`` field.
"""

from __future__ import annotations

import random
import string
import zlib

from ..ops._checks import check_choice, check_size

SPLITS = ("train", "test")


def _reverse(rng: random.Random) -> tuple[str, str]:
    word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 6)))
    return f"reverse {word} =", word[::-1]


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return f"{a}+{b}=", str(a + b)


def _add1(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return f"{a}+{b}=", str(a + b)


TASKS = {"reverse": _reverse, "add": _add, "add1": _add1}


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
        prompt, answer = TASKS[task](rng)
        if _split_of(prompt) == split:
            records.append({"prompt": prompt, "answer": answer})
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


def demonstration(record: dict) -> str:
    """The text of a correct completion: prompt, answer, newline (for a supervised warm-up)."""
    return f"{record['prompt']} {record['answer']}\n"
