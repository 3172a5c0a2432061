"""Text corpora: the embedded Shakespeare works or your own ``.txt``/``.jsonl`` files.

A corpus is a list of documents split into train and validation by whole documents, so no
validation text ever appears in training.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

DEFAULT_CORPUS = "shakespeare"
# Whole works held out of the default corpus (233 kB, 4.6% of its 5.06 MB): a comedy and
# the three short poem collections, so validation covers both verse drama and lyric verse.
SHAKESPEARE_VALID_WORKS = ("lovers_complaint", "passionate_pilgrim", "sonnets", "twelfth_night")
TEXT_SUFFIXES = (".txt", ".jsonl")

Source = str | os.PathLike | Sequence[str | os.PathLike] | None


@dataclass(frozen=True)
class Corpus:
    """Documents split into ``train`` and ``valid``, with one name per document."""

    train: list[str]
    valid: list[str]
    train_names: list[str]
    valid_names: list[str]
    source: str


def load_corpus(source: Source = None, valid_fraction: float = 0.05) -> Corpus:
    """Load a corpus and split it into train and validation by whole documents.

    Args:
        source: ``None`` or ``"shakespeare"`` for the embedded complete works (42 works; the
            validation split is the fixed list ``SHAKESPEARE_VALID_WORKS``), or a ``.txt``
            file (one document), a ``.jsonl`` file (one document per line, in its ``text``
            field), a folder (searched recursively for both), or a list of these.
        valid_fraction: for your own files, the share of documents held out. A document is
            held out when the SHA-256 of its name falls in that share of the hash range, so
            the split is reproducible and does not move when other files are added. With
            two or more documents at least one goes to each side; a single document is all
            training.
    """
    if not isinstance(valid_fraction, (int, float)) or not 0 <= valid_fraction < 1:
        raise ValueError(
            f"load_corpus(valid_fraction=...) must be in [0, 1), got {valid_fraction!r}"
        )
    if source is None or (isinstance(source, str) and source == DEFAULT_CORPUS):
        return _shakespeare()
    paths = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    if not paths:
        raise ValueError("load_corpus(source=[]) needs at least one file or folder")
    docs = [doc for path in paths for doc in _read_source(Path(path))]
    is_valid = _hash_split([name for name, _ in docs], valid_fraction)
    train = [doc for doc, v in zip(docs, is_valid) if not v]
    valid = [doc for doc, v in zip(docs, is_valid) if v]
    return Corpus(
        train=[text for _, text in train],
        valid=[text for _, text in valid],
        train_names=[name for name, _ in train],
        valid_names=[name for name, _ in valid],
        source=", ".join(str(p) for p in paths),
    )


def _shakespeare() -> Corpus:
    data = resources.files(__package__).joinpath("shakespeare.jsonl.xz").read_bytes()
    works = [json.loads(line) for line in lzma.decompress(data).decode("utf-8").splitlines()]
    train = [w for w in works if w["id"] not in SHAKESPEARE_VALID_WORKS]
    valid = [w for w in works if w["id"] in SHAKESPEARE_VALID_WORKS]
    return Corpus(
        train=[w["text"] for w in train],
        valid=[w["text"] for w in valid],
        train_names=[w["id"] for w in train],
        valid_names=[w["id"] for w in valid],
        source=DEFAULT_CORPUS,
    )


def _hash_split(names: list[str], valid_fraction: float) -> list[bool]:
    """Per document, whether it is held out: its name's hash lies below ``valid_fraction``."""
    position = [
        int.from_bytes(hashlib.sha256(n.encode()).digest()[:8], "big") / 2**64 for n in names
    ]
    is_valid = [p < valid_fraction for p in position]
    if names and all(is_valid):
        is_valid[position.index(max(position))] = False
    if len(names) >= 2 and valid_fraction > 0 and not any(is_valid):
        is_valid[position.index(min(position))] = True
    return is_valid


def _read_source(path: Path) -> list[tuple[str, str]]:
    """(name, text) for every document under ``path``; names are paths relative to a folder."""
    if not path.exists():
        raise FileNotFoundError(
            f"corpus source {str(path)!r} does not exist (expected a .txt or "
            f".jsonl file or a folder of them)"
        )
    if path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file() and p.suffix in TEXT_SUFFIXES and not p.name.startswith(".")
        )
        if not files:
            raise ValueError(f"corpus folder {str(path)!r} has no .txt or .jsonl files")
        docs = [doc for f in files for doc in _read_file(f, f.relative_to(path).as_posix())]
        if not docs:
            raise ValueError(f"corpus folder {str(path)!r} holds only empty files")
        return docs
    if path.suffix not in TEXT_SUFFIXES:
        raise ValueError(
            f"corpus file {str(path)!r} must end in .txt or .jsonl, got {path.suffix!r}"
        )
    docs = list(_read_file(path, path.name))
    if not docs:
        raise ValueError(f"corpus file {str(path)!r} is empty")
    return docs


def _read_file(path: Path, name: str) -> Iterator[tuple[str, str]]:
    try:
        if path.suffix == ".txt":
            text = path.read_text(encoding="utf-8-sig").replace("\r\n", "\n")
            if text.strip():
                yield name, text
            return
        with path.open(encoding="utf-8-sig") as f:
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    text = _jsonl_text(line, f"{path}:{lineno}")
                    if text.strip():
                        yield f"{name}:{lineno}", text.replace("\r\n", "\n")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"corpus file {str(path)!r} is not UTF-8 text ({e.reason} at byte {e.start})"
        ) from None


def _jsonl_text(line: str, where: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(
            f'{where}: not a JSON object ({e.msg}); expected {{"text": "..."}}'
        ) from None
    if not isinstance(record, dict) or "text" not in record:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ValueError(f'{where}: JSONL record has no "text" field (got {keys})')
    if not isinstance(record["text"], str):
        raise TypeError(f'{where}: "text" must be a string, got {type(record["text"]).__name__}')
    return record["text"]
