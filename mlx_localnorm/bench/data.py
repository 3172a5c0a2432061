"""``mlx-localnorm bench data``: how fast the data pipeline turns text into batches.

On the embedded Shakespeare (train split, 4.8 MB) or ``--corpus``: sentencepiece training
time per model type, tokenization into a token file (sentencepiece) and through the mlx-lm
tokenizer (Hugging Face ``tokenizers``), and the time to assemble one packed batch from the
memory-mapped file, to compare with a training step's time (the pipeline must not be the
bottleneck).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import mlx.core as mx

from .._argparse import OneLineParser
from ..data import Batches, Corpus, load_corpus, train_tokenizer, write_tokens
from ..data.tokenizer import MODEL_TYPES
from .common import device, machine, markdown_table, time_ms, write_csv

COLUMNS = [
    "machine",
    "device",
    "mlx",
    "stage",
    "model_type",
    "vocab_size",
    "size",
    "seconds",
    "throughput",
    "unit",
]


def pipeline_rows(
    corpus: Corpus, model_type: str, vocab_size: int, batch_size: int, seq_len: int,
    repeat: int = 10,
) -> list[dict]:
    """One row per stage for one tokenizer type, all in a throw-away run directory."""
    from mlx_lm.utils import load_tokenizer as mlx_lm_load_tokenizer

    megabytes = sum(len(t.encode()) for t in corpus.train) / 1e6
    rows = []

    def row(stage: str, size: str, seconds: float, throughput: float, unit: str) -> None:
        rows.append(
            {
                "stage": stage,
                "model_type": model_type,
                "vocab_size": vocab_size,
                "size": size,
                "seconds": seconds,
                "throughput": throughput,
                "unit": unit,
            }
        )

    with tempfile.TemporaryDirectory() as run_dir:
        start = time.perf_counter()
        sp = train_tokenizer(corpus.train, run_dir, vocab_size, model_type)
        seconds = time.perf_counter() - start
        row("train_tokenizer", f"{megabytes:.2f} MB", seconds, megabytes / seconds, "MB/s")

        start = time.perf_counter()
        tokens = write_tokens(corpus.train, sp, Path(run_dir) / "train.bin")
        seconds = time.perf_counter() - start
        row(
            "write_tokens (sentencepiece)",
            f"{len(tokens)} tokens",
            seconds,
            len(tokens) / seconds / 1e6,
            "M tokens/s",
        )

        wrapper = mlx_lm_load_tokenizer(Path(run_dir))
        start = time.perf_counter()
        count = sum(len(wrapper.encode(text)) for text in corpus.train)
        seconds = time.perf_counter() - start
        row(
            "encode (mlx-lm tokenizer)",
            f"{count} tokens",
            seconds,
            count / seconds / 1e6,
            "M tokens/s",
        )

        batches = Batches(tokens, batch_size=batch_size, seq_len=seq_len, seed=0)
        ms = time_ms(lambda: next(batches), warmup=3, repeat=repeat)
        row(
            "next(Batches)",
            f"{batch_size}x{seq_len}",
            ms / 1000,
            batch_size * seq_len / ms / 1000,
            "M tokens/s",
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(
        prog="mlx-localnorm bench data",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", default="bench/results", help="output directory")
    parser.add_argument("--corpus", default="shakespeare",
                        help="'shakespeare' (embedded) or a .txt/.jsonl file or folder")
    parser.add_argument("--model-types", default=",".join(MODEL_TYPES), help="comma separated")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=10, help="timing samples of a batch")
    args = parser.parse_args(argv)
    model_types = args.model_types.split(",")
    for m in model_types:
        if m not in MODEL_TYPES:
            parser.error(f"--model-types: unknown {m!r}; valid: {', '.join(MODEL_TYPES)}")
    for flag in ("vocab_size", "batch_size", "seq_len", "repeat"):
        if getattr(args, flag) < 1:
            parser.error(
                f"--{flag.replace('_', '-')} must be a positive int, got {getattr(args, flag)}"
            )
    try:
        corpus = load_corpus(args.corpus)
    except ValueError as err:  # an empty or malformed corpus (a missing one is an OSError)
        parser.error(f"--corpus: {err}")
    context = {"machine": machine(), "device": device(), "mlx": mx.__version__}
    rows = []
    for model_type in model_types:
        for r in pipeline_rows(corpus, model_type, args.vocab_size, args.batch_size, args.seq_len,
                               args.repeat):
            r.update(context, seconds=f"{r['seconds']:.4g}", throughput=f"{r['throughput']:.3g}")
            rows.append({c: r[c] for c in COLUMNS})
    path = write_csv(rows, Path(args.out) / "data.csv")
    print(markdown_table(rows, COLUMNS[3:]))
    print(f"wrote {path}")
    return 0
