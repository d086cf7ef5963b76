"""Held-out evaluation sets: a seeded uniform sample of whole documents from anywhere in a dataset.

Megatron's `data.split` cuts a dataset into contiguous document ranges, so its validation split is the tail
of the file (one or two books of a corpus written book by book). `hold_out` instead draws documents in a
seeded random order into a validation set until it holds `tokens` tokens, then into a disjoint test set
likewise, and writes them and the remaining (training) documents as three indexed datasets:
PREFIX_train, PREFIX_valid and PREFIX_test, each in the source's file order. Training reads them through
`data.prefix`, `data.valid_prefix` and `data.test_prefix` (megatron-core's per-split blends). Each
`.stats.json` records the seed and which source documents it holds, so the sample can be checked and
drawn again.
"""

from __future__ import annotations

import json
import os

import numpy
from megatron.core.datasets.indexed_dataset import IndexedDataset, get_idx_path

from megatron_simreg.data.indexed import IndexedShardWriter, existing_outputs, remove_partial_leftovers, stats_path

SPLITS = ("train", "valid", "test")


def held_out_prefixes(output_prefix: str) -> dict[str, str]:
    return {split: f"{output_prefix}_{split}" for split in SPLITS}


def draw_held_out(lengths: numpy.ndarray, tokens: int, seed: int) -> dict[str, numpy.ndarray]:
    """Source document numbers of each split, sorted: valid and test take documents in a seeded random order
    until each holds at least `tokens` tokens; train keeps the rest."""
    order = numpy.random.default_rng(seed).permutation(len(lengths))
    reached = numpy.cumsum(lengths[order])
    valid_end = int(numpy.searchsorted(reached, tokens)) + 1  # the first document that reaches `tokens`, included
    test_end = int(numpy.searchsorted(reached, reached[valid_end - 1] + tokens)) + 1 if valid_end < len(order) else 0
    if test_end == 0 or test_end >= len(order):
        raise ValueError(f"the dataset holds {int(lengths.sum()):,} tokens in {len(lengths)} documents, too few to "
                         f"hold out {tokens:,} tokens twice (validation and test) and train on the rest: hold out "
                         "fewer tokens or prepare more text")
    return {"valid": numpy.sort(order[:valid_end]), "test": numpy.sort(order[valid_end:test_end]),
            "train": numpy.sort(order[test_end:])}


def hold_out(source_prefix: str, output_prefix: str, tokens: int, seed: int = 1234,
             overwrite: bool = False) -> dict[str, str]:
    """Write OUTPUT_train, OUTPUT_valid and OUTPUT_test from the (unsharded) dataset at `source_prefix`;
    return their prefixes by split."""
    if tokens < 1:
        raise ValueError(f"held-out tokens {tokens}: give a positive number of tokens per held-out set")
    prefixes = held_out_prefixes(output_prefix)
    previous = {split: existing_outputs(prefix) for split, prefix in prefixes.items()}
    if any(previous.values()) and not overwrite:
        raise FileExistsError(f"{output_prefix}_train/_valid/_test already exist: pass --overwrite to replace them, "
                              "or choose another --output-prefix")
    if not os.path.isfile(get_idx_path(source_prefix)) or not os.path.isfile(stats_path(source_prefix)):
        raise FileNotFoundError(f"no dataset at {source_prefix} (.bin/.idx/.stats.json; held-out sets are drawn from "
                                "one unsharded dataset written by tools/prepare_data.py): check the prefix")
    source = IndexedDataset(source_prefix, mmap=True)
    bounds = source.document_indices  # document d holds sequences bounds[d]:bounds[d + 1]
    lengths = numpy.add.reduceat(source.sequence_lengths.astype(numpy.int64), bounds[:-1])
    documents = draw_held_out(lengths, tokens, seed)
    with open(stats_path(source_prefix), encoding="utf-8") as f:
        source_stats = json.load(f)
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    for split, prefix in prefixes.items():
        remove_partial_leftovers(prefix)
        writer = IndexedShardWriter(prefix, source.index.dtype)
        try:
            for document in documents[split]:
                sequences = range(bounds[document], bounds[document + 1])
                writer.add(numpy.concatenate([source[s] for s in sequences]),
                           [int(source.sequence_lengths[s]) for s in sequences])
            stats = {key: source_stats[key] for key in ("tokenizer", "vocab_size", "eod", "dtype")}
            stats.update(documents=len(documents[split]), tokens=int(lengths[documents[split]].sum()),
                         shards=[os.path.basename(prefix)], held_out_from=source_prefix, seed=seed,
                         held_out_tokens=tokens, split=split)
            if split != "train":  # the sample itself, to check or draw again (the training set is the rest)
                stats["source_documents"] = documents[split].tolist()
            with open(stats_path(prefix) + ".partial", "w", encoding="utf-8") as f:
                json.dump(stats, f, indent=1)
            writer.commit(replaced=previous[split])
            os.replace(stats_path(prefix) + ".partial", stats_path(prefix))
        except BaseException:
            writer.discard()
            raise
    return prefixes
