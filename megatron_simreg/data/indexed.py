"""Write Megatron indexed datasets (PREFIX.bin + PREFIX.idx) with megatron-core's IndexedDatasetBuilder.

Every file is written under a `.partial` name and renamed only once the whole run has succeeded, the
statistics file last: an interrupted run leaves no dataset that looks finished (and `discard` removes
the partial files of a run that failed or was stopped).
"""

from __future__ import annotations

import glob
import os

import numpy
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder, get_bin_path, get_idx_path

PARTIAL = ".partial"


def stats_path(prefix: str) -> str:
    return prefix + ".stats.json"


def token_dtype(vocab_size: int, requested: str | None = None) -> type:
    """The smallest integer type that holds every token id (uint16 for 32k vocabularies), or `requested`."""
    dtype = numpy.dtype(requested) if requested else numpy.dtype(DType.optimal_dtype(vocab_size))
    if dtype.kind not in "iu" or numpy.iinfo(dtype).max < vocab_size - 1:
        raise ValueError(
            f"a vocabulary of {vocab_size} tokens does not fit {dtype.name}; "
            "leave --dtype unset to choose the smallest type that fits, or pass int32"
        )
    return dtype.type


def existing_outputs(prefix: str) -> list[str]:
    """Files a previous run wrote for `prefix`: the dataset or its shards, and the statistics."""
    shard_pattern = glob.escape(prefix) + "-" + "[0-9]" * 5
    shards = [path for suffix in (".bin", ".idx") for path in glob.glob(shard_pattern + suffix)]
    candidates = [get_bin_path(prefix), get_idx_path(prefix), stats_path(prefix), *shards]
    return sorted(p for p in candidates if os.path.isfile(p))


def remove_partial_leftovers(prefix: str) -> None:
    """Remove what a killed run (kill -9, a node failure) left under the `.partial` names of `prefix`'s files."""
    base, shard = glob.escape(prefix), "-" + "[0-9]" * 5
    for pattern in (base + PARTIAL + ".*", base + shard + PARTIAL + ".*", glob.escape(stats_path(prefix) + PARTIAL)):
        for path in glob.glob(pattern):
            os.remove(path)


class IndexedShardWriter:
    """Documents into PREFIX.bin/.idx, or into PREFIX-00000, PREFIX-00001, ... every `shard_tokens` tokens."""

    def __init__(self, prefix: str, dtype: type, shard_tokens: int | None = None):
        if shard_tokens is not None and shard_tokens < 1:
            raise ValueError(f"shard_tokens={shard_tokens}: give a positive number of tokens per shard")
        self.prefix, self.dtype, self.shard_tokens = prefix, dtype, shard_tokens
        self.shards: list[str] = []  # final prefixes; their files exist under the .partial name until commit
        self.builder = None
        self.tokens_in_shard = 0

    def add(self, tokens: numpy.ndarray, lengths: list[int] | None = None) -> None:
        """One document (its tokens, EOD included), one sequence unless `lengths` splits it into several."""
        if self.builder is None:
            self.shards.append(self.prefix if self.shard_tokens is None else f"{self.prefix}-{len(self.shards):05d}")
            self.builder = IndexedDatasetBuilder(get_bin_path(self.shards[-1] + PARTIAL), dtype=self.dtype)
        self.builder.add_document(tokens, lengths or [tokens.size])
        self.tokens_in_shard += tokens.size
        if self.shard_tokens is not None and self.tokens_in_shard >= self.shard_tokens:
            self._finalize_shard()

    def _finalize_shard(self) -> None:
        self.builder.finalize(get_idx_path(self.shards[-1] + PARTIAL))
        self.builder, self.tokens_in_shard = None, 0

    def commit(self, replaced: list[str] = ()) -> list[str]:
        """Finish the last shard, remove the `replaced` files of an earlier run, publish; return the prefixes."""
        if self.builder is not None:
            self._finalize_shard()
        for path in replaced:
            os.remove(path)
        for get_path in (get_bin_path, get_idx_path):  # every .bin before any .idx: an .idx means its .bin is whole
            for shard in self.shards:
                os.replace(get_path(shard + PARTIAL), get_path(shard))
        return self.shards

    def discard(self) -> None:
        """Remove every file this writer created (a failed or interrupted run)."""
        if self.builder is not None:
            self.builder.data_file.close()
            self.builder = None
        for shard in self.shards:
            for path in (get_bin_path(shard + PARTIAL), get_idx_path(shard + PARTIAL)):
                if os.path.exists(path):
                    os.remove(path)
