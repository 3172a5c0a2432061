"""``mlx-localnorm demo`` (what ``make demo`` runs): pre-train a LocalNorm LM on Shakespeare.

About 10M parameters (SeeDNorm + Peri-LN + Muon, 8 blocks of width 256, an 8192-piece
sentencepiece vocabulary) for about 5 minutes on a 2-core CPU, faster on a Mac. It writes
``runs/demo/`` (metrics, loss plot, checkpoints, tokenizer, an mlx-lm loadable model),
prints a generated sample and the mlx-lm command that generates from the saved model. A
second ``make demo`` continues (or re-samples) the run in ``runs/demo`` with its saved
config (flags a resumed run may change, such as ``--steps``, still apply); delete that
folder to start over. Any ``mlx-localnorm pretrain`` flag can be added.
"""

from __future__ import annotations

from .train import command

# Sized for about 5 minutes at ~1100 tokens/s (2-core x86 CPU, OpenBLAS): 150 steps of 2048.
DEMO_DEFAULTS = {"out_dir": "runs/demo", "seq_len": 128, "batch_size": 16, "steps": 150,
                 "warmup_steps": 15, "eval_every": 25, "save_every": 50}


def main(argv: list[str] | None = None) -> int:
    return command.main(argv, defaults=DEMO_DEFAULTS, prog="mlx-localnorm demo",
                        continue_saved=True)
