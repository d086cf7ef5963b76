"""Train/valid/test GPTDatasets from indexed datasets, through megatron-core's BlendedMegatronDatasetBuilder.

Before anything is built the inputs are checked on every rank alike (so no rank waits at a barrier for
one that failed): the files exist, the data was written with this tokenizer, there are enough tokens for
a sequence. A prefix written in shards (`--shard-tokens`) stands for all of its shards.
"""

from __future__ import annotations

import json
import os
import struct

import numpy
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import _INDEX_HEADER, DType, IndexedDataset, get_bin_path, get_idx_path
from megatron.core.datasets.utils import get_blend_from_list, normalize

from megatron_simreg.data.indexed import stats_path
from megatron_simreg.data.tokenizer import build_tokenizer

TOKENS_CHECKED = 10_000_000  # tokens scanned for ids beyond the vocabulary, from the start of each file


def build_gpt_datasets(data_prefix, tokenizer, seq_length: int, num_samples: tuple[int, int, int],
                       split: str = "98,1,1", seed: int = 1234, cache_dir: str | None = None,
                       valid_prefix: str | None = None, test_prefix: str | None = None):
    """(train, valid, test) GPTDatasets; a split with a 0 share comes back None.

    `data_prefix`: one prefix, a list of prefixes (blended by size), or Megatron's weighted list
    ["30", "path/a", "70", "path/b"]. `num_samples`: samples wanted per split (a split smaller than that
    repeats in shuffled epochs). With `valid_prefix` or `test_prefix` (held-out sets, held_out.py) those are
    the evaluation sets and `data_prefix` is all training data (megatron-core's `blend_per_split`); each must
    hold its `num_samples` (one evaluation's), so no sequence is scored twice. The sample-order
    indices are cached in `cache_dir` (default: beside the data), built by rank 0 and read by the others, so
    on several nodes it must be a shared folder.
    """
    check_dataset_helpers()
    prefixes, weights = dataset_prefixes(data_prefix)
    total_tokens = sum(check_indexed_dataset(prefix, tokenizer) for prefix in prefixes)
    if total_tokens < seq_length + 1:
        raise ValueError(
            f"the data holds {total_tokens} tokens, fewer than one sequence of {seq_length} + 1: "
            "prepare more text or lower model.seq_length"
        )
    if valid_prefix is None and test_prefix is None:
        data = {"blend": (prefixes, weights), "split": split}
    else:
        for name, prefix, wanted in zip(("valid", "test"), (valid_prefix, test_prefix), num_samples[1:]):
            if prefix is not None:
                _check_held_out_size(name, prefix, check_indexed_dataset(prefix, tokenizer), seq_length, wanted)
        held_out = [None if prefix is None else ([prefix], None) for prefix in (valid_prefix, test_prefix)]
        data = {"blend_per_split": [(prefixes, weights), *held_out], "split": None}
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        **data,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,  # causal attention needs no explicit mask
        path_to_cache=cache_dir,
    )
    if config.split is not None:  # one corpus cut by shares, no held-out sets
        for prefix in prefixes:
            _check_split_sizes(prefix, config.split_matrix, seq_length, num_samples, split)
    builder = BlendedMegatronDatasetBuilder(GPTDataset, list(num_samples), _built_on_every_rank, config)
    return tuple(builder.build())


def build_run_datasets(cfg, plan):
    """A run's (train, valid, test) datasets, the same in both loops: the run's training samples, and for each
    evaluation set the fixed sample every evaluation scores (plan.evaluation_samples; Megatron would ask for one
    per evaluation and walk on through them)."""
    d = cfg.data
    return build_gpt_datasets(
        d.prefix, build_tokenizer(plan.tokenizer_path), cfg.model.seq_length,
        (plan.train_samples, plan.evaluation_samples, plan.evaluation_samples), split=d.split,
        seed=cfg.training.seed, cache_dir=d.cache_dir, valid_prefix=d.valid_prefix, test_prefix=d.test_prefix,
    )


def _check_split_sizes(prefix: str, split_matrix, seq_length: int, num_samples, split: str) -> None:
    """Each split in use needs a sequence's worth of tokens (megatron-core loops forever on an empty one)."""
    dataset = IndexedDataset(prefix, mmap=True)
    lengths, documents = dataset.sequence_lengths, GPTDataset.numel_low_level_dataset(dataset)
    for name, bounds, wanted in zip(("train", "valid", "test"), split_matrix, num_samples):
        if bounds is None:
            continue
        begin, end = (int(round(bound * documents)) for bound in bounds)  # megatron-core's document split
        tokens = int(lengths[begin:end].sum())
        needed = seq_length + 1 if wanted else 1
        if tokens < needed:
            raise ValueError(
                f"the {name} split (split={split!r}) of {prefix} gets {end - begin} of its {documents} documents, "
                f"{tokens} tokens, fewer than {needed} (one sequence of {seq_length} + 1): give it a larger share in "
                f"data.split (or 0 if unused), lower model.seq_length, or prepare more documents"
            )


def _check_held_out_size(name: str, prefix: str, tokens: int, seq_length: int, wanted: int) -> None:
    """A held-out set holds the sequences one evaluation scores (megatron-core would repeat them otherwise)."""
    sequences = (tokens - 1) // seq_length  # GPTDataset's samples in one epoch
    if sequences < max(wanted, 1):
        raise ValueError(
            f"the held-out {name} set {prefix} holds {tokens:,} tokens, {sequences} sequences of {seq_length}, fewer "
            f"than the {wanted} one evaluation scores (training.eval_iters x training.global_batch_size): hold out "
            f"more tokens (tools/prepare_data.py --held-out-tokens {wanted * seq_length + 1}) or lower eval_iters"
        )


