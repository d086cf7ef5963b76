"""Tiled pairwise reductions for the baseline regularizers, flash-style like SimReg's kernel.

For rows q `[B, n, d]` and keys k `[B, m, d]` (unit vectors of the `pairing.Pairs` batches) the logits are
z_ij = scale * <q_i, k_j> (+ bias). Three reductions over a row's pairs are offered:

- `pair_logsumexp`: log sum_j exp(z_ij) over the row's pairs, differentiable in q, k and scale;
- `pair_softplus_sums`: sum_{j positive} softplus(-z_ij) and sum_{j negative} softplus(z_ij) with the counts,
  differentiable in q and k (positives: same label, not itself; negatives: another label);
- `pair_softmax_average`: sum_j softmax_j(z_ij) v_j, no gradient (SCE's target).

Pairs are the valid keys of the row's segment, restricted by `kind`: "all", "other_label" (another label),
"other_label_once" (another label, each label once: its first key) or "not_self". Nothing of size n x m is
kept: forward works in `block x block` tiles and saves per-row scalars; backward recomputes the tiles. Written
by hand because torch offers no masked, tiled log-sum-exp with its gradient; the math runs in the inputs' dtype
(fp32, or fp64 for gradcheck).
"""

from __future__ import annotations

import math

import torch

from megatron_simreg.regularizers.pairing import Pairs

KINDS = ("all", "other_label", "other_label_once", "not_self")


def pair_logsumexp(q, k, scale, pairs: Pairs, kind: str, block_size: int = 512) -> torch.Tensor:
    """`[B, n]` log sum_j exp(scale * <q_i, k_j>) over row i's pairs of `kind`; -inf where it has none."""
    if kind not in KINDS:
        raise ValueError(f"pair kind must be one of {KINDS}, got {kind!r}")
    return _PairLogSumExp.apply(q, k, _as_tensor(scale, q), pairs, kind, block_size)


def pair_softplus_sums(q, k, scale, bias: float, pairs: Pairs, block_size: int = 512):
    """(positive sum, negative sum, positive count, negative count), each `[B, n]`, with z = scale * <q, k> + bias:
    sum over positives (same label, not itself) of softplus(-z) and over negatives (another label) of softplus(z)."""
    return _PairSoftplusSums.apply(q, k, _as_tensor(scale, q), bias, pairs, block_size)


@torch.no_grad()
def pair_softmax_average(q, k, v, scale, pairs: Pairs, kind: str, block_size: int = 512):
    """(`[B, n, d]` sum_j softmax_j(scale * <q_i, k_j>) v_j over row i's pairs, `[B, n]` their log-sum-exp).
    Rows without pairs get 0 and -inf. No gradient (a target)."""
    lse = torch.full(q.shape[:2], -math.inf, dtype=q.dtype, device=q.device)
    out = torch.zeros(*q.shape[:2], v.shape[-1], dtype=q.dtype, device=q.device)
    for bs, rs, ks in _tiles(pairs, q.shape[1], k.shape[1], block_size):
        z = torch.where(_mask(pairs, kind, bs, rs, ks), torch.bmm(q[bs, rs], k[bs, ks].mT) * scale, -math.inf)
        new = torch.logaddexp(lse[bs, rs], torch.logsumexp(z, -1))
        live = torch.isfinite(new)
        safe = torch.where(live, new, 0.0)
        kept = torch.where(live, torch.exp(lse[bs, rs] - safe), 0.0)
        out[bs, rs] = out[bs, rs] * kept[..., None] + torch.bmm(torch.exp(z - safe[..., None]), v[bs, ks].to(q.dtype))
        lse[bs, rs] = new
    return out, lse


def _as_tensor(scale, like: torch.Tensor) -> torch.Tensor:
    if torch.is_tensor(scale):
        return scale.reshape(()).to(like.dtype)
    return torch.tensor(float(scale), dtype=like.dtype, device=like.device)


def _blocks(length: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, length)) for start in range(0, length, size)]


