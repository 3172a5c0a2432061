"""``mlx-localnorm grpo``: every ``GRPOConfig`` field is a flag (``--field-name``).

A user error ends the command with one line on stderr, no traceback: exit status 2 for an
invalid command line (flags, G < 2, a reward spec that cannot be imported), found before any
work; 1 for an input that does not fit (a malformed prompts file, a model directory mlx-lm
cannot read, a reward that raises or returns a non-number) or a file that cannot be read or
written. Other exceptions are bugs and keep their traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._argparse import OneLineParser
from ..train.command import add_config_flags, fail, io_error
from ..train.loop import saved_config
from .config import RESUMABLE_CHANGES, GRPOConfig
from .rewards import RewardError

if TYPE_CHECKING:
    from .trainer import GRPOTrainer

PROG = "mlx-localnorm grpo"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog=prog, description="Train a policy (any model mlx_lm.load reads) with a "
        "GRPO-family algorithm on a shipped task or your prompts and reward function.",
        argument_default=argparse.SUPPRESS)
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out-dir from its newest checkpoint")
    add_config_flags(parser, GRPOConfig)
    return parser


def resume_config(out_dir: str | Path, overrides: dict[str, Any]) -> GRPOConfig:
    """The saved config of the run in ``out_dir`` with the allowed ``overrides``."""
    return saved_config(GRPOConfig, out_dir, overrides, RESUMABLE_CHANGES)


def parse_config(argv: list[str] | None) -> tuple[GRPOConfig, bool]:
    """``(config, resume)`` from command-line arguments."""
    args = vars(build_parser().parse_args(argv))
    resume = args.pop("resume", False)
    if resume:
        return resume_config(args.pop("out_dir", GRPOConfig.out_dir), args), True
    return GRPOConfig.from_dict(args, where="grpo"), False


def run(trainer: GRPOTrainer) -> int:
    """Train, then say where the results are and how mlx-lm loads them."""
    config, out = trainer.config, trainer.config.out_dir
    summary = trainer.run()
    if summary["interrupted"]:
        print(f"\nStopped at step {summary['step']}; checkpoint written. Continue with:\n"
              f"  {PROG} --out-dir {out} --resume")
        return 0
    held_out = [r["eval_reward"] for r in trainer.metrics.records if "eval_reward" in r]
    print(f"\nDone: step {summary['step']}"
          + (f", held-out reward {held_out[0]:.3f} -> {held_out[-1]:.3f}" if held_out else ""))
    print(f"Metrics: {out}/metrics.jsonl, plot: {out}/reward.png, checkpoints: "
          f"{out}/checkpoints/")
    model = trainer.output_path if config.mode == "full" else config.policy_dir
    adapter = "" if config.mode == "full" else f" --adapter-path {trainer.output_path}"
    print(f"Generate with mlx-lm:\n  mlx_lm.generate --model {model}{adapter} "
          f"--trust-remote-code --prompt {json.dumps(_example_prompt(trainer))}")
    return 0


def _example_prompt(trainer: GRPOTrainer) -> str:
    records = trainer.eval_records or trainer.batch(0)
    return records[0]["prompt"]


def main(argv: list[str] | None = None) -> int:
    from .trainer import GRPOTrainer, make_reward

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        config, resume = parse_config(argv)
        reward = make_reward(config)
    except (ValueError, TypeError, OSError) as err:  # flags, saved config, reward spec
        return fail(PROG, err, status=2)
    try:
        trainer = GRPOTrainer(config, resume=resume, reward=reward)
    except KeyboardInterrupt as stop:  # during the warm-up, which says how to go on
        print(f"{PROG}: {stop}", file=sys.stderr)
        return 130
    except (ValueError, TypeError) as err:  # prompts, model, run directory, checkpoint
        return fail(PROG, err)
    except (OSError, RuntimeError) as err:
        return fail(PROG, io_error(err, config.out_dir))
    try:
        return run(trainer)
    except (RewardError, FloatingPointError) as err:
        return fail(PROG, err)
    except (OSError, RuntimeError) as err:
        return fail(PROG, io_error(err, config.out_dir))
