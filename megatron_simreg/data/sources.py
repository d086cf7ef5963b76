"""Documents from where users keep text: a Hugging Face dataset (C4 by default), C4-format shards, text files.

Each source yields document strings. Lines that cannot be decoded or parsed are skipped and counted in
`SkipCounter`, never fatal, so one bad line in a 300 GB corpus does not stop a run.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass

C4_SUFFIXES = (".json.gz", ".jsonl.gz", ".jsonl", ".json")
TEXT_SUFFIXES = (".txt", ".md", ".text")


@dataclass
class SkipCounter:
    skipped_lines: int = 0


def iter_documents(source: str, counter: SkipCounter, field: str = "text", hf_config: str | None = "en",
                   hf_split: str = "train") -> Iterator[str]:
    """Documents from `source`: a file, a folder or glob of C4 shards / text files, or `hf:NAME`."""
    if source.startswith("hf:"):
        yield from _hugging_face(source[3:], hf_config, hf_split, field)
        return
    paths = _local_paths(source)
    for path in paths:
        if path.endswith(C4_SUFFIXES):
            yield from _c4_shard(path, field, counter)
        else:
            yield from _text_file(path, counter)


def _local_paths(source: str) -> list[str]:
    if os.path.isdir(source):
        paths = sorted(
            os.path.join(root, name)
            for root, _, names in os.walk(source)
            for name in names
            if name.endswith(C4_SUFFIXES + TEXT_SUFFIXES)
        )
    else:
        paths = sorted(glob.glob(source))
    if not paths:
        raise FileNotFoundError(
            f"no input found at {source!r}: give C4-format shards (*.json.gz, *.jsonl with a 'text' field), "
            "text files, a folder of them, or hf:allenai/c4 to stream from the Hugging Face hub"
        )
    return paths


def _c4_shard(path: str, field: str, counter: SkipCounter) -> Iterator[str]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as lines:
        for raw in lines:
            try:
                text = json.loads(raw.decode("utf-8"))[field]
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
                counter.skipped_lines += 1
                continue
            if isinstance(text, str) and text.strip():
                yield text


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


def _hugging_face(name: str, config: str | None, split: str, field: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError as error:
        raise ImportError("streaming from the Hugging Face hub needs `pip install datasets` (extra [data])") from error
    for record in datasets.load_dataset(name, config, split=split, streaming=True):
        text = record.get(field)
        if isinstance(text, str) and text.strip():
            yield text
