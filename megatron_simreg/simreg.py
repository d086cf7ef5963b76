"""SimReg: embedding-similarity regularization (arXiv 2605.08809, Eq. 3).

For the final-layer embeddings h_i of one sequence and their next-token labels y_i,

    phi(i, j) = exp(cos(h_i, h_j) / tau)
    P_i = {valid j : y_j == y_i}  (i itself included)      N_i = {valid j : y_j != y_i}
    Lsr_i = log sum_{j in N_i} phi(i, j) - log sum_{j in P_i} phi(i, j)

Pairs are taken inside one sequence, or inside one chunk of it (chunk-wise SimReg). The regulariser is a sum
of per-sequence terms, so how a global batch is cut into micro-batches and data-parallel ranks never changes
it (Megatron's contract for the cross-entropy):

    S_seq = mean over the sequence's label groups (chunk, label) of the group's mean softplus(Lsr_i)
            (reduction "group", the default; frequent tokens do not dominate), or
          = mean over the sequence's anchors of softplus(Lsr_i)                    (reduction "token");
    batch value = sum_seq S_seq * T_seq / sum_seq T_seq,  T_seq = the sequence's valid tokens

i.e. the token-weighted mean over sequences (the plain mean for packed pretraining sequences). The training
objective adds lambda * sum_seq S_seq * T_seq to the cross-entropy's token sum, so both are normalised alike.

Plain PyTorch (+ torch.distributed): no Megatron import. The pairwise work runs in tiles, flash-style:
no `s x s` matrix is kept for backward (only two log-sum-exps per token are saved, the tiles are
recomputed), and extra memory is O(block * s) rather than O(s^2). The math is fp32 whatever the
input dtype. Under sequence or context parallelism each rank holds a slice of every sequence;
chunk-wise SimReg then needs no activation communication, full SimReg gathers the embeddings, and
in both cases loss and gradients equal the single-process result (see `simreg_loss`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F

NORM_EPS = 1e-12
"""Embeddings with a smaller norm are treated as `h / NORM_EPS` (as `F.normalize`): zero stays zero."""

ChunkSize = int | Literal["local"] | None
SequenceLayout = Literal["contiguous", "zigzag"]


@dataclass
class SimRegOutput:
    """The scalar lambda-free SimReg term and the statistics worth logging beside it.

    `loss == token_weighted_sum / tokens`. Under sequence or context parallelism both are global values
    (over the process group) while gradients flow only into this rank's share.
    """

    loss: torch.Tensor  # differentiable scalar: the batch value, sum_seq S_seq * T_seq / sum_seq T_seq
    token_weighted_sum: torch.Tensor  # differentiable: sum_seq S_seq * T_seq, what the objective adds
    tokens: torch.Tensor  # sum_seq T_seq: valid tokens (anchors) over the process group
    lsr_mean: torch.Tensor  # mean Lsr over anchors with a non-empty N_i
    live_fraction: torch.Tensor  # share of anchors whose gradient weight sigmoid(Lsr_i) >= live_threshold
    negative_angle: torch.Tensor  # mean angle (degrees) between different-label pairs

    def stats(self) -> dict[str, float]:
        """The logged statistics as plain floats."""
        return {
            "simreg": self.loss.item(),
            "simreg lsr": self.lsr_mean.item(),
            "simreg live anchors": self.live_fraction.item(),
            "simreg negative angle": self.negative_angle.item(),
        }


def simreg_terms(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor | None = None,
    temperature: float = 0.01,
    chunk_size: ChunkSize = None,
    *,
    sequence_first: bool = False,
    process_group: dist.ProcessGroup | None = None,
    sequence_layout: SequenceLayout = "contiguous",
    block_size: int = 512,
) -> torch.Tensor:
    """Lsr per token, `[b, s]` float32 (-inf where N_i is empty, 0 at masked positions).

    hidden: `[b, s, h]`, or `[s, b, h]` with `sequence_first=True` (Megatron's layout, used as is).
    labels, loss_mask: `[b, s]`; loss_mask 1 marks valid tokens (anchors and pair members).
    chunk_size: None for full SimReg; an int for chunk-wise SimReg over that many consecutive tokens;
        "local" for chunks equal to each rank's slice (with a process group) or the whole sequence.
    process_group, sequence_layout: see `simreg_loss`.
    """
    return _run(
        hidden, labels, loss_mask, temperature, chunk_size, sequence_first, process_group, sequence_layout, block_size
    ).lsr


def simreg_loss(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor | None = None,
    temperature: float = 0.01,
    chunk_size: ChunkSize = None,
    reduction: Literal["group", "token"] = "group",
    *,
    sequence_first: bool = False,
    process_group: dist.ProcessGroup | None = None,
    sequence_layout: SequenceLayout = "contiguous",
    block_size: int = 512,
    live_threshold: float = 1e-3,
) -> SimRegOutput:
    """The SimReg term (without lambda): per-sequence means of softplus(Lsr_i), token-weighted over sequences.

    reduction="group": each sequence's value is the mean over its label groups (chunk, label) of the mean
    over each group's anchors, so frequent tokens do not dominate; "token": the mean over its anchors. The
    batch value weights each sequence by its valid tokens (see the module docstring).

    With `process_group` every rank holds a slice of each sequence: the contiguous slice `rank` of
    `world` equal parts (`sequence_layout="contiguous"`, Megatron's sequence parallelism), or chunks
    `rank` and `2*world-1-rank` of `2*world` (`"zigzag"`, Megatron's context parallelism). Labels
    and mask are the rank's own slice too. Chunk-wise SimReg (`chunk_size` int or "local", where
    "local" means each contiguous local piece) exchanges only scalars; full SimReg (`chunk_size=None`)
    all-gathers the embeddings. Every rank returns the global value; the gradient reaching each
    rank's `hidden` is that of the global loss, as in the single-process computation.
    """
    if reduction not in ("group", "token"):
        raise ValueError(f"simreg reduction must be 'group' or 'token', got {reduction!r}")
    run = _run(
        hidden, labels, loss_mask, temperature, chunk_size, sequence_first, process_group, sequence_layout, block_size
    )
    valid = run.valid
    has_negatives = valid & torch.isfinite(run.lsr)
    softplus = torch.where(valid, F.softplus(run.lsr), 0.0)
    # A group of g anchors gives each 1/g, so its members sum to 1: the weights of a sequence sum to its groups.
    weights = valid.float() / run.positive_count.clamp_min(1) if reduction == "group" else valid.float()
    sequence_sums = (softplus * weights).sum(-1)  # [b], this rank's share of each sequence

    finite_lsr = torch.where(has_negatives, run.lsr.detach(), 0.0)
    live = has_negatives & (torch.sigmoid(finite_lsr) >= live_threshold)
    per_sequence = torch.stack([sequence_sums.detach(), weights.sum(-1), valid.sum(-1).float()]).double()
    totals = torch.stack(
        [finite_lsr.sum(), has_negatives.sum().float(), live.sum().float(), run.angle_sum, run.angle_count]
    ).double()
    if process_group is not None:  # a sequence's groups and tokens span the ranks: add up its scalars
        dist.all_reduce(per_sequence, group=process_group)
        dist.all_reduce(totals, group=process_group)
    global_sums, normalizers, sequence_tokens = per_sequence.to(sequence_sums.dtype)
    lsr_sum, with_negatives, live_count, angle_sum, angle_count = totals.to(sequence_sums.dtype)

    # S_seq * T_seq, summed: each rank differentiates its own share; the value is the global one.
    scale = sequence_tokens / normalizers.clamp_min(1.0)
    token_weighted_sum = (sequence_sums * scale).sum()
    token_weighted_sum = token_weighted_sum + ((global_sums * scale).sum() - token_weighted_sum).detach()
    tokens = sequence_tokens.sum()
    return SimRegOutput(
        loss=token_weighted_sum / tokens.clamp_min(1.0),
        token_weighted_sum=token_weighted_sum,
        tokens=tokens,
        lsr_mean=lsr_sum / with_negatives.clamp_min(1.0),
        live_fraction=live_count / tokens.clamp_min(1.0),
        negative_angle=angle_sum / angle_count.clamp_min(1.0),
    )


# ---------------------------------------------------------------------------------------------
# Planning: which tokens pair with which


@dataclass
class _Run:
    lsr: torch.Tensor  # [b, s] float32
    positive_count: torch.Tensor  # [b, s] float32, |P_i|
    valid: torch.Tensor  # [b, s] bool
    angle_sum: torch.Tensor  # scalar float64
    angle_count: torch.Tensor  # scalar float64


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


def _run(hidden, labels, loss_mask, temperature, chunk_size, sequence_first, process_group, layout, block_size):
    batch_major = hidden.transpose(0, 1) if sequence_first else hidden
    if batch_major.dim() != 3:
        raise ValueError(f"simreg expects hidden [b, s, h] (or [s, b, h] with sequence_first=True), got {tuple(hidden.shape)}")
    b, s, _ = batch_major.shape
    if tuple(labels.shape) != (b, s):
        raise ValueError(
            f"simreg labels have shape {tuple(labels.shape)} but hidden holds [b={b}, s={s}] tokens; "
            "pass labels (and loss_mask) as [b, s] for this rank's own slice of the sequence"
        )
    if loss_mask is None:
        valid = torch.ones(b, s, dtype=torch.bool, device=hidden.device)
    elif tuple(loss_mask.shape) != (b, s):
        raise ValueError(f"simreg loss_mask has shape {tuple(loss_mask.shape)}, expected [b={b}, s={s}] like labels")
    else:
        valid = loss_mask.to(device=hidden.device) > 0
    if temperature <= 0:
        raise ValueError(f"simreg temperature must be positive, got {temperature}")
    if block_size < 1:
        raise ValueError(f"simreg block_size must be positive, got {block_size}")
    if layout not in ("contiguous", "zigzag"):
        raise ValueError(f"simreg sequence_layout must be 'contiguous' or 'zigzag', got {layout!r}")

    pieces = [(0, s)] if layout == "contiguous" or process_group is None else _zigzag_pieces(s)
    distributed = process_group is not None and dist.get_world_size(process_group) > 1
    gather = process_group if (chunk_size is None and distributed) else None
    segments = _segments(pieces, chunk_size, split_across_ranks=distributed)
    segment = s if gather is not None else segments[0][1] - segments[0][0]
    plan = _Plan(
        labels=_batched(labels.to(device=hidden.device, dtype=torch.long), segment),
        valid=_batched(valid, segment),
        segment=segment,
        gather=gather,
        inv_temperature=1.0 / temperature,
        block_size=block_size,
        dtype=torch.promote_types(hidden.dtype, torch.float32),
    )
    lsr, positive_count, angles = _SimRegFunction.apply(batch_major, plan)
    return _Run(_unbatched(lsr, b, s), _unbatched(positive_count, b, s), valid, angles[0], angles[1])


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


# ---------------------------------------------------------------------------------------------
# The pairwise kernel


class _SimRegFunction(torch.autograd.Function):
    """Lsr per token from the embeddings; saves only per-token scalars and recomputes tiles.

    Works on the batched segments of `_Plan`, in tiles of at most `block x block` pairs: `[1, block, block]`
    for long segments, many short segments side by side (`[n, segment, segment]`).
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, plan: _Plan):
        anchors = _batched(hidden, plan.segment)
        inv_norm = _inverse_norms(anchors, plan.dtype)
        keys, key_inv_norm, key_labels, key_valid = _pairing_partners(anchors, inv_norm, plan)
        lse_pos = torch.full(anchors.shape[:2], -math.inf, dtype=plan.dtype, device=hidden.device)
        lse_neg = torch.full_like(lse_pos, -math.inf)
        positive_count = torch.zeros_like(lse_pos)
        angles = torch.zeros(2, dtype=torch.float64, device=hidden.device)
        for segs, at in _row_tiles(plan, keys.shape[1]):
            units = _units(anchors[segs, at], inv_norm[segs, at], plan.dtype)
            for key_at in _blocks(keys.shape[1], plan.block_size):
                # Keys are normalised tile by tile, never all at once.
                key_units = _units(keys[segs, key_at], key_inv_norm[segs, key_at], plan.dtype)
                z = torch.bmm(units, key_units.transpose(1, 2)).mul_(plan.inv_temperature)
                same = plan.labels[segs, at, None] == key_labels[segs, None, key_at]
                positive = same & key_valid[segs, None, key_at]
                negative = same.logical_not_() & key_valid[segs, None, key_at]
                lse_pos[segs, at] = torch.logaddexp(lse_pos[segs, at], _masked_logsumexp(z, positive))
                lse_neg[segs, at] = torch.logaddexp(lse_neg[segs, at], _masked_logsumexp(z, negative))
                positive_count[segs, at] += positive.sum(-1, dtype=plan.dtype)
                negative &= plan.valid[segs, at, None]  # the angle statistic counts valid anchors only
                radians = z.mul_(1.0 / plan.inv_temperature).clamp_(-1.0, 1.0).acos_()
                angles[0] += torch.where(negative, radians, 0.0).sum(dtype=torch.float64) * (180.0 / math.pi)
                angles[1] += negative.sum()
        lsr = torch.where(plan.valid, lse_neg - lse_pos, 0.0)
        ctx.plan = plan
        ctx.save_for_backward(hidden, lse_pos, lse_neg)
        ctx.mark_non_differentiable(positive_count, angles)
        return lsr, positive_count, angles

    @staticmethod
    def backward(ctx, grad_lsr, _grad_count, _grad_angles):
        hidden, lse_pos, lse_neg = ctx.saved_tensors
        plan: _Plan = ctx.plan
        anchors = _batched(hidden, plan.segment)
        inv_norm = _inverse_norms(anchors, plan.dtype)
        # Masked anchors and anchors without negatives (Lsr = -inf) contribute nothing.
        grad = torch.where(plan.valid & torch.isfinite(lse_neg), grad_lsr.to(plan.dtype), 0.0)
        # +inf where a set is empty, so exp(z - lse) is 0 rather than inf * 0.
        lse_pos, lse_neg = (torch.where(torch.isfinite(lse), lse, math.inf) for lse in (lse_pos, lse_neg))
        keys, key_inv_norm, key_labels, key_valid = _pairing_partners(anchors, inv_norm, plan)
        key_lse_pos, key_lse_neg, key_grad = _gather_scalars(plan, lse_pos, lse_neg, grad)
        grad_anchors = torch.empty(anchors.shape, dtype=plan.dtype, device=hidden.device)
        for segs, at in _row_tiles(plan, keys.shape[1]):
            units = _units(anchors[segs, at], inv_norm[segs, at], plan.dtype)
            grad_units = torch.zeros_like(units)
            for key_at in _blocks(keys.shape[1], plan.block_size):
                key_units = _units(keys[segs, key_at], key_inv_norm[segs, key_at], plan.dtype)
                z = torch.bmm(units, key_units.transpose(1, 2)).mul_(plan.inv_temperature)
                z.masked_fill_(~(plan.valid[segs, at, None] & key_valid[segs, None, key_at]), -math.inf)
                same = plan.labels[segs, at, None] == key_labels[segs, None, key_at]
                # z_ij is symmetric: token i receives d Lsr_i / d z_ij as the anchor of its row,
                # and d Lsr_j / d z_ji as a member of anchor j's pairs.
                grad_logits = _lsr_logit_grad(z, same, lse_pos[segs, at, None], lse_neg[segs, at, None], grad[segs, at, None])
                grad_logits += _lsr_logit_grad(z, same, key_lse_pos[segs, None, key_at], key_lse_neg[segs, None, key_at], key_grad[segs, None, key_at])
                grad_units.baddbmm_(grad_logits, key_units, alpha=plan.inv_temperature)
            grad_anchors[segs, at] = _normalize_backward(units, inv_norm[segs, at], grad_units)
        # In the input's own memory layout, so adding it to the other gradients of `hidden` (and what
        # reduces them downstream) runs in the same order as without SimReg: lambda = 0 changes no bit.
        grad_hidden = torch.empty_like(hidden)
        grad_hidden.copy_(_unbatched(grad_anchors, *hidden.shape[:2]))
        return grad_hidden, None


def _inverse_norms(hidden: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return 1.0 / torch.linalg.vector_norm(hidden, dim=-1, dtype=dtype).clamp_min(NORM_EPS)


def _units(rows: torch.Tensor, inv_norm: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return rows.to(dtype) * inv_norm[..., None]


def _normalize_backward(units: torch.Tensor, inv_norm: torch.Tensor, grad_units: torch.Tensor) -> torch.Tensor:
    """Gradient through u = h / max(|h|, eps): the radial part drops out unless |h| < eps."""
    radial = (units * grad_units).sum(-1, keepdim=True) * units
    clamped = (inv_norm >= 1.0 / NORM_EPS)[..., None]
    return torch.where(clamped, grad_units, grad_units - radial) * inv_norm[..., None]


def _pairing_partners(hidden, inv_norm, plan: _Plan):
    """The tokens the local anchors pair with: the local ones, or the gathered sequence."""
    if plan.gather is None:
        return hidden, inv_norm, plan.labels, plan.valid
    return (
        _all_gather_sequence(hidden, plan.gather),
        _all_gather_sequence(inv_norm, plan.gather),
        _all_gather_sequence(plan.labels, plan.gather),
        _all_gather_sequence(plan.valid, plan.gather),
    )


def _gather_scalars(plan: _Plan, *per_token: torch.Tensor) -> list[torch.Tensor]:
    if plan.gather is None:
        return list(per_token)
    gathered = _all_gather_sequence(torch.stack(per_token, dim=-1), plan.gather)
    return list(gathered.unbind(-1))


def _all_gather_sequence(local: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Concatenate every rank's `[b, s_local, ...]` slice along the sequence (rank order)."""
    world = dist.get_world_size(group)
    sequence_major = local.transpose(0, 1).contiguous()
    out = sequence_major.new_empty((world * sequence_major.shape[0], *sequence_major.shape[1:]))
    if out.dtype == torch.bool:  # gloo and nccl collectives do not take bool
        dist.all_gather_into_tensor(out.view(torch.uint8), sequence_major.view(torch.uint8), group=group)
    else:
        dist.all_gather_into_tensor(out, sequence_major, group=group)
    return out.transpose(0, 1)


def _row_tiles(plan: _Plan, key_length: int) -> list[tuple[slice, slice]]:
    """(segments, positions) of each tile's anchors: short segments share a tile, up to `block x block` pairs."""
    rows, keys = min(plan.segment, plan.block_size), min(key_length, plan.block_size)
    per_tile = max(1, plan.block_size**2 // (rows * keys))
    return [(batch, at) for batch in _blocks(plan.labels.shape[0], per_tile) for at in _blocks(plan.segment, plan.block_size)]


def _blocks(length: int, size: int):
    """Consecutive ranges of at most `size` tokens: tiles are `[size, size]`, whatever the length is."""
    return [slice(start, min(start + size, length)) for start in range(0, length, size)]


def _masked_logsumexp(z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(torch.where(mask, z, -math.inf), dim=-1)


def _lsr_logit_grad(z, same, lse_pos, lse_neg, grad):
    """grad * d Lsr / d z: softmax over the negatives minus softmax over the positives.

    z is -inf off the pairs; lse is +inf where its set is empty; both make the term 0.
    """
    return torch.exp(z - torch.where(same, lse_pos, lse_neg)).mul_(torch.where(same, -grad, grad))
