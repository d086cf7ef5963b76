"""The plan of a SimReg call: which tokens pair with which.

A sequence is cut into segments whose tokens pair only among themselves (the whole sequence, chunks of it, or
each rank's contiguous pieces under sequence or context parallelism), and every kernel works on all segments of
all samples at once as a batch `[b * segments, segment, ...]`. This module owns that batching, the layouts'
pieces, the blocks tiles are cut into, and the labels as the kernels compare them. It imports nothing of SimReg.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist

ChunkSize = int | Literal["local"] | None
SequenceLayout = Literal["contiguous", "zigzag"]


@dataclass
class _Plan:
    """Fixed, non-differentiable inputs of the pairwise kernel.

    The local sequence is cut into consecutive segments of `segment` tokens whose tokens pair only among
    themselves (chunks; the last is padded with invalid tokens), and the kernel works on all segments of
    all samples at once, as a batch `[b * segments, segment, ...]`. With `gather` the local tokens pair
    with the whole gathered sequence instead (one segment per sample).
    """

    labels: torch.Tensor  # [batch, segment] int64
    valid: torch.Tensor  # [batch, segment] bool
    segment: int
    gather: dist.ProcessGroup | None
    inv_temperature: float
    block_size: int
    dtype: torch.dtype  # float32, or float64 for float64 embeddings (gradcheck)
    deterministic: bool  # the same gradient bits on every run: the Triton backward without atomics


def _zigzag_pieces(s: int) -> list[tuple[int, int]]:
    if s % 2:
        raise ValueError(f"the zigzag (context-parallel) layout holds two equal halves per rank, got {s} local tokens")
    return [(0, s // 2), (s // 2, s)]


def _segments(pieces: list[tuple[int, int]], chunk_size: ChunkSize, split_across_ranks: bool) -> list[tuple[int, int]]:
    """Split the local contiguous pieces into the ranges whose tokens pair among themselves: consecutive,
    all of one length but the last (which `_batched` pads)."""
    if chunk_size is None or chunk_size == "local":
        return pieces
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"simreg chunk_size must be a positive int, 'local' or None (full), got {chunk_size!r}")
    segments = []
    for start, end in pieces:
        if split_across_ranks and (end - start) % chunk_size:
            raise ValueError(
                f"simreg chunk_size {chunk_size} does not divide this rank's contiguous piece of {end - start} tokens, "
                "so chunks would straddle ranks; choose a divisor or chunk_size='local'"
            )
        segments += [(c, min(c + chunk_size, end)) for c in range(start, end, chunk_size)]
    return segments


def _batched(per_token: torch.Tensor, segment: int) -> torch.Tensor:
    """`[b, s, ...]` as `[b * ceil(s / segment), segment, ...]`, the tail padded with zeros (False)."""
    b, s = per_token.shape[:2]
    padding = -s % segment
    if padding:
        per_token = torch.cat([per_token, per_token.new_zeros((b, padding, *per_token.shape[2:]))], dim=1)
    return per_token.reshape(-1, segment, *per_token.shape[2:])


def _unbatched(batched: torch.Tensor, b: int, s: int) -> torch.Tensor:
    return batched.reshape(b, -1, *batched.shape[2:])[:, :s]


def _blocks(length: int, size: int):
    """Consecutive ranges of at most `size` tokens: tiles are `[size, size]`, whatever the length is."""
    return [slice(start, min(start + size, length)) for start in range(0, length, size)]


def _padded_length(segment: int, block: int) -> int:
    """Segments longer than a block are padded (with invalid tokens) to whole blocks: every tile is `block` wide."""
    return segment if segment <= block else -(-segment // block) * block


def _padding(length: int):
    """Pads `[batch, segment, ...]` per-token values to `length` tokens with `value`."""

    def padded(per_token: torch.Tensor, value) -> torch.Tensor:
        missing = length - per_token.shape[1]
        if not missing:
            return per_token
        tail = per_token.new_full((per_token.shape[0], missing, *per_token.shape[2:]), value)
        return torch.cat([per_token, tail], dim=1)

    return padded


def _segment_parts(per_token: torch.Tensor, segment: int) -> list[tuple[torch.Tensor, slice]]:
    """`[b, s, ...]` as views `[b, segments, tokens, ...]` over whole segments, then the shorter last one, with the
    segments they are: how a segmented copy lines up with the unsegmented tensor without reshaping (copying) it."""
    b, s = per_token.shape[:2]
    whole = s // segment
    parts = [(per_token[:, : whole * segment].unflatten(1, (whole, segment)), slice(0, whole))] if whole else []
    if s % segment:
        parts.append((per_token[:, whole * segment :, None].transpose(1, 2), slice(whole, whole + 1)))
    return parts


def _kernel_labels(labels: torch.Tensor) -> torch.Tensor:
    """Labels `[batch, tokens]` as every kernel compares them: each one's rank in its row (where its first
    occurrence sorts), equal exactly where the labels are, in [0, tokens) whatever int64 values they hold. Tokens
    pair only within a row, so ranks per row suffice. A sort and a binary search on the labels' device, for every
    call: deciding whether ranks are needed would read the labels back to the host, making each call wait for the
    GPU's queue. The PyTorch tiles compare the ranks as float32 numbers, exact below 2**24 tokens."""
    labels = labels.contiguous()  # as searchsorted wants (gathered labels are not)
    return torch.searchsorted(torch.sort(labels, dim=-1).values, labels)
