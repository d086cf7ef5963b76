"""Documents from where users keep text: a Hugging Face dataset (C4 by default), C4-format shards, text files.

`resolve_sources` checks every input before anything is written; `iter_documents` then yields document
strings. Lines that cannot be decoded or parsed are skipped and counted in `SkipCounter`, never fatal,
so one bad line in a 300 GB corpus does not stop a run.
"""

from __future__ import annotations

import glob
import gzip
import importlib.util
import json
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

HF_PREFIX = "hf:"
DEFAULT_HF_DATASET = HF_PREFIX + "allenai/c4"
C4_SUFFIXES = (".json.gz", ".jsonl.gz", ".jsonl", ".json")
TEXT_SUFFIXES = (".txt", ".text", ".md")


@dataclass
class SkipCounter:
    """Lines (or records) dropped: not UTF-8, not JSON, or without a non-empty text field."""

    skipped_lines: int = 0


@dataclass(frozen=True)
class HFSource:
    """A Hugging Face dataset, streamed (nothing is downloaded up front)."""

    name: str
    config: str | None = "en"
    split: str = "train"


def resolve_sources(sources: list[str], hf_config: str | None = "en", hf_split: str = "train") -> list:
    """Expand files, folders and globs into sorted files; `hf:NAME` into an `HFSource`. Missing input fails here."""
    if not sources:
        raise ValueError("no input given: pass files, folders, globs, or hf:allenai/c4")
    resolved = []
    for source in sources:
        if source.startswith(HF_PREFIX):
            if importlib.util.find_spec("datasets") is None:
                raise ImportError(
                    f"streaming {source} needs the `datasets` package: pip install 'megatron-simreg[data]' "
                    "(or datasets), or download C4 shards and pass them as files"
                )
            resolved.append(HFSource(source[len(HF_PREFIX):], hf_config, hf_split))
        else:
            resolved.extend(_local_paths(source))
    return resolved


def iter_documents(resolved: list, counter: SkipCounter, field: str = "text") -> Iterator[str]:
    """Document strings from `resolve_sources` output, in order."""
    for source in resolved:
        if isinstance(source, HFSource):
            yield from _hugging_face(source, field, counter)
        elif source.endswith(C4_SUFFIXES):
            yield from _c4_shard(source, field, counter)
        else:
            yield from _text_file(source, counter)


def _local_paths(source: str) -> list[str]:
    if os.path.isdir(source):
        paths = sorted(
            os.path.join(root, name)
            for root, _, names in os.walk(source)
            for name in names
            if name.endswith(C4_SUFFIXES + TEXT_SUFFIXES)
        )
    else:
        paths = sorted(path for path in glob.glob(source) if os.path.isfile(path))
    if not paths:
        raise FileNotFoundError(
            f"no input found at {source!r}: give C4-format shards (*.json.gz, *.jsonl with a 'text' field), "
            f"text files ({', '.join(TEXT_SUFFIXES)}), a folder or glob of them, or hf:allenai/c4 to stream C4"
        )
    return paths


def _c4_shard(path: str, field: str, counter: SkipCounter) -> Iterator[str]:
    """One JSON object per line, the document in `field` (C4's `text`); gzipped or not."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as lines:
            for raw in lines:
                try:
                    text = json.loads(raw.decode("utf-8"))[field]
                except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
                    text = None
                if isinstance(text, str) and text.strip():
                    yield text
                else:
                    counter.skipped_lines += 1
    except (EOFError, gzip.BadGzipFile, zlib.error) as error:
        raise ValueError(f"{path} is not a complete gzip file ({error}): download or copy it again") from error


def _text_file(path: str, counter: SkipCounter) -> Iterator[str]:
    """A plain text file is one document; undecodable lines are dropped and counted."""
    kept = []
    with open(path, "rb") as lines:
        for raw in lines:
            try:
                kept.append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                counter.skipped_lines += 1
    text = "".join(kept)
    if text.strip():
        yield text


def _hugging_face(source: HFSource, field: str, counter: SkipCounter) -> Iterator[str]:
    import datasets

    for record in datasets.load_dataset(source.name, source.config, split=source.split, streaming=True):
        text = record.get(field)
        if isinstance(text, str) and text.strip():
            yield text
        else:
            counter.skipped_lines += 1
