"""``mlx-localnorm export-hf``: a LocalNorm model or run directory -> a Hugging Face checkpoint.

Exit status: 2 for invalid flags, 1 for a model transformers has no architecture for (the
message says why), a directory that is not a LocalNorm model, or an output that cannot be
written; nothing is left half-written.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

from .._argparse import OneLineParser
from .export import export_hf

PROG = "mlx-localnorm export-hf"


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog=PROG, description="Write a LocalNorm model (a converted model, "
                           "or a pre-training run directory) as a Hugging Face checkpoint "
                           "directory, when transformers has its architecture (RMSNorm or "
                           "LayerNorm, Pre-LN).")
    parser.add_argument("model", metavar="RUN_OR_MODEL_DIR",
                        help="a directory saved by save_model, convert or pretrain")
    parser.add_argument("--out", required=True, metavar="DIR", help="the directory to write")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    return parser


def load_localnorm(path: str | Path):
    """``(model, tokenizer)`` of a LocalNorm model directory, through mlx-lm's loader."""
    from mlx_lm import load

    config = Path(path) / "config.json"
    if not config.is_file():
        raise ValueError(f"RUN_OR_MODEL_DIR {str(path)!r} has no config.json; expected a "
                         "directory written by save_model, convert or pretrain")
    model_type = json.loads(config.read_text()).get("model_type")
    if model_type != "localnorm":
        raise ValueError(f"RUN_OR_MODEL_DIR: {str(config)!r} must have model_type "
                         f"'localnorm', got {model_type!r}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load(str(path), trust_remote_code=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        model, tokenizer = load_localnorm(args.model)
        export_hf(model, tokenizer, args.out, overwrite=args.overwrite)
    except (ValueError, TypeError, OSError) as err:
        print(f"{PROG}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    model_type = json.loads((Path(args.out) / "config.json").read_text())["model_type"]
    print(f"Wrote {args.out} (Hugging Face model_type {model_type!r}); read it with "
          "transformers' AutoModelForCausalLM.from_pretrained or mlx-localnorm convert")
    return 0
