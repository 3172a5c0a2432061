"""Token files: the tokenized corpus as one flat memory-mapped array plus a JSON manifest.

``train.bin`` holds every document as ``<s> ids </s>``, back to back, as little-endian
uint16 (uint32 when the vocabulary has more than 65536 ids); ``train.json`` describes it.
Writing streams in chunks of documents, so the corpus never has to fit in memory as tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path

import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from ._io import atomic_open, atomic_write_bytes
from .tokenizer import tokenizer_hash

FORMAT = "mlx_localnorm.tokens/1"
# BPE encoding time grows faster than linearly with text length: encode long texts in blocks.
BLOCK_CHARS = 1 << 16
MANIFEST_KEYS = {
    "format",
    "dtype",
    "count",
    "documents",
    "vocab_size",
    "bos_id",
    "eos_id",
    "tokenizer_sha256",
    "tokens_sha256",
    "source",
}


class TokenFile:
    """A read-only, memory-mapped token file written by :func:`write_tokens`.

    Attributes:
        path: the ``.bin`` file.
        tokens: 1-D ``np.memmap`` of token ids.
        manifest: the ``.json`` beside it (dtype, count, documents, vocab_size, bos_id,
            eos_id, tokenizer_sha256, tokens_sha256, source).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        manifest_path = manifest_path_for(self.path)
        if not self.path.is_file() or not manifest_path.is_file():
            raise FileNotFoundError(
                f"token file {str(self.path)!r} or its manifest "
                f"{str(manifest_path)!r} is missing; write it with write_tokens()"
            )
        try:
            self.manifest = json.loads(manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(
                f"token manifest {str(manifest_path)!r} is not JSON ({e}): rewrite it"
            ) from None
        if not isinstance(self.manifest, dict) or self.manifest.get("format") != FORMAT:
            got = self.manifest.get("format") if isinstance(self.manifest, dict) else self.manifest
            raise ValueError(
                f"token manifest {str(manifest_path)!r}: format {got!r}, expected {FORMAT!r}"
            )
        missing = sorted(MANIFEST_KEYS - set(self.manifest))
        if missing:
            raise ValueError(f"token manifest {str(manifest_path)!r} lacks {missing}: rewrite it")
        dtype = np.dtype(self.manifest["dtype"]).newbyteorder("<")
        count = self.manifest["count"]
        size = self.path.stat().st_size
        if size != count * dtype.itemsize:
            raise ValueError(
                f"token file {str(self.path)!r} has {size} bytes, its manifest says "
                f"{count} x {dtype.name} = {count * dtype.itemsize}: rewrite it"
            )
        self.tokens = np.memmap(self.path, dtype=dtype, mode="r", shape=(count,))

    def __len__(self) -> int:
        return len(self.tokens)

    def verify(self) -> None:
        """Raise ``ValueError`` unless the tokens hash to the manifest's ``tokens_sha256``.

        Reads the whole file (about 1.5 s per GB on a 2-core x86 server): use it before
        reusing a file of unknown history.
        """
        digest = hashlib.sha256()
        with self.path.open("rb") as f:
            while block := f.read(1 << 24):
                digest.update(block)
        if digest.hexdigest() != self.manifest["tokens_sha256"]:
            raise ValueError(
                f"token file {str(self.path)!r} does not match its manifest's tokens_sha256: "
                f"rewrite it with write_tokens()"
            )

    def check_tokenizer(self, tokenizer: spm.SentencePieceProcessor) -> None:
        """Raise ``ValueError`` unless this file was written with ``tokenizer``."""
        if self.manifest["tokenizer_sha256"] != tokenizer_hash(tokenizer):
            raise ValueError(
                f"token file {str(self.path)!r} was written with tokenizer "
                f"{self.manifest['tokenizer_sha256'][:12]}, not "
                f"{tokenizer_hash(tokenizer)[:12]}: rewrite it with write_tokens()"
            )


def manifest_path_for(path: str | os.PathLike) -> Path:
    """``train.bin`` -> ``train.json``."""
    path = Path(path)
    if path.suffix == ".json":
        raise ValueError(
            f"token file path must not end in .json (the manifest's name), got {str(path)!r}"
        )
    return path.with_suffix(".json")


def write_tokens(
    texts: Iterable[str],
    tokenizer: spm.SentencePieceProcessor,
    path: str | os.PathLike,
    source: str = "",
    chunk_documents: int = 256,
) -> TokenFile:
    """Tokenize ``texts`` into the token file ``path`` (+ manifest), atomically.

    Each document becomes ``[bos] + tokenizer.encode(doc) + [eos]``. Documents are encoded
    ``chunk_documents`` at a time (in parallel) and appended to a temporary file that
    replaces ``path`` at the end, so a crash leaves no half-written token file. Documents
    longer than ``BLOCK_CHARS`` are encoded in blocks of whole lines when that gives the
    same ids (BPE models from ``train_tokenizer``): bounded work per call, and faster.

    Args:
        texts: documents; any iterable, e.g. a generator reading a large corpus lazily.
        tokenizer: the sentencepiece model (see ``train_tokenizer``).
        path: the ``.bin`` file to write; the manifest goes beside it as ``.json``.
        source: a description of the text, recorded in the manifest.
        chunk_documents: documents encoded per batch (bounds memory use).
    """
    if isinstance(texts, str):
        raise TypeError("write_tokens(texts=...) expects an iterable of documents, got one str")
    if not isinstance(chunk_documents, int) or chunk_documents < 1:
        raise ValueError(
            f"write_tokens(chunk_documents=...) must be a positive int, got {chunk_documents!r}"
        )
    path, manifest_path = Path(path), manifest_path_for(path)
    vocab_size = tokenizer.vocab_size()
    # Ids are < vocab_size, so uint16 holds every id of a vocabulary up to 2**16.
    dtype = np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32).newbyteorder("<")
    bos, eos = tokenizer.bos_id(), tokenizer.eos_id()
    encode = _DocumentEncoder(tokenizer)
    count = documents = 0
    digest = hashlib.sha256()
    with atomic_open(path) as f:
        for chunk in _chunks(texts, chunk_documents):
            for ids in encode(chunk):
                data = np.asarray([bos, *ids, eos], dtype=dtype).tobytes()
                f.write(data)
                digest.update(data)
                count += len(ids) + 2
                documents += 1
        if documents == 0:
            raise ValueError(f"write_tokens(texts=...) got no documents for {str(path)!r}")
    manifest = {
        "format": FORMAT,
        "dtype": dtype.name,
        "count": count,
        "documents": documents,
        "vocab_size": vocab_size,
        "bos_id": bos,
        "eos_id": eos,
        "tokenizer_sha256": tokenizer_hash(tokenizer),
        "tokens_sha256": digest.hexdigest(),
        "source": source,
    }
    atomic_write_bytes(manifest_path, (json.dumps(manifest, indent=2) + "\n").encode())
    return TokenFile(path)


