"""Train/valid/test GPTDatasets from indexed datasets, through megatron-core's BlendedMegatronDatasetBuilder.

Before building anything, the inputs are checked: the files exist, the tokenizer matches the one the
data was written with, and there are enough tokens for one sequence.
"""

from __future__ import annotations

import json
import os

import numpy
import torch.distributed as dist
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset, get_bin_path, get_idx_path

from megatron_simreg.data.prepare import stats_path

TOKENS_CHECKED = 10_000_000  # tokens scanned for ids beyond the vocabulary (beginning of each file)


def build_gpt_datasets(data_prefix, tokenizer, seq_length: int, num_samples: tuple[int, int, int],
                       split: str = "98,1,1", seed: int = 1234, cache_dir: str | None = None):
    """(train, valid, test) GPTDatasets; a split with 0 samples requested or 0 share comes back None."""
    prefixes = [data_prefix] if isinstance(data_prefix, str) else list(data_prefix)
    total_tokens = sum(check_indexed_dataset(prefix, tokenizer) for prefix in prefixes)
    if total_tokens < seq_length + 1:
        raise ValueError(
            f"the data holds {total_tokens} tokens, fewer than one sequence of {seq_length} + 1: "
            "prepare more text or lower model.seq_length"
        )
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=(prefixes, None),
        split=split,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,  # causal attention needs no explicit mask
        path_to_cache=cache_dir,
    )
    builder = BlendedMegatronDatasetBuilder(GPTDataset, list(num_samples), _built_on_this_rank, config)
    return tuple(builder.build())


def _built_on_this_rank() -> bool:
    return True


def check_indexed_dataset(prefix: str, tokenizer) -> int:
    """Check one PREFIX.bin/.idx against the tokenizer; return its number of tokens."""
    missing = [p for p in (get_bin_path(prefix), get_idx_path(prefix)) if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(
            f"data {', '.join(missing)} not found: create it with "
            f"`python tools/prepare_data.py --input YOUR_TEXT --output-prefix {prefix}`"
        )
    stats_file = stats_path(prefix)
    if os.path.isfile(stats_file):
        with open(stats_file, encoding="utf-8") as f:
            written_with = json.load(f)
        if written_with.get("vocab_size") not in (None, tokenizer.vocab_size):
            raise ValueError(
                f"{prefix} was tokenized with a {written_with['vocab_size']}-token vocabulary "
                f"({written_with.get('tokenizer')}) but the tokenizer now has {tokenizer.vocab_size}: "
                "use the same tokenizer (data.tokenizer) or prepare the data again"
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
