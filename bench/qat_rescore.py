"""Score saved QAT runs of one float model on the whole held-out set, with the spread that
held-out sampling alone gives.

    python bench/qat_rescore.py --model runs/demo --csv OUT.csv RUN_DIR [RUN_DIR ...]

Each run directory is a finished ``mlx-localnorm qat`` output (its quantized model and
train_config.json). Held-out: the Shakespeare validation works cut into 64-token sequences,
all of them, as ``qat --seq-len 64 --eval-batches 0`` scores them. For each
run the PTQ gap recovered, ``(ppl_ptq - ppl) / (ppl_ptq - ppl_float)``, is given on the
first 128 sequences (the 16 x 8 x 64 tokens of the earlier tables), on all of them, and as
the standard deviation of the latter over 1,000 bootstrap resamples of the sequences (the
same resample for float, PTQ and the run); ``kl_to_float`` is the mean over all held-out
tokens of ``KL(p_float || p_run)``, what QAT's distillation loss minimizes on its training
tokens.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import mlx_localnorm  # noqa: F401  (before mlx.core: it picks the fast BLAS)
import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_localnorm.quant.compare import dequantized, ptq_model, write_csv
from mlx_localnorm.quant.train import QATConfig, QATData, load_float_model
from mlx_localnorm.train.model_dir import load_model_dir

SEQ_LEN = 64
FIRST = 128  # sequences in the earlier tables' 16 held-out batches of 8


def sequence_losses(model, batches, reference=None) -> np.ndarray | tuple[np.ndarray, float]:
    """Summed cross-entropy of each held-out sequence (float64); with ``reference`` (the
    float model's log-probabilities per batch) also the mean KL(reference || model) per
    token."""
    out, kl = [], 0.0
    for i, (inputs, targets, _) in enumerate(batches):
        logits = model(inputs).astype(mx.float32)
        ce = nn.losses.cross_entropy(logits, targets, reduction="none")
        out.append(np.array(ce, np.float64).sum(-1))
        if reference is not None:
            log_p = reference[i]
            kl += (mx.exp(log_p) * (log_p - nn.log_softmax(logits, axis=-1))).sum().item()
    losses = np.concatenate(out)
    return losses if reference is None else (losses, kl / losses.size / SEQ_LEN)


def log_probs(model, batches) -> list[mx.array]:
    """The model's log-probabilities for every held-out batch (float32, evaluated)."""
    out = [nn.log_softmax(model(inputs).astype(mx.float32), axis=-1)
           for inputs, _, _ in batches]
    mx.eval(out)
    return out


def gap_recovered(float_nll, ptq_nll, run_nll) -> float:
    ppl = [math.exp(x.sum() / (SEQ_LEN * len(x))) for x in (float_nll, ptq_nll, run_nll)]
    return 100 * (ppl[1] - ppl[2]) / (ppl[1] - ppl[0])


def setting(run: Path) -> str:
    c = json.loads((run / "train_config.json").read_text())
    words = [f"lr {c['learning_rate']:g}", f"{c['total_steps']} x {c['batch_size']}",
             f"seed {c['seed']}"]
    if c["learn_scales"]:
        words.append("learned scales" + (f" at {c['scale_lr_ratio']:g}x"
                                         if c["scale_lr_ratio"] != 1 else "")
                     + (" from MSE ranges" if c.get("scale_init") == "mse" else ""))
    if not c["train_others"]:
        words.append("norms frozen")
    if c.get("embedding_lr_ratio", 1) != 1:
        words.append(f"embedding at {c['embedding_lr_ratio']:g}x")
    if c.get("average_last", 0):
        words.append(f"mean of the last {c['average_last']} steps")
    return ", ".join(words)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--model", required=True, help="the float model the runs started from")
    parser.add_argument("--csv", required=True, type=Path)
    args = parser.parse_args()

    bits = {json.loads((run / "train_config.json").read_text())["bits"] for run in args.runs}
    if len(bits) != 1:
        raise SystemExit(f"runs must share one bit width, got {sorted(bits)}")
    float_model, tokenizer, _ = load_float_model(args.model)
    config = QATConfig(model=args.model, bits=bits.pop(), batch_size=4, seq_len=SEQ_LEN)
    batches = list(QATData(None, tokenizer, 4, SEQ_LEN, 0).held_out(0))
    base = sequence_losses(float_model, batches)
    reference = log_probs(float_model, batches)
    ptq, ptq_kl = sequence_losses(dequantized(ptq_model(config)), batches, reference)
    resamples = np.random.default_rng(0).integers(0, len(base), (1000, len(base)))

    def perplexity(nll: np.ndarray) -> str:
        return f"{math.exp(nll.sum() / (SEQ_LEN * len(nll))):.2f}"

    rows = [{"run": name, "setting": "", "bits": width, "ppl_first128": perplexity(nll[:FIRST]),
             "gap_recovered_first128_pct": "", "ppl_all": perplexity(nll),
             "gap_recovered_all_pct": "", "bootstrap_sd_pct": "", "kl_to_float": kl,
             "sequences": len(nll)}
            for name, width, nll, kl in (("float", "", base, "0"),
                                         ("ptq", config.bits, ptq, f"{ptq_kl:.5f}"))]
    for run in args.runs:
        nll, kl = sequence_losses(dequantized(load_model_dir(str(run))[0]), batches, reference)
        first = gap_recovered(base[:FIRST], ptq[:FIRST], nll[:FIRST])
        every = gap_recovered(base, ptq, nll)
        spread = [gap_recovered(base[i], ptq[i], nll[i]) for i in resamples]
        rows.append({
            "run": str(run), "setting": setting(run), "bits": config.bits,
            "ppl_first128": perplexity(nll[:FIRST]), "gap_recovered_first128_pct": f"{first:.1f}",
            "ppl_all": perplexity(nll), "gap_recovered_all_pct": f"{every:.1f}",
            "bootstrap_sd_pct": f"{np.std(spread):.1f}", "kl_to_float": f"{kl:.5f}",
            "sequences": len(nll)})
        print(rows[-1], flush=True)
    write_csv(rows, args.csv, list(rows[0]))
    print(f"float {perplexity(base)}, PTQ {perplexity(ptq)} on {len(base)} sequences of "
          f"{SEQ_LEN} tokens; wrote {args.csv}")


if __name__ == "__main__":
    main()
