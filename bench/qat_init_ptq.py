"""Post-training quantization of the demo model from the two starting grids of learned
scales, with no training: ``mx.quantize``'s min-max grid (what ``mlx_lm.convert -q``
writes) and each group's least-squared-error range (``qat --scale-init mse``,
``ln.quant.mse_scales_biases``), at 2, 3 and 4 bits.

    python bench/qat_init_ptq.py --model runs/demo --csv bench/results/qat_init_ptq.csv

Held-out: every 64-token sequence of the Shakespeare validation works, as
``bench/qat_rescore.py`` scores QAT runs. About 8 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import mlx_localnorm  # noqa: F401  (before mlx.core: it picks the fast BLAS)

from mlx_localnorm.quant import prepare_qat
from mlx_localnorm.quant.compare import write_csv
from mlx_localnorm.quant.train import QATData, load_float_model
from qat_rescore import SEQ_LEN, sequence_losses


def perplexity(nll) -> float:
    return math.exp(nll.sum() / (SEQ_LEN * len(nll)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a float model directory")
    parser.add_argument("--csv", required=True, type=Path)
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    args = parser.parse_args()

    model, tokenizer, _ = load_float_model(args.model)
    batches = list(QATData(None, tokenizer, 4, SEQ_LEN, 0).held_out(0))
    float_ppl = perplexity(sequence_losses(model, batches))
    rows = [{"bits": "", "start": "float", "ppl": f"{float_ppl:.2f}",
             "gap_recovered_pct": ""}]
    for bits in args.bits:
        ppl = {}
        for start in ("minmax", "mse"):
            quantized = prepare_qat(load_float_model(args.model)[0], bits, 64,
                                    embeddings=True, learn_scales=True, scale_init=start)
            ppl[start] = perplexity(sequence_losses(quantized, batches))
            recovered = 100 * (ppl["minmax"] - ppl[start]) / (ppl["minmax"] - float_ppl)
            rows.append({"bits": bits, "start": start, "ppl": f"{ppl[start]:.2f}",
                         "gap_recovered_pct": f"{recovered:.1f}"})
            print(rows[-1], flush=True)
    write_csv(rows, args.csv, list(rows[0]))
    print(f"float {float_ppl:.2f} on {len(batches)} batches; wrote {args.csv}")


if __name__ == "__main__":
    main()