def _built_on_every_rank() -> bool:
    """Every rank reads its own batches (no broadcast from a data rank)."""
    return True


def dataset_prefixes(data_prefix) -> tuple[list[str], list[float] | None]:
    """(prefixes, weights summing to 1 or None), sharded outputs replaced by their shards (a weight split by size)."""
    blend = [data_prefix] if isinstance(data_prefix, str) else [str(item) for item in data_prefix]
    prefixes, weights = get_blend_from_list(blend)
    expanded, expanded_weights = [], []
    for index, prefix in enumerate(prefixes):
        shards = _shards_of(prefix)
        expanded.extend(shards)
        if weights is not None:
            tokens = [_token_count(shard) for shard in shards]
            expanded_weights.extend(weights[index] * count / sum(tokens) for count in tokens)
    return expanded, (normalize(expanded_weights) if weights is not None else None)


def _shards_of(prefix: str) -> list[str]:
    if os.path.isfile(get_idx_path(prefix)) or not os.path.isfile(stats_path(prefix)):
        return [prefix]
    with open(stats_path(prefix), encoding="utf-8") as f:
        shards = json.load(f).get("shards") or [os.path.basename(prefix)]
    return [os.path.join(os.path.dirname(prefix), shard) for shard in shards]


def _token_count(prefix: str) -> int:
    _check_files(prefix)
    dataset = IndexedDataset(prefix, mmap=True)  # kept alive: its arrays view a memory map it closes on deletion
    return int(dataset.sequence_lengths.sum())


def _check_files(prefix: str) -> None:
    missing = [path for path in (get_bin_path(prefix), get_idx_path(prefix)) if not os.path.isfile(path)]
    if missing:
        raise FileNotFoundError(
            f"data {', '.join(missing)} not found: create it with "
            f"`python tools/prepare_data.py --input YOUR_TEXT --output-prefix {prefix}` "
            "(or set data.prefix to where it is)"
        )
    _check_not_truncated(prefix)


def _check_not_truncated(prefix: str) -> None:
    """The .idx holds what its header counts, and the .bin every token the index points to (a copy or a write
    cut short otherwise fails deep in numpy, without the file's name). Megatron's index layout: a 34-byte
    header (magic, version, dtype code, sequence and document counts), then int32 lengths, int64 pointers,
    int64 document indices."""
    idx, binary = get_idx_path(prefix), get_bin_path(prefix)
    fix = f"prepare the data again (tools/prepare_data.py --output-prefix {prefix} --overwrite)"
    with open(idx, "rb") as f:
        header = f.read(34)
        if len(header) < 34 or not header.startswith(_INDEX_HEADER):
            raise ValueError(f"data file {idx} is truncated or not a Megatron index ({len(header)}-byte header): {fix}")
        code, sequences, documents = header[17], *struct.unpack("<QQ", header[18:34])
        needed = 34 + sequences * (4 + 8) + documents * 8
        if os.path.getsize(idx) < needed:
            raise ValueError(f"data file {idx} is truncated: {os.path.getsize(idx):,} bytes, its header needs "
                             f"{needed:,}: {fix}")
        if not sequences:
            return
        f.seek(34 + 4 * (sequences - 1))
        (length,) = struct.unpack("<i", f.read(4))
        f.seek(34 + 4 * sequences + 8 * (sequences - 1))
        (pointer,) = struct.unpack("<q", f.read(8))
    needed = pointer + length * DType.size(DType.dtype_from_code(code))
    if os.path.getsize(binary) < needed:
        raise ValueError(f"data file {binary} is truncated: {os.path.getsize(binary):,} bytes, its index needs "
                         f"{needed:,}: {fix}")


def check_indexed_dataset(prefix: str, tokenizer) -> int:
    """Check one PREFIX.bin/.idx against the tokenizer; return its number of tokens."""
    _check_files(prefix)
    stats_file = stats_path(prefix)
    if os.path.isfile(stats_file):
        with open(stats_file, encoding="utf-8") as f:
            written_with = json.load(f)
        for key in ("vocab_size", "eod"):
            if written_with.get(key, getattr(tokenizer, key)) != getattr(tokenizer, key):
                raise ValueError(
                    f"{prefix} was tokenized with {key}={written_with[key]} ({written_with.get('tokenizer')}) but the "
                    f"tokenizer now has {key}={getattr(tokenizer, key)}: use the tokenizer the data was written "
                    "with (data.tokenizer) or prepare the data again with this one"
                )
    dataset = IndexedDataset(prefix, mmap=True)
    tokens = int(dataset.sequence_lengths.sum())
    head = numpy.asarray(dataset.bin_reader.read(dataset.index.dtype, min(tokens, TOKENS_CHECKED), 0))
    if head.size and int(head.max()) >= tokenizer.vocab_size:
        raise ValueError(
            f"{prefix} holds token id {int(head.max())}, beyond the tokenizer's {tokenizer.vocab_size}-token "
            "vocabulary: the data was written with another tokenizer; prepare it again with this one"
        )
    return tokens


def check_dataset_helpers() -> None:
    """GPTDataset needs megatron-core's compiled helpers; the x86-64 wheels ship them, other builds may not."""
    try:
        import megatron.core.datasets.helpers_cpp  # noqa: F401
    except ImportError as error:
        import megatron.core.datasets

        folder = os.path.dirname(megatron.core.datasets.__file__)
        raise ImportError(
            "megatron-core's C++ dataset helpers (megatron.core.datasets.helpers_cpp) are missing; compile them: "
            f"pip install pybind11 && cd {folder} && c++ -O3 -shared -std=c++17 -fPIC $(python -m pybind11 --includes) "
            "helpers.cpp -o helpers_cpp$(python -c \"import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))\")"
        ) from error
