"""``mlx-localnorm pretrain``: every ``PretrainConfig`` field is a flag (``--field-name``)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from typing import Any

from .config import PretrainConfig

_SCALARS = {"int": int, "float": float, "str": str}


def _parser_for(annotation: str):
    """An argparse ``type`` for a field annotation such as ``int``, ``float | None`` or ``dict``."""
    parts = [p.strip() for p in annotation.split("|")]
    optional = "None" in parts
    base = next(p for p in parts if p != "None")

    def parse(text: str):
        if optional and text.lower() == "none":
            return None
        if base == "dict":
            try:
                value = json.loads(text)
            except json.JSONDecodeError as err:
                raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}") from err
            if not isinstance(value, dict):
                raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
            return value
        return _SCALARS[base](text)

    parse.__name__ = base  # argparse names the type in its error messages
    return parse


def build_parser(prog: str = "mlx-localnorm pretrain") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Pre-train a LocalNorm language model. Precedence: defaults < "
        "--config file < flags.", argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", help="JSON or YAML file of config fields")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out-dir from its newest checkpoint")
    for f in dataclasses.fields(PretrainConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata['help']} (default: {default!r})"
        if f.type == "bool":
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, type=_parser_for(f.type), help=help_text,
                                metavar=f.name.upper())
    return parser


def parse_config(argv: list[str] | None, defaults: dict[str, Any] | None = None,
                 prog: str = "mlx-localnorm pretrain") -> tuple[PretrainConfig, bool]:
    """``(config, resume)`` from command-line arguments over ``defaults``."""
    from .pretrain import resume_config

    args = vars(build_parser(prog).parse_args(argv))
    resume = args.pop("resume", False)
    given = PretrainConfig.read(args.pop("config")) if "config" in args else {}
    given.update(args)
    defaults = defaults or {}
    if resume:  # the saved config, with only what was given here changed
        out_dir = given.pop("out_dir", defaults.get("out_dir", PretrainConfig.out_dir))
        return resume_config(out_dir, given), True
    return PretrainConfig.from_dict({**defaults, **given}), False


def run(config: PretrainConfig, resume: bool) -> int:
    """Train, then print a sample and how to use the model with mlx-lm."""
    from .pretrain import Pretrainer

    trainer = Pretrainer(config, resume=resume)
    summary = trainer.run()
    if not trainer.is_main:
        return 0
    out = config.out_dir
    if summary["interrupted"]:
        print(f"\nStopped at step {summary['step']}; checkpoint written. Continue with:\n"
              f"  mlx-localnorm pretrain --out-dir {out} --resume")
        return 0
    val = summary["val_loss"]
    print(f"\nDone: step {summary['step']}, train loss {summary['loss']:.3f}"
          + (f", validation loss {val:.3f} (perplexity {math.exp(val):.1f})"
             if val is not None else ""))
    print(f"Metrics: {out}/metrics.jsonl, plot: {out}/loss.png, checkpoints: "
          f"{out}/checkpoints/")
    if config.sample_tokens:
        print(f"\nSample ({config.sample_prompt!r}, {config.sample_tokens} tokens):\n"
              f"{config.sample_prompt}{trainer.sample()}\n")
    print("Generate with mlx-lm:\n"
          f"  mlx_lm.generate --model {out} --trust-remote-code --prompt "
          f"{json.dumps(config.sample_prompt)} --max-tokens 100")
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        config, resume = parse_config(argv)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"mlx-localnorm pretrain: error: {err}", file=sys.stderr)
        return 2
    return run(config, resume)
