"""Sample text for calibration and held-out perplexity, as token batches of a model's tokenizer."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..data import load_corpus

# Characters read per token wanted: generous, so even a byte-level tokenizer gets enough.
CHARS_PER_TOKEN = 8


@dataclass(frozen=True)
class SampleText:
    """Token batches ``(batch_size, seq_len + 1)``: ``calibration`` from the corpus' training
    documents, ``held_out`` from its validation documents (or the end of a single text)."""

    calibration: list[mx.array]
    held_out: list[mx.array]
    source: str


def sample_text(tokenizer, source=None, batches: int = 4, batch_size: int = 4,
                seq_len: int = 128) -> SampleText:
    """Tokenize ``source`` (``ln.data.load_corpus``: None = the embedded Shakespeare, or a
    .txt/.jsonl file or folder) into ``batches`` calibration and ``batches`` held-out batches."""
    for name, value in (("batches", batches), ("batch_size", batch_size), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"sample_text: {name} must be a positive int, got {value!r}")
    corpus = load_corpus(source)
    need = batches * batch_size * (seq_len + 1)
    train = _tokens(tokenizer, corpus.train, need if corpus.valid else 2 * need)
    held_out = _tokens(tokenizer, corpus.valid, need) if corpus.valid else train[need:]
    train = train[:need]
    if len(train) < need or len(held_out) < need:
        raise ValueError(f"sample_text: {corpus.source} is too short: {batches} batches of "
                         f"{batch_size} x {seq_len + 1} tokens need {need} tokens for "
                         f"calibration and {need} held out, got {len(train)} and "
                         f"{len(held_out)}")
    shape = (batches, batch_size, seq_len + 1)
    return SampleText(list(mx.array(train.reshape(shape))),
                      list(mx.array(held_out[:need].reshape(shape))), corpus.source)


def _tokens(tokenizer, texts: list[str], count: int) -> np.ndarray:
    """The first ``count`` tokens (or all there are) of the documents ``texts``, in order."""
    chars = count * CHARS_PER_TOKEN
    text = "\n".join(texts)[:chars]
    return np.array(tokenizer.encode(text), dtype=np.int32)[:count]


def perplexity(model: nn.Module, batches: list[mx.array]) -> float:
    r""":math:`\exp(\mathrm{mean\ next\text{-}token\ cross\text{-}entropy})` over ``batches``
    of ``(B, L + 1)`` token ids (the first ``L`` predict the last ``L``)."""
    total, count = 0.0, 0
    for tokens in batches:
        logits = model(tokens[:, :-1]).astype(mx.float32)
        total += nn.losses.cross_entropy(logits, tokens[:, 1:], reduction="sum").item()
        count += tokens[:, 1:].size
    return float(np.exp(total / count))
