"""``mlx-localnorm qat``: quantization-aware fine-tuning of a float model into a real mlx-lm
quantized model, then a table of held-out perplexity (float, mlx-lm PTQ, mlx-lm DWQ, QAT).

``--bits 2 3 4`` runs one QAT per width into ``OUT/2bit``, ``OUT/3bit``, ``OUT/4bit``.
A user error ends the command with one line on stderr: exit 2 for the command line or
settings, 1 for a model directory, corpus or run directory that does not fit, or a file
that cannot be read or written. Ctrl-C checkpoints; ``--resume`` continues.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .._argparse import OneLineParser

PROG = "mlx-localnorm qat"
# --quick: a small setting that checks the whole pipeline in a few minutes on a CPU.
QUICK = {"total_steps": 12, "batch_size": 4, "seq_len": 64, "eval_batches": 2,
         "eval_every": 0, "save_every": 0, "warmup_steps": 2, "log_every": 2}


def build_parser() -> argparse.ArgumentParser:
    from ..train.command import add_config_flags
    from .train import QATConfig

    parser = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0],
                           argument_default=argparse.SUPPRESS)
    parser.add_argument("--bits", type=int, nargs="+", metavar="BITS",
                        help="bits per weight; several: one run each (default: 4)")
    add_config_flags(parser, QATConfig, aliases={"out_dir": ["--out"]}, skip=("bits",))
    parser.add_argument("--resume", action="store_true", help="continue the run(s) in --out "
                        "from the newest checkpoint (with their saved settings)")
    parser.add_argument("--quick", action="store_true", help="a small setting to check the "
                        f"pipeline: {', '.join(f'{k}={v}' for k, v in QUICK.items())}")
    parser.add_argument("--compare", action=argparse.BooleanOptionalAction, default=True,
                        help="print the table: float, mlx-lm PTQ, mlx-lm DWQ, QAT "
                        "(default: on)")
    parser.add_argument("--dwq", action=argparse.BooleanOptionalAction, default=True,
                        help="include mlx-lm's DWQ in the table (default: on)")
    parser.add_argument("--dwq-bits", type=int, nargs="+", metavar="BITS",
                        help="run DWQ at these of --bits only (it is slow on a CPU; default: "
                        "all)")
    parser.add_argument("--dwq-learning-rate", type=float, default=1e-5,
                        help="DWQ's Adam learning rate (mlx-lm's default, 1e-6, is for "
                        "billion-parameter models; default: 1e-5)")
    parser.add_argument("--csv", help="also write the table to this CSV file")
    return parser


def configs_from(args: dict) -> tuple[list, bool]:
    """One ``QATConfig`` per bit width, and whether to resume."""
    from .train import QATConfig

    resume, quick = args.pop("resume", False), args.pop("quick", False)
    bits = args.pop("bits", [4])
    out = Path(args.pop("out_dir", QATConfig.out_dir))
    configs = []
    for b in bits:
        out_dir = out if len(bits) == 1 else out / f"{b}bit"
        if resume:
            saved = out_dir / "train_config.json"
            if not saved.is_file():
                raise ValueError(f"--resume: {saved} does not exist; start the run without "
                                 "--resume first")
            configs.append(QATConfig(**{**json.loads(saved.read_text()),
                                        "out_dir": str(out_dir)}))
        else:
            configs.append(QATConfig(**{**(QUICK if quick else {}), **args, "bits": b,
                                        "out_dir": str(out_dir)}))
    return configs, resume


def table(trainers: list, dwq: bool, dwq_lr: float, dwq_bits: list[int] | None = None
          ) -> list[dict]:
    """Rows of the results table for the finished runs (the float row first); DWQ rows
    for the widths in ``dwq_bits`` (None: all)."""
    from .compare import evaluate, ptq_model, row
    from .train import load_float_model

    first = trainers[0]
    float_loss = evaluate(load_float_model(first.config.model)[0], first.config, first.data)
    rows = [row(first.config, "float", float_loss, None, None,
                eval_tokens=first.data.held_out_tokens(first.config.eval_batches))]
    for trainer in trainers:
        config, data = trainer.config, trainer.data
        tokens = data.held_out_tokens(config.eval_batches)
        ptq_loss = evaluate(ptq_model(config), config, data)
        rows.append(row(config, "ptq", ptq_loss, float_loss, None, "mlx_lm quantize_model",
                        tokens))
        if dwq and (dwq_bits is None or config.bits in dwq_bits):
            rows.append(_dwq_row(trainer, dwq_lr, float_loss, ptq_loss, tokens))
        rows.append(row(config, "qat", evaluate(trainer.model, config, data), float_loss,
                        ptq_loss, _qat_note(config), tokens))
    return rows


def _qat_note(config) -> str:
    note = f"lr {config.learning_rate:g}, {'KL to float' if config.distill else 'CE'}"
    if config.learn_scales:
        ratio = config.scale_lr_ratio
        note += ", learned scales" + (f" at {ratio:g}x lr" if ratio != 1 else "")
        if config.scale_init == "mse":
            note += " (MSE ranges)"
    if config.embedding_lr_ratio != 1:
        note += f", embedding at {config.embedding_lr_ratio:g}x lr"
    if config.average_last:
        note += f", mean of the last {config.average_last} steps"
    return note


def _dwq_row(trainer, learning_rate: float, float_loss: float, ptq_loss: float,
             tokens: int) -> dict:
    from .compare import dwq_model, evaluate, row

    config = trainer.config
    if config.mode != "affine":
        return row(config, "dwq", None, None, None, "not run: DWQ learns affine scales only")
    if trainer.data.fine_tuning:
        return row(config, "dwq", None, None, None, "not run here on fine-tuning JSONL")
    try:
        model = dwq_model(config, trainer.data, learning_rate, trainer.out_dir / "dwq.log")
    except Exception as err:  # a third-party trainer: say why in the table, keep the rest
        return row(config, "dwq", None, None, None,
                   f"failed here: {' '.join(str(err).split())[:80]}")
    return row(config, "dwq", evaluate(model, config, trainer.data), float_loss, ptq_loss,
               f"mlx_lm.quant.dwq, lr {learning_rate:g}, same sequences", tokens)


def main(argv: list[str] | None = None) -> int:
    from ..train.checkpoint import CheckpointError
    from .compare import format_table, write_csv
    from .train import QATTrainer

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = vars(build_parser().parse_args(argv))
        compare, dwq = args.pop("compare"), args.pop("dwq")
        dwq_lr, csv_path = args.pop("dwq_learning_rate"), args.pop("csv", None)
        dwq_bits = args.pop("dwq_bits", None)
        configs, resume = configs_from(args)
        if dwq_bits is not None and not (dwq and set(dwq_bits) <= {c.bits for c in configs}):
            raise ValueError(f"--dwq-bits must be among --bits {[c.bits for c in configs]} "
                             f"and needs --dwq, got {dwq_bits}")
    except (ValueError, TypeError) as err:
        return _fail(err, status=2)
    trainers = []
    try:
        for config in configs:
            trainer = QATTrainer(config, resume=resume)
            summary = trainer.run()
            if summary["interrupted"]:
                out = Path(config.out_dir).parent if len(configs) > 1 else config.out_dir
                print(f"\nStopped at step {summary['step']}; checkpoint written. Continue "
                      f"with:\n  {PROG} --out {out} --resume")
                return 0
            trainers.append(trainer)
        if compare:
            rows = table(trainers, dwq, dwq_lr, dwq_bits)
            print(f"\nHeld-out perplexity ({rows[0]['eval_tokens']:,} tokens):")
            print(format_table(rows))
            if csv_path:
                print(f"Table: {write_csv(rows, csv_path)}")
    except (ValueError, TypeError, CheckpointError, FloatingPointError, OSError) as err:
        return _fail(err)
    for config in configs:
        print(f"Quantized model: {config.out_dir}  (mlx_lm.generate --model {config.out_dir} "
              "--trust-remote-code --prompt ...)")
    return 0


def _fail(error: BaseException, status: int = 1) -> int:
    print(f"{PROG}: error: {' '.join(str(error).split())}", file=sys.stderr)
    return status
