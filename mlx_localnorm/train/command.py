"""``mlx-localnorm pretrain``: every ``PretrainConfig`` field is a flag (``--field-name``).

A user error ends the command with one line on stderr, no traceback: exit status 2 for an
invalid command line or config (found before any work), 1 for a corpus, run directory or
checkpoint that does not fit, or a file that cannot be read or written (a full disk). Other
exceptions are bugs and keep their traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from typing import TYPE_CHECKING, Any

from .._argparse import OneLineParser
from .checkpoint import list_checkpoints
from .config import PretrainConfig, field_type

if TYPE_CHECKING:
    from .pretrain import Pretrainer

PROG = "mlx-localnorm pretrain"
_SCALARS = {"int": int, "float": float, "str": str}
# MLX reports a failed file write (e.g. a full disk) as a RuntimeError with these prefixes.
_MLX_WRITE_ERRORS = ("[write]", "[save")


def flag_type(annotation: str):
    """An argparse ``type`` for a field annotation such as ``int``, ``float | None`` or ``dict``."""
    base, optional = field_type(annotation)

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


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog=prog, description="Pre-train a LocalNorm language model. Precedence: defaults < "
        "--config file < flags.", argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", help="JSON or YAML file of config fields")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out-dir from its newest checkpoint")
    add_config_flags(parser, PretrainConfig)
    return parser


def add_config_flags(parser: argparse.ArgumentParser, config_cls: type,
                     aliases: dict[str, list[str]] | None = None,
                     skip: tuple[str, ...] = ()) -> None:
    """One ``--field-name`` flag per field of the dataclass ``config_cls`` (plus its
    ``aliases``, e.g. ``{"out_dir": ["--out"]}``; ``skip``: fields the caller adds itself),
    with its help and default; bool fields (also ``bool | None``) get ``--flag/--no-flag``."""
    for f in dataclasses.fields(config_cls):
        if f.name in skip:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flags = ["--" + f.name.replace("_", "-"), *(aliases or {}).get(f.name, [])]
        help_text = f"{f.metadata['help']} (default: {default!r})"
        if field_type(f.type)[0] == "bool":
            parser.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction,
                                help=help_text)
        else:
            parser.add_argument(*flags, dest=f.name, type=flag_type(f.type), help=help_text,
                                metavar=f.name.upper())


def parse_config(argv: list[str] | None, defaults: dict[str, Any] | None = None,
                 prog: str = PROG) -> tuple[PretrainConfig, bool]:
    """``(config, resume)`` from command-line arguments over ``defaults``."""
    from .pretrain import resume_config

    args = vars(build_parser(prog).parse_args(argv))
    resume = args.pop("resume", False)
    config_file = args.pop("config", None)
    given = PretrainConfig.read(config_file) if config_file else {}
    given.update(args)
    defaults = defaults or {}
    if resume:  # the saved config, with only what was given here changed
        out_dir = given.pop("out_dir", defaults.get("out_dir", PretrainConfig.out_dir))
        return resume_config(out_dir, given), True
    return PretrainConfig.from_dict({**defaults, **given}, where=config_file), False


def run(trainer: Pretrainer) -> int:
    """Train, then print a sample and how to use the model with mlx-lm."""
    config = trainer.config
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


def main(argv: list[str] | None = None, defaults: dict[str, Any] | None = None,
         prog: str = PROG, continue_saved: bool = False) -> int:
    """Run the command; ``continue_saved``: resume a run already in ``out_dir`` (the demo)."""
    from .pretrain import Pretrainer

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        config, resume = parse_config(argv, defaults, prog)
        if continue_saved and not resume and list_checkpoints(config.out_dir):
            print(f"{config.out_dir} holds an earlier run: continuing it (delete "
                  f"{config.out_dir} to start over)")
            config, resume = parse_config([*argv, "--resume"], defaults, prog)
    except (ValueError, TypeError, OSError) as err:  # flags, config file, run to resume
        return fail(prog, err, status=2)
    try:
        trainer = Pretrainer(config, resume=resume)
    except (ValueError, TypeError) as err:  # corpus, run directory or checkpoint
        return fail(prog, err)
    except (OSError, RuntimeError) as err:
        return fail(prog, io_error(err, config.out_dir))
    try:
        return run(trainer)
    except FloatingPointError as err:  # a diverged loss; the message says what to change
        return fail(prog, err)
    except (OSError, RuntimeError) as err:
        return fail(prog, io_error(err, config.out_dir))


def io_error(err: OSError | RuntimeError, out_dir: str) -> str:
    """A failed read or write in one line, naming the run directory if the error names no
    file; any other RuntimeError is a bug and is raised again."""
    if isinstance(err, RuntimeError):
        if not str(err).startswith(_MLX_WRITE_ERRORS):
            raise err
        return f"writing into {out_dir} failed: {err} (is the disk full?)"
    if err.errno is None or err.filename:  # our own message, or the OS's with its path
        return str(err)
    return f"writing into {out_dir} failed: {err.strerror}"


def fail(prog: str, error: BaseException | str, status: int = 1) -> int:
    print(f"{prog}: error: {' '.join(str(error).split())}", file=sys.stderr)
    return status
