"""Text to Megatron indexed datasets: PREFIX.bin + PREFIX.idx + PREFIX.stats.json, one EOD after each document.

The function behind `tools/prepare_data.py`: sources (sources.py) are read in this process, tokenized by
workers (encoding.py) and written by megatron-core's IndexedDatasetBuilder (indexed.py); nothing
appears under the final names until the run is complete.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from dataclasses import asdict, dataclass, field

from megatron_simreg.data.encoding import DocumentEncoder
from megatron_simreg.data.indexed import (
    PARTIAL,
    IndexedShardWriter,
    existing_outputs,
    remove_partial_leftovers,
    stats_path,
    token_dtype,
)
from megatron_simreg.data.sources import SkipCounter, iter_documents, resolve_sources
from megatron_simreg.data.tokenizer import build_tokenizer, default_tokenizer_path
from megatron_simreg.failures import check_writable
from megatron_simreg.progress import progress_bar


@dataclass
class CorpusStats:
    """What a run wrote; saved as PREFIX.stats.json beside the data (shards relative to that folder)."""

    documents: int = 0
    tokens: int = 0  # EODs included
    bytes: int = 0  # UTF-8 text of the documents kept
    skipped_lines: int = 0
    seconds: float = 0.0
    tokenizer: str = ""
    vocab_size: int = 0
    eod: int = 0
    dtype: str = ""
    sources: list[str] = field(default_factory=list)
    shards: list[str] = field(default_factory=list)


def prepare_corpus(
    sources: list[str],
    output_prefix: str,
    tokenizer: str | None = None,
    workers: int = 1,
    max_documents: int | None = None,
    max_tokens: int | None = None,
    shard_tokens: int | None = None,
    dtype: str | None = None,
    text_field: str = "text",
    hf_config: str | None = "en",
    hf_split: str = "train",
    overwrite: bool = False,
    progress: bool = True,
) -> CorpusStats:
    """Tokenize `sources` (files, folders, globs, `hf:NAME`) into `output_prefix` (or its shards).

    Stops after `max_documents` documents or after the document that reaches `max_tokens` tokens.
    With `shard_tokens` the output is PREFIX-00000, PREFIX-00001, ... of about that many tokens each.
    """
    for name, value in (("max_documents", max_documents), ("max_tokens", max_tokens)):
        if value is not None and value < 1:
            raise ValueError(f"{name}={value}: give a positive limit, or none")
    if output_prefix.endswith(("/", os.sep)) or os.path.isdir(output_prefix):  # it would write hidden .bin, .idx
        example = os.path.join(output_prefix, "corpus")
        raise ValueError(f"--output-prefix={output_prefix} is a folder, not a file prefix: name the files in it, e.g. "
                         f"--output-prefix={example} (writes {example}.bin, .idx and .stats.json)")
    check_writable(os.path.dirname(os.path.abspath(output_prefix)), "--output-prefix",
                   "give a prefix in a folder you can write to")
    previous = existing_outputs(output_prefix)
    if previous and not overwrite:
        raise FileExistsError(
            f"{output_prefix} already holds a dataset ({', '.join(previous[:3])}): "
            "pass --overwrite to replace it, or choose another --output-prefix"
        )
    remove_partial_leftovers(output_prefix)
    resolved = resolve_sources(sources, hf_config, hf_split)
    tokenizer_path = tokenizer or default_tokenizer_path()
    vocab = build_tokenizer(tokenizer_path)
    dtype_type = token_dtype(vocab.vocab_size, dtype)
    stats = CorpusStats(tokenizer=tokenizer_path, vocab_size=vocab.vocab_size, eod=vocab.eod,
                        dtype=dtype_type.__name__, sources=list(sources))
    counter = SkipCounter()
    # Workers read ahead of what is written: with max_tokens, skipped_lines may count a few lines past the end.
    documents = itertools.islice(iter_documents(resolved, counter, text_field), max_documents)
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    writer = IndexedShardWriter(output_prefix, dtype_type, shard_tokens)
    start = time.perf_counter()
    try:
        with DocumentEncoder(tokenizer_path, dtype_type, workers) as encode, \
                progress_bar(progress, total=max_documents, unit=" docs", desc="tokenizing") as bar:
            for size, tokens in encode(documents):
                writer.add(tokens)
                stats.documents += 1
                stats.tokens += tokens.size
                stats.bytes += size
                bar.update(1)
                if stats.documents % 256 == 0:
                    bar.set_postfix(tokens_per_s=f"{stats.tokens / (time.perf_counter() - start):,.0f}")
                if max_tokens is not None and stats.tokens >= max_tokens:
                    break
        stats.skipped_lines = counter.skipped_lines
        if stats.documents == 0:
            raise ValueError(
                f"no documents found in {', '.join(sources)} ({stats.skipped_lines} lines skipped: not UTF-8, "
                f"not JSON, or without a non-empty {text_field!r} field): check the paths and the text field"
            )
        stats.seconds = time.perf_counter() - start
        stats.shards = [os.path.basename(prefix) for prefix in writer.shards]
        with open(stats_path(output_prefix) + PARTIAL, "w", encoding="utf-8") as f:
            json.dump(asdict(stats), f, indent=2)
        writer.commit(replaced=previous)
        os.replace(stats_path(output_prefix) + PARTIAL, stats_path(output_prefix))  # last: the run is complete
    except BaseException:
        writer.discard()
        if os.path.exists(stats_path(output_prefix) + PARTIAL):
            os.remove(stats_path(output_prefix) + PARTIAL)
        raise
    return stats