class _DocumentEncoder:
    """``encode(docs) -> ids per doc``; long documents go block by block when that is exact."""

    def __init__(self, tokenizer: spm.SentencePieceProcessor):
        self.tokenizer = tokenizer
        self.after_newline = _after_newline_model(tokenizer)

    def __call__(self, docs: list[str]) -> list[list[int]]:
        threads = os.cpu_count() or 1
        if self.after_newline is None:
            return self.tokenizer.encode(docs, num_threads=threads)
        blocks = [_line_blocks(doc, BLOCK_CHARS) for doc in docs]
        firsts = self.tokenizer.encode([b[0] for b in blocks], num_threads=threads)
        rests = iter(
            self.after_newline.encode([x for b in blocks for x in b[1:]], num_threads=threads)
        )
        encoded = []
        for first, doc_blocks in zip(firsts, blocks):
            ids = list(first)
            for _ in doc_blocks[1:]:
                ids += next(rests)
            encoded.append(ids)
        return encoded


def _after_newline_model(
    tokenizer: spm.SentencePieceProcessor,
) -> spm.SentencePieceProcessor | None:
    """The model without its dummy-prefix ``▁``, to encode text that follows a newline.

    Only for BPE that can never join across a newline (no normalization, no whitespace
    collapsing, no piece holding a newline), where blocks give exactly the whole-text ids.
    Otherwise None: encode whole documents (unigram's Viterbi can break float near-ties
    differently in a shorter text; it is linear-time anyway).
    """
    if not isinstance(tokenizer, spm.SentencePieceProcessor):
        return None
    proto = sp_pb2.ModelProto()
    proto.ParseFromString(tokenizer.serialized_model_proto())
    spec = proto.normalizer_spec
    if (
        proto.trainer_spec.model_type != sp_pb2.TrainerSpec.BPE
        or spec.name != "identity"
        or spec.remove_extra_whitespaces
        or proto.trainer_spec.treat_whitespace_as_suffix
        or any("\n" in p.piece for p in proto.pieces)
    ):
        return None
    spec.add_dummy_prefix = False
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())


def _line_blocks(text: str, size: int) -> list[str]:
    """``text`` cut after newlines into blocks of at most ``size`` characters where possible."""
    blocks, start = [], 0
    while len(text) - start > size:
        cut = text.rfind("\n", start, start + size)
        if cut < 0:  # a line longer than a block: cut after it
            cut = text.find("\n", start + size)
            if cut < 0:
                break
        blocks.append(text[start : cut + 1])
        start = cut + 1
    blocks.append(text[start:])
    return blocks


def _chunks(texts: Iterable[str], size: int) -> Iterator[list[str]]:
    it = iter(texts)
    while chunk := list(islice(it, size)):
        for text in chunk:
            if not isinstance(text, str):
                raise TypeError(
                    f"write_tokens(texts=...) items must be str, got {type(text).__name__}"
                )
        yield chunk
