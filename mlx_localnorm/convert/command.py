"""``mlx-localnorm convert``: a Hugging Face checkpoint directory -> a LocalNorm model directory.

Exit status: 2 for invalid flags, 1 for a source that does not convert or an output that
cannot be written. Nothing is written until the model is converted, and ``save_model``
writes beside ``--out`` and renames, so a failure leaves no partial output directory.
"""

from __future__ import annotations

import sys

from .._argparse import OneLineParser
from ..models import save_model
from ..norms import NORMS
from .hf import DTYPES, from_hf
from .swap import SWAP_PLACEMENTS

PROG = "mlx-localnorm convert"
# mlx-lm's affine quantization: the bit widths and group sizes mx.quantize takes.
BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog=PROG, description="Convert a local Hugging Face checkpoint "
                           "(llama, mistral, qwen2, qwen3, gemma, gpt2) to a LocalNorm model "
                           "that mlx_lm.load(path, trust_remote_code=True) reads.")
    parser.add_argument("--hf-path", required=True, metavar="DIR",
                        help="config.json, *.safetensors and tokenizer files")
    parser.add_argument("--out", required=True, metavar="DIR", help="the model directory to write")
    parser.add_argument("--norm", choices=sorted(NORMS), help="swap every norm (default: keep)")
    parser.add_argument("--placement", choices=SWAP_PLACEMENTS,
                        help="change the placement (default: keep Pre-LN)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32",
                        help="weight dtype (default: float32)")
    parser.add_argument("--quantize", type=int, choices=BITS, metavar="BITS",
                        help=f"quantize the linear layers and embeddings to BITS in {BITS}")
    parser.add_argument("--group-size", type=int, choices=GROUP_SIZES, default=64,
                        help="quantization group size (default: 64)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out even if it holds files save_model did not write")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        model, tokenizer = from_hf(args.hf_path, args.norm, args.placement, args.dtype)
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
