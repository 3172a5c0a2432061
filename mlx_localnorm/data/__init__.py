"""Data for pre-training (corpora, a sentencepiece tokenizer, token files, packed batches)
and fine-tuning (mlx-lm JSONL formats, loss masks, length-bucketed batches).

Example::

    import mlx_localnorm as ln
    data = ln.data.prepare_data(None, "runs/demo")      # Shakespeare, 8192-piece BPE
    batches = ln.data.Batches(data.train, batch_size=16, seq_len=256, seed=0)
    inputs, targets = next(batches)                     # int32 (16, 256) each
"""

from .batches import Batches
from .corpus import SHAKESPEARE_VALID_WORKS, Corpus, load_corpus
from .pipeline import PreparedData, prepare_data
from .sft import Example, SFTBatches, SFTData, load_sft, masked_cross_entropy
from .tokenizer import load_tokenizer, train_tokenizer
from .tokens import TokenFile, write_tokens

__all__ = [
    "SHAKESPEARE_VALID_WORKS",
    "Batches",
    "Corpus",
    "Example",
    "PreparedData",
    "SFTBatches",
    "SFTData",
    "TokenFile",
    "load_corpus",
    "load_sft",
    "load_tokenizer",
    "masked_cross_entropy",
    "prepare_data",
    "train_tokenizer",
    "write_tokens",
]
