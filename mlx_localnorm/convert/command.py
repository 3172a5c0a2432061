"""``mlx-localnorm convert``: a Hugging Face checkpoint directory -> a LocalNorm model directory.

A LocalNorm model directory (``save_model``'s, a pretraining run's) is read as it is, so
``--norm`` swaps the norms of a model this package trained (its placement kept, or changed
from Pre-LN).

With ``--norm``/``--placement`` the swapped model is calibrated on sample text, optionally
healed (``--heal-steps``: a short fine-tune of its norms), and the command prints held-out
perplexities: the source, the swap before and after calibration, after healing.
Exit status: 2 for invalid flags, 1 for a source that does not convert or an output that
cannot be written. Nothing is written until the model is converted, and ``save_model``
writes beside ``--out`` and renames, so a failure leaves no partial output directory.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .._argparse import OneLineParser
from ..models import save_model
from ..norms import NORMS
from ..train.adapters import NORM_PARAMS
from .calibrate import calibrate
from .evaluate import perplexity, sample_text
from .export_command import load_localnorm
from .heal import HEAL_MODES, heal
from .hf import DTYPES, from_hf
from .swap import SWAP_PLACEMENTS, check_swap, swap_model_norms

PROG = "mlx-localnorm convert"
# mlx-lm's affine quantization: the bit widths and group sizes mx.quantize takes.
BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog=PROG, description="Convert a local Hugging Face checkpoint "
                           "(llama, mistral, qwen2, qwen3, gemma, gpt2) or an mlx-lm model "
                           "directory to a LocalNorm model that mlx_lm.load(path, "
                           "trust_remote_code=True) reads; or swap the norms of a LocalNorm "
                           "model.")
    parser.add_argument("--hf-path", required=True, metavar="DIR",
                        help="config.json, *.safetensors and tokenizer files (or a LocalNorm "
                             "model directory)")
    parser.add_argument("--out", required=True, metavar="DIR", help="the model directory to write")
    parser.add_argument("--norm", choices=sorted(NORMS), help="swap every norm (default: keep)")
    parser.add_argument("--placement", choices=SWAP_PLACEMENTS,
                        help="change the placement (default: keep the source's; "
                             "converted checkpoints are Pre-LN)")
    parser.add_argument("--calibrate", action=argparse.BooleanOptionalAction, default=True,
                        help="fit the swapped norms to the source's on sample text (default)")
    parser.add_argument("--calib-data", metavar="FILE",
                        help="sample text: a .txt/.jsonl file or folder (default: the embedded "
                             "Shakespeare; held-out text from its validation works)")
    parser.add_argument("--calib-batches", type=int, default=4, metavar="N",
                        help="batches for calibration, and as many held out (default: 4)")
    parser.add_argument("--calib-batch-size", type=int, default=4, metavar="B",
                        help="sequences per batch (default: 4)")
    parser.add_argument("--calib-seq-len", type=int, default=128, metavar="L",
                        help="tokens per sequence (default: 128; at most the model's learned "
                             "positions)")
    parser.add_argument("--heal-steps", type=int, default=0, metavar="N",
                        help="after calibration, fine-tune for N steps (default: 0, none)")
    parser.add_argument("--heal", choices=HEAL_MODES, default="norms",
                        help="what healing trains: the norm parameters (default), LoRA "
                             "adapters (fused after) or everything")
    parser.add_argument("--heal-norm-params", choices=NORM_PARAMS, default="all",
                        help="--heal norms: all norm parameters (default), their gains "
                             "(weight and bias) or their weight only")
    parser.add_argument("--heal-data", metavar="PATH",
                        help="mlx-lm JSONL (file, or directory with train.jsonl/valid.jsonl); "
                             "default: the embedded Shakespeare")
    parser.add_argument("--heal-dir", metavar="DIR",
                        help="keep the healing run (metrics.jsonl, loss plot) here")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32",
                        help="weight dtype (default: float32)")
    parser.add_argument("--quantize", type=int, choices=BITS, metavar="BITS",
                        help=f"quantize the linear layers and embeddings to BITS in {BITS}")
    parser.add_argument("--group-size", type=int, choices=GROUP_SIZES, default=64,
                        help="quantization group size (default: 64)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out even if it holds files save_model did not write")
    return parser


def read_source(path: str, dtype: str, norm: str | None, placement: str | None) -> tuple:
    """``(model, tokenizer)``: a LocalNorm model directory through mlx-lm's loader, anything
    else through ``from_hf``; the swap checked against the source's placement."""
    if not _is_localnorm(path):
        return from_hf(path, dtype=dtype)
    model, tokenizer = load_localnorm(path)
    model.set_dtype(DTYPES[dtype])
    check_swap(norm, placement, model.args.placement)
    return model, tokenizer


