"""``mlx-localnorm fuse``: bake an adapter into its model and save a model mlx-lm loads.

LoRA/DoRA layers become the Linear layers they equal (mlx-lm's ``fuse``: ``W + s B^T A^T``,
DoRA's magnitude applied); a ``norms`` or ``full`` adapter already replaced the weights when
loaded. The result has the adapter model's logits (LoRA/DoRA up to float rounding).
Errors end the command with one line on stderr: exit 2 for the command line, 1 for a model
or adapter that cannot be read or does not fit, or a file that cannot be written.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .._argparse import OneLineParser
from .adapters import fuse_adapters, load_adapter
from ..models.save import MODEL_FILE
from .model_dir import load_model_dir, save_model_dir

PROG = "mlx-localnorm fuse"


def fuse(model_dir: str | Path, adapter_path: str | Path, out: str | Path,
         dequantize: bool = False, trust_remote_code: bool = False) -> Path:
    """Load ``model_dir`` with the adapter in ``adapter_path``, fuse it, save it to ``out``.

    ``dequantize``: save a quantized base model in full precision.
    """
    from mlx_lm.utils import dequantize_model

    model, tokenizer, config = load_model_dir(model_dir, trust_remote_code)
    load_adapter(model, adapter_path)
    fuse_adapters(model, dequantize=dequantize)
    if dequantize:
        model = dequantize_model(model)
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    return save_model_dir(model, tokenizer, config, model_dir, out)


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog=PROG, description="Fuse a fine-tuning adapter (lora, dora, "
                           "norms, full) into its model and save a model mlx-lm loads.")
    parser.add_argument("--model", required=True, help="the base model directory")
    parser.add_argument("--adapter-path", required=True,
                        help="the adapter directory (adapter_config.json, adapters.safetensors)")
    parser.add_argument("--out", required=True, help="where to write the fused model")
    parser.add_argument("--dequantize", action="store_true",
                        help="save a quantized base model in full precision")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="let mlx-lm run a model file that the model directory names "
                        "(not needed for models this package saved)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = fuse(args.model, args.adapter_path, args.out, args.dequantize,
                   args.trust_remote_code)
    except (ValueError, TypeError, OSError) as err:
        print(f"{PROG}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    print(f"Fused model: {out}\nGenerate with mlx-lm:\n  mlx_lm.generate --model {out}"
          + (" --trust-remote-code" if (Path(out) / MODEL_FILE).exists() else "")
          + ' --prompt "..."')
    return 0