def _tiles(pairs: Pairs, rows: int, keys: int, block: int):
    """(segments, rows, keys) of each tile: at most block x block pairs; short segments share a tile."""
    per_tile = max(1, block * block // (min(rows, block) * min(keys, block)))
    for bs in _blocks(pairs.row_labels.shape[0], per_tile):
        for rs in _blocks(rows, block):
            for ks in _blocks(keys, block):
                yield bs, rs, ks


def _mask(pairs: Pairs, kind: str, bs, rs, ks) -> torch.Tensor:
    """`[nb, nr, nk]` bool: valid row, valid key, and the kind's restriction."""
    mask = pairs.row_valid[bs, rs, None] & pairs.key_valid[bs, None, ks]
    if kind in ("other_label", "other_label_once"):
        mask = mask & (pairs.row_labels[bs, rs, None] != pairs.key_labels[bs, None, ks])
    if kind == "other_label_once":
        mask = mask & pairs.key_first[bs, None, ks]
    elif kind == "not_self":
        mask = mask & (pairs.row_index[bs, rs, None] != pairs.key_index[bs, None, ks])
    return mask


class _PairLogSumExp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, scale, pairs: Pairs, kind: str, block: int):
        lse = torch.full(q.shape[:2], -math.inf, dtype=q.dtype, device=q.device)
        for bs, rs, ks in _tiles(pairs, q.shape[1], k.shape[1], block):
            z = torch.bmm(q[bs, rs], k[bs, ks].mT) * scale
            z = torch.where(_mask(pairs, kind, bs, rs, ks), z, -math.inf)
            lse[bs, rs] = torch.logaddexp(lse[bs, rs], torch.logsumexp(z, -1))
        ctx.pairs, ctx.kind, ctx.block = pairs, kind, block
        ctx.save_for_backward(q, k, scale, lse)
        return lse

    @staticmethod
    def backward(ctx, grad):
        q, k, scale, lse = ctx.saved_tensors
        live = torch.isfinite(lse)
        grad = torch.where(live, grad.to(q.dtype), 0.0)
        lse = torch.where(live, lse, math.inf)  # rows without pairs: exp(z - inf) = 0
        d_q, d_k = torch.zeros_like(q), torch.zeros_like(k)
        d_scale = torch.zeros((), dtype=torch.float64, device=q.device)
        for bs, rs, ks in _tiles(ctx.pairs, q.shape[1], k.shape[1], ctx.block):
            dots = torch.bmm(q[bs, rs], k[bs, ks].mT)
            # d lse_i / d z_ij is softmax_ij over the row's pairs
            d_z = torch.where(_mask(ctx.pairs, ctx.kind, bs, rs, ks), torch.exp(dots * scale - lse[bs, rs, None]), 0.0)
            d_z = d_z * grad[bs, rs, None]
            d_q[bs, rs] += torch.bmm(d_z, k[bs, ks]) * scale
            d_k[bs, ks] += torch.bmm(d_z.mT, q[bs, rs]) * scale
            d_scale += (d_z * dots).sum(dtype=torch.float64)
        return d_q, d_k, d_scale.to(scale.dtype), None, None, None


class _PairSoftplusSums(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, scale, bias: float, pairs: Pairs, block: int):
        # positive sum, negative sum, positive count, negative count: separate tensors (distinct outputs)
        sums = [torch.zeros(q.shape[:2], dtype=q.dtype, device=q.device) for _ in range(4)]
        for bs, rs, ks in _tiles(pairs, q.shape[1], k.shape[1], block):
            z = torch.bmm(q[bs, rs], k[bs, ks].mT) * scale + bias
            positive, negative = _positive_negative(pairs, bs, rs, ks)
            sums[0][bs, rs] += torch.where(positive, torch.nn.functional.softplus(-z), 0.0).sum(-1)
            sums[1][bs, rs] += torch.where(negative, torch.nn.functional.softplus(z), 0.0).sum(-1)
            sums[2][bs, rs] += positive.sum(-1)
            sums[3][bs, rs] += negative.sum(-1)
        ctx.pairs, ctx.bias, ctx.block = pairs, bias, block
        ctx.save_for_backward(q, k, scale)
        ctx.mark_non_differentiable(sums[2], sums[3])
        return sums[0], sums[1], sums[2], sums[3]

    @staticmethod
    def backward(ctx, grad_positive, grad_negative, _count_positive, _count_negative):
        q, k, scale = ctx.saved_tensors
        d_q, d_k = torch.zeros_like(q), torch.zeros_like(k)
        grad_positive, grad_negative = grad_positive.to(q.dtype), grad_negative.to(q.dtype)
        for bs, rs, ks in _tiles(ctx.pairs, q.shape[1], k.shape[1], ctx.block):
            z = torch.bmm(q[bs, rs], k[bs, ks].mT) * scale + ctx.bias
            positive, negative = _positive_negative(ctx.pairs, bs, rs, ks)
            # d softplus(-z) / dz = -sigmoid(-z); d softplus(z) / dz = sigmoid(z)
            d_z = torch.where(positive, -torch.sigmoid(-z) * grad_positive[bs, rs, None], 0.0)
            d_z = d_z + torch.where(negative, torch.sigmoid(z) * grad_negative[bs, rs, None], 0.0)
            d_q[bs, rs] += torch.bmm(d_z, k[bs, ks]) * scale
            d_k[bs, ks] += torch.bmm(d_z.mT, q[bs, rs]) * scale
        return d_q, d_k, None, None, None, None


def _positive_negative(pairs: Pairs, bs, rs, ks):
    both = pairs.row_valid[bs, rs, None] & pairs.key_valid[bs, None, ks]
    same = pairs.row_labels[bs, rs, None] == pairs.key_labels[bs, None, ks]
    itself = pairs.row_index[bs, rs, None] == pairs.key_index[bs, None, ks]
    return both & same & ~itself, both & ~same