def _is_localnorm(path: str) -> bool:
    """Whether ``path``'s config.json names model_type 'localnorm' (save_model's)."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return False  # from_hf says what is wrong with the directory
    return isinstance(config, dict) and config.get("model_type") == "localnorm"


def swap_and_calibrate(source, tokenizer, args) -> tuple:
    """The swapped model, calibrated unless ``--no-calibrate``, and the perplexity rows."""
    target = swap_model_norms(source, args.norm, args.placement)
    target.set_dtype(DTYPES[args.dtype])  # the new norms' fresh parameters
    seq_len = args.calib_seq_len
    if source.args.position_embedding == "learned":
        seq_len = min(seq_len, source.args.max_position_embeddings - 1)
    text = sample_text(tokenizer, args.calib_data, args.calib_batches, args.calib_batch_size,
                       seq_len)
    norm, placement = target.args.norm_type, target.args.placement
    rows = [(f"source ({source.args.norm_type}, {source.args.placement})",
             perplexity(source, text.held_out)),
            (f"swapped to {norm}, {placement}, not calibrated",
             perplexity(target, text.held_out))]
    if args.calibrate:
        calibrate(source, target, text.calibration)
        rows.append(("swapped, calibrated", perplexity(target, text.held_out)))
    if args.heal_steps:
        target = heal(target, tokenizer, args.heal_steps, args.heal_data, mode=args.heal,
                      norm_params=args.heal_norm_params, run_dir=args.heal_dir)
        what = args.heal + ("" if args.heal_norm_params == "all" else f" {args.heal_norm_params}")
        rows.append((f"healed ({args.heal_steps} steps, {what})",
                     perplexity(target, text.held_out)))
    return target, rows, text


def print_table(rows: list[tuple], text) -> None:
    tokens = sum(batch[:, 1:].size for batch in text.held_out)
    print(f"Held-out perplexity ({tokens} tokens of {text.source}):")
    for name, value in rows:
        print(f"  {name:<44}{value:10.3f}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.heal_steps < 0 or (args.heal_steps and args.norm is None
                               and args.placement is None):
        parser.error(f"--heal-steps must be >= 0 and needs --norm or --placement, got "
                     f"{args.heal_steps}")
    if args.heal_norm_params != "all" and args.heal != "norms":
        parser.error(f"--heal-norm-params applies to --heal norms only, got --heal {args.heal}")
    try:
        check_swap(args.norm, args.placement)
        model, tokenizer = read_source(args.hf_path, args.dtype, args.norm, args.placement)
        if args.norm is not None or args.placement is not None:
            model, rows, text = swap_and_calibrate(model, tokenizer, args)
            print_table(rows, text)
        if args.quantize:
            from mlx_lm.utils import quantize_model

            quantize_model(model, {}, args.group_size, args.quantize)
        save_model(model, tokenizer, args.out, overwrite=args.overwrite)
    except (ValueError, TypeError, OSError) as err:
        print(f"{PROG}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    print(f"Wrote {args.out}; generate with mlx-lm:\n"
          f"  mlx_lm.generate --model {args.out} --trust-remote-code --prompt \"Hello\"")
    return 0
