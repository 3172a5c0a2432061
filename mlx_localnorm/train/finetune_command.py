"""``mlx-localnorm finetune``: every ``FinetuneConfig`` field is a flag (``--field-name``).

A user error ends the command with one line on stderr, no traceback: exit status 2 for an
invalid command line, 1 for a model, data set, run directory or checkpoint that does not fit,
or a file that cannot be read or written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .._argparse import OneLineParser
from .command import add_config_flags, fail, io_error
from .finetune import FinetuneConfig, resume_config

PROG = "mlx-localnorm finetune"


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog=PROG, description="Fine-tune a model mlx-lm loads (lora, dora, "
                           "norms or full) on JSONL data; writes an adapter mlx_lm.load "
                           "applies (adapter_path=OUT_DIR).", argument_default=argparse.SUPPRESS)
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out-dir from its newest checkpoint")
    add_config_flags(parser, FinetuneConfig, aliases={"out_dir": ["--out"]})
    return parser


def parse_config(argv: list[str] | None) -> tuple[FinetuneConfig, bool]:
    """``(config, resume)`` from command-line arguments."""
    given: dict[str, Any] = vars(build_parser().parse_args(argv))
    resume = given.pop("resume", False)
    if resume:  # the saved config, with only what was given here changed
        return resume_config(given.pop("out_dir", FinetuneConfig.out_dir), given), True
    return FinetuneConfig.from_dict(given), False


def main(argv: list[str] | None = None) -> int:
    from .finetune import Finetuner

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        config, resume = parse_config(argv)
    except (ValueError, TypeError, OSError) as err:  # flags, saved config of a resumed run
        return fail(PROG, err, status=2)
    try:
        trainer = Finetuner(config, resume=resume)
    except (ValueError, TypeError) as err:  # model, data, adapter, run directory, checkpoint
        return fail(PROG, err)
    except (OSError, RuntimeError) as err:
        return fail(PROG, io_error(err, config.out_dir))
    if trainer.is_main:
        print(f"{config.mode}: training {trainer.trainable:,} of {trainer.total:,} parameters "
              f"({100 * trainer.trainable / trainer.total:.3g}%)")
    try:
        summary = trainer.run()
    except FloatingPointError as err:
        return fail(PROG, err)
    except (OSError, RuntimeError) as err:
        return fail(PROG, io_error(err, config.out_dir))
    if trainer.is_main:
        report(config, summary)
    return 0


def report(config: FinetuneConfig, summary: dict[str, Any]) -> None:
    out = config.out_dir
    if summary["interrupted"]:
        print(f"\nStopped at step {summary['step']}; checkpoint and adapter of this step "
              f"written ({out}). Continue with:\n  mlx-localnorm finetune --out-dir {out} "
              "--resume")
        return
    val, start = summary["val_loss"], summary["start_val_loss"]
    fused = Path(out).with_name(Path(out).name + "-fused")
    print(f"\nDone: step {summary['step']}, train loss {summary['loss']:.3f}"
          + (f", validation loss {val:.3f}" if val is not None else "")
          + (f" ({start:.3f} before training)" if start is not None else ""))
    print(f"Adapter: {out}/adapter_config.json, {out}/adapters.safetensors; metrics: "
          f"{out}/metrics.jsonl, plot: {out}/loss.png")
    print(f"Generate with mlx-lm:\n  mlx_lm.generate --model {config.model} --adapter-path "
          f"{out} --trust-remote-code --prompt \"...\"\nFuse it:\n  mlx-localnorm fuse "
          f"--model {config.model} --adapter-path {out} --out {fused}")
