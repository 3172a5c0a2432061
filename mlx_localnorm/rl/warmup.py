"""A supervised warm-up for a shipped task: pre-train a new small model on its demonstrations.

GRPO only sharpens what the policy can already sample: a model that never writes an answer
gets equal rewards in every group and no signal. The warm-up teaches a fresh LocalNorm model
the task's format (and some of its content) with the pre-training loop, one demonstration
per document (``<s> prompt answer\\n </s>``), so the policy learns to stop after its answer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..data._io import atomic_open
from ..train import PretrainConfig, Pretrainer, list_checkpoints, resume_config
from .tasks import demonstrations

DEMONSTRATIONS = "demonstrations.jsonl"
# A character-level model small enough to warm up in minutes on a CPU.
WARMUP_DEFAULTS = {"hidden_size": 128, "num_layers": 2, "num_heads": 4, "seq_len": 64,
                   "batch_size": 16, "context_length": 128, "optimizer": "adamw",
                   "learning_rate": 3e-3, "warmup_steps": 20, "eval_every": 0,
                   "sample_tokens": 0, "demonstrations": 20000}
# sentencepiece's special and byte pieces; then one piece per character, no merges: a
# character-level vocabulary, so an answer tokenizes the same wherever it appears.
_FIXED_PIECES = 260


def write_demonstrations(task: str, path: Path, n: int, seed: int) -> int:
    """Write ``n`` training demonstrations of ``task`` as JSONL documents (atomically);
    return the character-level vocabulary size of their text."""
    texts = demonstrations(task, n, seed)
    with atomic_open(path, "w") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    # "\n" is a byte piece; sentencepiece writes " " as its own piece.
    chars = set("".join(texts)) - {"\n"}
    return _FIXED_PIECES + len(chars)


def warmup(task: str, out_dir: str | Path, steps: int, seed: int = 0,
           overrides: dict[str, Any] | None = None, progress: bool = True) -> Path:
    """Pre-train (or finish pre-training) the warm-up model of ``task`` in ``out_dir``.

    ``overrides`` are :class:`PretrainConfig` fields over :data:`WARMUP_DEFAULTS` (plus
    ``demonstrations``, their count). A run already in ``out_dir`` is continued (a finished
    one is only exported again); only its ``steps`` may differ. Returns ``out_dir``, which
    ``mlx_lm.load`` then reads.
    """
    out_dir = Path(out_dir)
    settings = {**WARMUP_DEFAULTS, **(overrides or {})}
    corpus = out_dir / DEMONSTRATIONS
    vocab_size = write_demonstrations(task, corpus, settings.pop("demonstrations"), seed)
    fields = {"vocab_size": vocab_size, **settings, "corpus": str(corpus), "steps": steps,
              "seed": seed, "save_every": max(steps // 4, 1), "progress": progress}
    resume = bool(list_checkpoints(out_dir))
    if resume:  # a changed setting other than steps is refused, naming it
        config = resume_config(out_dir, fields)
    else:
        config = PretrainConfig.from_dict({**fields, "out_dir": str(out_dir)},
                                          where="warmup_config")
    summary = Pretrainer(config, resume=resume).run()
    if summary["interrupted"]:
        raise KeyboardInterrupt(f"the warm-up stopped at step {summary['step']} (checkpoint "
                                "written); run the same command again to continue it")
    return out_dir
