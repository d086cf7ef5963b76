"""Micro-batches for this rank: a deterministic, resumable order over a GPTDataset.

Global batch k holds samples [k * global_batch, (k + 1) * global_batch); inside it, micro-batch m of
data-parallel rank r holds the `micro_batch_size` samples starting at (m * dp + r) * micro_batch_size.
Resuming from `consumed_samples` therefore continues exactly where a run stopped. Under context
parallelism each rank keeps its zigzag share of the sequence (megatron's get_batch_on_this_cp_rank).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from megatron.core import parallel_state
from megatron.core.utils import get_batch_on_this_cp_rank

KEYS = ("tokens", "labels", "loss_mask", "position_ids")


def micro_batches(dataset, consumed_samples: int, micro_batch_size: int, num_micro_batches: int) -> Iterator[dict]:
    """Endless micro-batches for this data-parallel rank, starting at `consumed_samples`."""
    dp = parallel_state.get_data_parallel_world_size()
    rank = parallel_state.get_data_parallel_rank()
    global_batch = micro_batch_size * dp * num_micro_batches
    start = consumed_samples
    while True:
        for m in range(num_micro_batches):
            first = start + (m * dp + rank) * micro_batch_size
            samples = [dataset[(first + i) % len(dataset)] for i in range(micro_batch_size)]
            yield {key: torch.stack([torch.as_tensor(s[key]) for s in samples]) for key in KEYS}
        start += global_batch


def on_this_rank(batch: dict) -> dict:
    """The batch as this rank's model sees it (its context-parallel share of each sequence)."""
    if parallel_state.get_context_parallel_world_size() == 1:
        return batch
    return get_batch_on_this_cp_rank({**batch, "cu_seqlens": None}, is_hybrid_cp=False,
                                     cp_group=parallel_state.get_context_parallel_group())
