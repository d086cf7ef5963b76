"""Text to Megatron indexed datasets: PREFIX.bin + PREFIX.idx (+ PREFIX.stats.json), one EOD per document.

Tokenization runs in worker processes; documents keep their order, so the output is byte-identical
whatever the number of workers. Files are written under a `.partial` name and renamed when complete:
an interrupted run leaves nothing that looks finished.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field

import numpy
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder, get_bin_path, get_idx_path
from tqdm import tqdm

from megatron_simreg.data.sources import SkipCounter, iter_documents
from megatron_simreg.data.tokenizer import build_tokenizer, default_tokenizer_path


@dataclass
class CorpusStats:
    documents: int = 0
    tokens: int = 0
    bytes: int = 0
    skipped_lines: int = 0
    seconds: float = 0.0
    tokenizer: str = ""
    vocab_size: int = 0
    eod: int = 0
    dtype: str = ""
    prefixes: list[str] = field(default_factory=list)


def stats_path(prefix: str) -> str:
    return prefix + ".stats.json"


def prepare_corpus(
    sources: list[str],
    output_prefix: str,
    tokenizer: str | None = None,
    workers: int = 1,
    max_documents: int | None = None,
    max_tokens: int | None = None,
    shard_tokens: int | None = None,
    dtype: str | None = None,
    progress: bool = True,
) -> CorpusStats:
    """Tokenize `sources` into `output_prefix` (or `output_prefix-00000`, ... with `shard_tokens`)."""
    tokenizer_path = tokenizer or default_tokenizer_path()
    tok = build_tokenizer(tokenizer_path)
    token_dtype = _token_dtype(dtype, tok.vocab_size)
    counter = SkipCounter()
    stats = CorpusStats(tokenizer=tokenizer_path, vocab_size=tok.vocab_size, eod=tok.eod, dtype=numpy.dtype(token_dtype).name)
    documents = _limited(_chain(sources, counter), max_documents)
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    writer = _ShardWriter(output_prefix, token_dtype, shard_tokens)
    start = time.perf_counter()
    try:
        with _encoder(tokenizer_path, workers) as encode, tqdm(disable=not progress, unit=" docs", desc="tokenizing") as bar:
            for text, ids in encode(documents):
                if not ids:
                    continue
                ids.append(tok.eod)
                writer.add(ids)
                stats.documents += 1
                stats.tokens += len(ids)
                stats.bytes += len(text.encode("utf-8"))
                bar.update(1)
                elapsed = max(time.perf_counter() - start, 1e-9)
                if stats.documents % 100 == 0:
                    bar.set_postfix(tokens_per_s=f"{stats.tokens / elapsed:,.0f}", docs_per_s=f"{stats.documents / elapsed:,.0f}")
                if max_tokens is not None and stats.tokens >= max_tokens:
                    break
        if stats.documents == 0:
            raise ValueError(
                f"no documents found in {', '.join(sources)} ({counter.skipped_lines} lines skipped): "
                "check the paths and that C4-format lines carry a non-empty 'text' field"
            )
        stats.prefixes = writer.finish()
    except BaseException:
        writer.abort()
        raise
    stats.skipped_lines = counter.skipped_lines
    stats.seconds = time.perf_counter() - start
    partial = stats_path(output_prefix) + ".partial"
    with open(partial, "w", encoding="utf-8") as f:
        json.dump(asdict(stats), f, indent=2)
    os.replace(partial, stats_path(output_prefix))
    return stats


def _token_dtype(requested: str | None, vocab_size: int):
    dtype = numpy.dtype(requested) if requested else numpy.dtype(DType.optimal_dtype(vocab_size))
    if numpy.iinfo(dtype).max + 1 < vocab_size:
        raise ValueError(
            f"a vocabulary of {vocab_size} tokens does not fit {dtype.name}; "
            "leave --dtype unset to choose the smallest type that fits, or pass int32"
        )
    return dtype.type


def _chain(sources: list[str], counter: SkipCounter) -> Iterator[str]:
    for source in sources:
        yield from iter_documents(source, counter)


def _limited(documents: Iterable[str], limit: int | None) -> Iterator[str]:
    for index, document in enumerate(documents):
        if limit is not None and index >= limit:
            return
        yield document


BATCH_DOCUMENTS = 64  # documents per encode call: SentencePiece's batched C++ loop, few IPC round trips


class _encoder:
    """Context manager giving `encode(documents) -> iterator of (text, ids)`, in order, over `workers` processes.

    Workers are forked (they inherit the loaded libraries instead of importing them again) and encode
    batches of documents with SentencePiece directly, or with the tokenizer object for other kinds.
    """

    def __init__(self, tokenizer_path: str, workers: int):
        self.tokenizer_path, self.workers, self.pool = tokenizer_path, workers, None

    def __enter__(self):
        if self.workers <= 1:
            _init_worker(self.tokenizer_path)
            mapper = map
        else:
            context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
            self.pool = context.Pool(self.workers, initializer=_init_worker, initargs=(self.tokenizer_path,))
            mapper = self.pool.imap

        def encode(documents):
            for texts, ids in mapper(_encode_batch, _batches(documents)):
                yield from zip(texts, ids)

        return encode

    def __exit__(self, *exc):
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


def _batches(documents: Iterable[str]) -> Iterator[list[str]]:
    batch = []
    for document in documents:
        batch.append(document)
        if len(batch) == BATCH_DOCUMENTS:
            yield batch
            batch = []
    if batch:
        yield batch


_WORKER_ENCODE = None


def _init_worker(tokenizer_path: str) -> None:
    global _WORKER_ENCODE
    if os.path.isfile(tokenizer_path):
        import sentencepiece

        processor = sentencepiece.SentencePieceProcessor(model_file=tokenizer_path)
        _WORKER_ENCODE = lambda texts: processor.encode(texts, num_threads=1)  # noqa: E731
    else:
        tokenizer = build_tokenizer(tokenizer_path)
        _WORKER_ENCODE = lambda texts: [list(tokenizer.tokenize(text)) for text in texts]  # noqa: E731


def _encode_batch(texts: list[str]) -> tuple[list[str], list[list[int]]]:
    return texts, _WORKER_ENCODE(texts)


class _ShardWriter:
    """Writes documents into one indexed dataset, or a new shard every `shard_tokens` tokens."""

    def __init__(self, prefix: str, dtype, shard_tokens: int | None):
        self.prefix, self.dtype, self.shard_tokens = prefix, dtype, shard_tokens
        self.finished: list[str] = []
        self.builder = None
        self.shard_tokens_written = 0

    def _shard_prefix(self) -> str:
        return self.prefix if self.shard_tokens is None else f"{self.prefix}-{len(self.finished):05d}"

    def add(self, ids: list[int]) -> None:
        if self.builder is None:
            self.builder = IndexedDatasetBuilder(get_bin_path(self._shard_prefix() + ".partial"), dtype=self.dtype)
        self.builder.add_document(ids, [len(ids)])
        self.shard_tokens_written += len(ids)
        if self.shard_tokens is not None and self.shard_tokens_written >= self.shard_tokens:
            self._close_shard()

    def _close_shard(self) -> None:
        final = self._shard_prefix()
        partial = final + ".partial"
        self.builder.finalize(get_idx_path(partial))
        os.replace(get_bin_path(partial), get_bin_path(final))
        os.replace(get_idx_path(partial), get_idx_path(final))
        self.finished.append(final)
        self.builder, self.shard_tokens_written = None, 0

    def finish(self) -> list[str]:
        if self.builder is not None:
            self._close_shard()
        return self.finished

    def abort(self) -> None:
        """Remove the shard being written; finished shards of an interrupted run stay (they are complete)."""
        if self.builder is not None:
            self.builder.data_file.close()
            partial = self._shard_prefix() + ".partial"
            for path in (get_bin_path(partial), get_idx_path(partial)):
                if os.path.exists(path):
                    os.remove(path)
