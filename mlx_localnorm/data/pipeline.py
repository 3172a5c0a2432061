"""One call from text to training-ready token files in a run directory."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from .corpus import Corpus, Source, load_corpus
from .tokenizer import (
    HF_FILE,
    SPM_FILE,
    load_tokenizer,
    save_tokenizer,
    tokenizer_hash,
    train_tokenizer,
)
from .tokens import TokenFile, write_tokens


@dataclass(frozen=True)
class PreparedData:
    """A run directory's tokenizer and token files (``valid`` is None without validation text)."""

    tokenizer: spm.SentencePieceProcessor
    train: TokenFile
    valid: TokenFile | None


def prepare_data(
    source: Source | Corpus,
    out_dir: str | os.PathLike,
    vocab_size: int = 8192,
    model_type: str = "bpe",
) -> PreparedData:
    """Train (or reuse) the run's tokenizer and write (or reuse) ``train.bin``/``valid.bin``.

    An existing ``out_dir/tokenizer.model`` is reused, never retrained, so a resumed run
    keeps its ids; it must match ``vocab_size`` and ``model_type`` (a missing
    ``tokenizer.json`` is rebuilt from it). Token files are reused
    when intact (``TokenFile.verify``) and their manifest names the same tokenizer, source
    and document count; otherwise they are rewritten.

    Args:
        source: a :class:`Corpus` or anything ``load_corpus`` accepts (None: Shakespeare).
        out_dir: the run directory.
        vocab_size, model_type: the tokenizer to train (see ``train_tokenizer``).
    """
    corpus = source if isinstance(source, Corpus) else load_corpus(source)
    out_dir = Path(out_dir)
    if (out_dir / SPM_FILE).is_file():
        tokenizer = load_tokenizer(out_dir)
        _check_reused_tokenizer(tokenizer, out_dir, vocab_size, model_type)
        if not (out_dir / HF_FILE).is_file():  # e.g. a run interrupted while saving it
            save_tokenizer(tokenizer.serialized_model_proto(), out_dir)
    else:
        tokenizer = train_tokenizer(corpus.train, out_dir, vocab_size, model_type)
    train = _tokens(corpus.train, tokenizer, out_dir / "train.bin", corpus.source)
    valid = (
        _tokens(corpus.valid, tokenizer, out_dir / "valid.bin", corpus.source)
        if corpus.valid
        else None
    )
    return PreparedData(tokenizer, train, valid)


def _check_reused_tokenizer(
    tokenizer: spm.SentencePieceProcessor, out_dir: Path, vocab_size: int, model_type: str
) -> None:
    proto = sp_pb2.ModelProto()
    proto.ParseFromString(tokenizer.serialized_model_proto())
    saved_type = sp_pb2.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type).lower()
    if (tokenizer.vocab_size(), saved_type) != (vocab_size, model_type):
        raise ValueError(
            f"{out_dir / SPM_FILE} has vocab_size={tokenizer.vocab_size()}, "
            f"model_type={saved_type!r}, but vocab_size={vocab_size}, "
            f"model_type={model_type!r} was asked: use another out_dir or the same settings"
        )


def _tokens(
    texts: list[str], tokenizer: spm.SentencePieceProcessor, path: Path, source: str
) -> TokenFile:
    """Reuse ``path`` if it is intact and holds these documents' tokens, else (re)write it."""
    wanted = {
        "tokenizer_sha256": tokenizer_hash(tokenizer),
        "source": source,
        "documents": len(texts),
    }
    try:
        existing = TokenFile(path)
        existing.verify()
    except (FileNotFoundError, ValueError):
        return write_tokens(texts, tokenizer, path, source=source)
    if all(existing.manifest[key] == value for key, value in wanted.items()):
        return existing
    return write_tokens(texts, tokenizer, path, source=source)
