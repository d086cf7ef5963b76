"""Which tokens pair with which, for the pairwise regularizers: SimReg's segments, as batches.

A sequence is cut as SimReg cuts it (`megatron_simreg.simreg`): whole, into chunks of consecutive tokens, or
into each rank's slice under sequence/context parallelism. Segments of all samples form one batch
`[B, n, ...]` of rows (this rank's tokens); their keys are the same segments, or, for full pairing under
SP/CP, the gathered sequence (all-gather forward, its gradient summed back to the owning rank). Each token
carries its index in its segment (or in the gathered sequence), so "not itself" can be told from
"same label", and each key whether it is its label's first valid occurrence among the keys, so a label can
be counted once.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.distributed as dist

from megatron_simreg.simreg.exchange import _all_gather_sequence
from megatron_simreg.simreg.plan import _batched, _segments, _unbatched, _zigzag_pieces


@dataclass
class Pairs:
    """Rows `[B, n]` and keys `[B, m]` of the pairwise work; `rows`/`keys` batch per-token tensors `[b, s, ...]`."""

    b: int
    s: int
    segment: int
    group: dist.ProcessGroup | None  # ranks holding other slices of these sequences: values sum over it
    gather: dist.ProcessGroup | None  # full pairing under SP/CP: keys are the gathered sequence
    row_labels: torch.Tensor
    row_valid: torch.Tensor
    row_index: torch.Tensor
    key_labels: torch.Tensor
    key_valid: torch.Tensor
    key_index: torch.Tensor

    @cached_property
    def key_first(self) -> torch.Tensor:
        """Whether each key is its label's first valid occurrence among the keys (CPretrain counts a label once);
        computed on first use, as only CPretrain reads it."""
        return first_occurrence(self.key_labels, self.key_valid)

    def rows(self, per_token: torch.Tensor) -> torch.Tensor:
        return _batched(per_token, self.segment)

    def keys(self, per_token: torch.Tensor) -> torch.Tensor:
        """The keys' copy of a per-token tensor: gathered over the sequence group for full pairing
        (differentiable: each rank's gradient reaches the rank that holds the token)."""
        if self.gather is None:
            return self.rows(per_token)
        return _GatherSequence.apply(per_token, self.gather)

    def unbatch(self, per_row: torch.Tensor) -> torch.Tensor:
        return _unbatched(per_row, self.b, self.s)


def pairs_for(labels: torch.Tensor, valid: torch.Tensor, chunk_size, group: dist.ProcessGroup | None,
              layout: str = "contiguous") -> Pairs:
    """Pairs of this rank's tokens (`labels`, `valid` `[b, s]`), cut as SimReg cuts them for `chunk_size`
    (None: full, int: chunks, "local": each rank's slice)."""
    b, s = labels.shape
    distributed = group is not None and dist.get_world_size(group) > 1
    pieces = [(0, s)] if layout == "contiguous" or not distributed else _zigzag_pieces(s)
    gather = group if (chunk_size is None and distributed) else None
    segments = _segments(pieces, chunk_size, split_across_ranks=distributed)
    segment = s if gather is not None else segments[0][1] - segments[0][0]
    labels = labels.to(device=valid.device, dtype=torch.long)
    rows = dict(row_labels=_batched(labels, segment), row_valid=_batched(valid, segment))
    if gather is None:
        index = torch.arange(segment, device=valid.device).expand_as(rows["row_labels"])
        keys = dict(key_labels=rows["row_labels"], key_valid=rows["row_valid"], key_index=index)
    else:
        rank = dist.get_rank(gather)
        index = rank * s + torch.arange(s, device=valid.device).expand(b, s)
        gathered = _all_gather_sequence(labels, gather)
        keys = dict(key_labels=gathered, key_valid=_all_gather_sequence(valid, gather),
                    key_index=torch.arange(gathered.shape[1], device=valid.device).expand_as(gathered))
    return Pairs(b, s, segment, group if distributed else None, gather, row_index=index, **rows, **keys)


def first_occurrence(labels: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """`[B, m]` bool: the valid entries whose label no earlier valid entry of the row has."""
    ordered, order = torch.sort(torch.where(valid, labels, -1), dim=-1, stable=True)
    first = torch.ones_like(valid)
    first[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    return torch.zeros_like(valid).scatter(-1, order, first) & valid


class _GatherSequence(torch.autograd.Function):
    """`[b, s_local, ...]` -> `[b, world * s_local, ...]` in rank order; backward sums each rank's gradient of
    the gathered tensor and hands every rank the part for its own tokens."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, group: dist.ProcessGroup):
        ctx.group = group
        return _all_gather_sequence(local, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        world, rank = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        sequence_major = grad.transpose(0, 1).contiguous()
        local = sequence_major.shape[0] // world
        if dist.get_backend(ctx.group) == "gloo":  # gloo has no reduce-scatter
            dist.all_reduce(sequence_major, group=ctx.group)
            mine = sequence_major[rank * local:(rank + 1) * local]
        else:
            mine = sequence_major.new_empty((local, *sequence_major.shape[1:]))
            dist.reduce_scatter_tensor(mine, sequence_major, group=ctx.group)
        return mine.transpose(0, 1), None
