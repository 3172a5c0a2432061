"""The QAT results table: held-out perplexity of the float model, mlx-lm's post-training
quantization (``quantize_model``, what ``mlx_lm.convert -q`` does), mlx-lm's DWQ
(``mlx_lm.quant.dwq``: distilled scales and biases) with QAT's token budget, and QAT."""

from __future__ import annotations

import contextlib
import csv
import math
import os
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..data import Batches
from .train import QATConfig, QATData, held_out_loss, load_float_model

COLUMNS = ["bits", "group_size", "mode", "method", "val_loss", "val_ppl", "vs_float_pct",
           "gap_recovered_pct", "steps", "batch_size", "seq_len", "eval_tokens", "note"]


def ptq_model(config: QATConfig):
    """The float model quantized by ``mlx_lm.utils.quantize_model`` (its own predicate)."""
    from mlx_lm.utils import quantize_model

    model = load_float_model(config.model)[0]
    with contextlib.redirect_stdout(None):  # its "[INFO] Quantized model with ..." line
        quantize_model(model, {}, config.group_size, config.bits, mode=config.mode)
    return model


def dwq_model(config: QATConfig, data: QATData, learning_rate: float, log: Path):
    """mlx-lm's DWQ from the PTQ model: the same training sequences as QAT (steps x batch,
    same order), targets the float model's logits (temperature 2, its default), float32."""
    from mlx.optimizers import Adam
    from mlx_lm.quant.dwq import dwq_quantize

    teacher = load_float_model(config.model)[0]
    model = ptq_model(config)
    batches = Batches(data.tokens.train, config.batch_size, config.seq_len, seed=config.seed)
    train = [(_sequence(next(batches), row), 0) for _ in range(config.total_steps)
             for row in range(config.batch_size)]
    # DWQ logs a validation loss at its start, every 200 steps and at its end; one batch
    # keeps that cheap (the table scores the result on the held-out set itself)
    valid = [(_sequence(batch, row), 0) for batch in data.held_out(1)
             for row in range(batch[0].shape[0])]
    with open(log, "w") as out, contextlib.redirect_stdout(out):
        dwq_quantize(model, lambda batch, i, split: teacher(batch), Adam(learning_rate),
                     train, valid, config.batch_size, config.seq_len + 1, config.seed,
                     dtype=mx.float32)
    model.eval()
    return model


def _sequence(batch, row: int) -> list[int]:
    inputs, targets = batch[:2]
    return np.concatenate([np.array(inputs[row]), np.array(targets[row, -1:])]).tolist()


def dequantized(model):
    """``model`` with its real quantized layers replaced, in place, by float layers holding
    their dequantized weights (``mlx_lm.utils.dequantize_model``): the same grid values, so
    the same loss up to float rounding, and on a CPU MLX's 3-bit quantized matmul is ~25x
    slower than a float one (7 s vs 0.28 s per 8 x 64 batch of the demo model)."""
    from mlx_lm.utils import dequantize_model

    model = dequantize_model(model)
    mx.eval(model.parameters())  # dequantize once, not in every forward pass
    return model


def evaluate(model, config: QATConfig, data: QATData) -> float:
    """Held-out loss, real quantized layers scored through :func:`dequantized`."""
    return held_out_loss(dequantized(model), data, config.eval_batches)


def row(config: QATConfig, method: str, loss: float | None, float_loss: float | None,
        ptq_loss: float | None, note: str = "", eval_tokens: int | str = "") -> dict:
    """One table row (``loss`` None: not measured) scored on ``eval_tokens`` held-out
    tokens; ``gap_recovered_pct`` = (ppl_ptq - ppl) / (ppl_ptq - ppl_float)."""
    ppl = math.exp(loss) if loss is not None else None
    quantized = method != "float"
    out = {"bits": config.bits if quantized else "",
           "group_size": config.group_size if quantized else "",
           "mode": config.mode if quantized else "", "method": method,
           "val_loss": "" if ppl is None else f"{loss:.4f}",
           "val_ppl": "" if ppl is None else f"{ppl:.2f}",
           "vs_float_pct": "", "gap_recovered_pct": "",
           "steps": config.total_steps if method in ("dwq", "qat") else 0,
           "batch_size": config.batch_size, "seq_len": config.seq_len,
           "eval_tokens": eval_tokens if ppl is not None else "",
           "note": note}
    if ppl is not None and float_loss is not None:
        float_ppl = math.exp(float_loss)
        out["vs_float_pct"] = f"{100 * (ppl / float_ppl - 1):+.2f}"
        if ptq_loss is not None and method in ("dwq", "qat"):
            gap = math.exp(ptq_loss) - float_ppl
            if gap > 0:
                out["gap_recovered_pct"] = f"{100 * (math.exp(ptq_loss) - ppl) / gap:.0f}"
    return out


def format_table(rows: list[dict]) -> str:
    shown = ["bits", "method", "val_ppl", "vs_float_pct", "gap_recovered_pct", "note"]
    heads = ["bits", "method", "perplexity", "vs float %", "PTQ gap recovered %", "note"]
    cells = [heads] + [[str(r[k]) or "-" if k == "bits" else str(r[k]) for k in shown]
                       for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(heads) - 1)]
    lines = ["  ".join(c[i].ljust(w) for i, w in enumerate(widths)) + "  " + c[-1]
             for c in cells]
    return "\n".join(line.rstrip() for line in lines)


def write_csv(rows: list[dict], path: str | Path, columns: list[str] | None = None) -> Path:
    """Write ``rows`` (with ``columns``; default: the table's) to ``path`` through a temporary
    file (never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns or COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
    return path
