"""SimReg's PyTorch kernel in tiles, flash-style: what long sequences run on CPU (and GPUs without Triton).

No `s x s` matrix is kept for backward (only two log-sum-exps per token are saved, the tiles are recomputed),
and extra memory is O(block * s) rather than O(s^2); the symmetry of cos(h_i, h_j) halves the work (each pair
of tiles once). This module owns the tokens' sides, the strips of tiles, their scratch and thread handling, and
the forward and backward passes over them; the arithmetic on each tile is `base`'s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass

import torch

from megatron_simreg.simreg.base import (
    MASKED,
    _anchor_gradients,
    _combine,
    _drop_radial_part_,
    _gradient_in_layout,
    _logit_weights,
    _lsr,
    _negative_angles,
    _pair_weights,
    _positive_terms,
    _same_label,
    _segment_units,
    _set_sizes,
    _shifted_sums,
    _token_scales,
    ieee_fp32_products,
)
from megatron_simreg.simreg.exchange import _gather_scalars, _kept_keys, _keys, _local_share, _pairing_partners
from megatron_simreg.simreg.plan import _batched, _blocks, _kernel_labels, _padded_length, _padding, _Plan


class _SimRegFunction(torch.autograd.Function):
    """Lsr per token from the embeddings; saves only per-token scalars and recomputes tiles in backward.

    z_ij = cos(h_i, h_j) / tau is symmetric and, within a segment, anchors and keys are the same tokens: each
    tile pair (I, J) with I < J is computed once, its rows feeding anchors I and its columns anchors J, in
    forward (the log-sum-exps) and in backward (both gradient directions); diagonal tiles once. That is
    two `s x s x h` products in all (half of z forward, half again backward, and d/dU = W U over the
    symmetric W). Under sequence or context parallelism full SimReg pairs the local anchors with the
    gathered sequence: anchors and keys differ, so tiles are not mirrored there (each rank computes its own
    anchors' rows against all keys, as before), which keeps it exactly the single-process value.

    Per tile: the negatives' log-sum-exp needs each row's (and column's) maximum over its negatives; the
    positives' needs none, as the largest positive logit of a normalised anchor is its own z_ii = 1/tau
    (Cauchy-Schwarz), so one exp over the tile serves the positive sums of its rows and of its columns.
    Zero vectors (|h| < NORM_EPS, whose logits are all ~0) break that bound; tiles holding one take the
    maximum as for negatives. Masks come from labels as float tiles, not boolean tensors (slow on CPU).
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, plan: _Plan):
        keys = _keys(hidden, plan)
        with ieee_fp32_products():
            pairs = _Pairs.of(hidden, keys, plan)
            lse_pos, lse_neg, angle_sum = _forward_tiles(pairs, plan)
        lsr, lse_neg = _lsr(lse_pos, lse_neg, pairs.negative_count)
        angles = torch.stack([angle_sum, pairs.negative_count.sum(dtype=torch.float64)])
        ctx.plan = plan
        ctx.pairs = pairs.without_units()  # per-token values only: backward recomputes the units from `hidden`
        ctx.save_for_backward(hidden, lse_pos, lse_neg, _kept_keys(keys, plan))
        ctx.mark_non_differentiable(pairs.positive_count, angles)
        ctx.set_materialize_grads(False)  # no zeros for the non-differentiable outputs' gradients
        return lsr, pairs.positive_count, angles

    @staticmethod
    def backward(ctx, grad_lsr, _grad_count, _grad_angles):
        hidden, lse_pos, lse_neg, kept = ctx.saved_tensors
        plan: _Plan = ctx.plan
        if grad_lsr is None:  # Lsr took no part in what is differentiated
            return None, None
        grad = _anchor_gradients(grad_lsr, lse_neg, plan.dtype)
        with ieee_fp32_products():
            pairs = ctx.pairs.with_units(hidden, _keys(hidden, plan, kept), plan)
            grad_units = _backward_tiles(pairs, plan, _logit_weights(lse_pos, lse_neg, grad))
            _drop_radial_part_(grad_units, pairs.anchors.units, pairs.anchors.short, plan)
        del pairs  # the units: the gradient in the input's layout takes their place
        return _gradient_in_layout(grad_units, ctx.pairs.anchors.token_scale, hidden, plan.segment), None


@dataclass
class _Side:
    """The tokens on one side of the tiles, batched like `_Plan`: `[batch, length, ...]`, plan.dtype."""

    units: torch.Tensor | None  # [batch, length, h] h * scale: z_ij = units_i . units_j (None while saved)
    token_scale: torch.Tensor  # [b, s] 1 / (max(|h|, eps) * sqrt(tau)), as the hidden states are laid out
    segment: int  # tokens per segment, before the padding to whole blocks
    scale: torch.Tensor  # token_scale, batched
    short: torch.Tensor  # bool, |h| < NORM_EPS: |u| < 1, so z_ii = 1/tau no longer bounds the row
    labels: torch.Tensor  # the label as `_kernel_labels` gives it (>= 0); -1 for invalid tokens
    valid: torch.Tensor  # 1.0 for valid tokens, 0.0 for invalid ones
    bias: torch.Tensor  # 0 for valid tokens, -MASKED for invalid ones: added to z, it drops their pairs


@dataclass
class _Pairs:
    """What the tiles need: both sides (the same object unless the plan gathers) and the set sizes."""

    anchors: _Side
    keys: _Side
    positive_count: torch.Tensor  # [batch, length] |P_i|: valid keys with the anchor's label (i itself included)
    negative_count: torch.Tensor  # [batch, length] |N_i| for valid anchors (the sides are padded to whole blocks)
    symmetric: bool
    tiling: tuple | None = None  # (strips, strips holding invalid tokens, strips holding short vectors), once known

    @classmethod
    def of(cls, hidden: torch.Tensor, keys: torch.Tensor, plan: _Plan) -> "_Pairs":
        """The anchors' side from `hidden`, the keys' from `keys` (`exchange._keys`: the anchors' own or gathered)."""
        key_labels, key_valid = _pairing_partners(plan.labels, plan.valid, plan)
        key_ids = _kernel_labels(key_labels)
        anchor_ids = _local_share(key_ids, plan)
        positive_count, negative_count = _set_sizes(anchor_ids, key_ids, key_valid, plan.valid, plan.dtype)
        anchors = _side(hidden, plan.segment, anchor_ids, plan.valid, plan)
        if plan.gather is None:
            return cls(anchors, anchors, positive_count, negative_count, symmetric=True)
        return cls(anchors, _side(keys, keys.shape[1], key_ids, key_valid, plan), positive_count, negative_count,
                   symmetric=False)

    def strips(self, plan: _Plan) -> tuple[list[_Strip], list[bool], list[bool]]:
        """The strips, and which of them hold invalid tokens or zero vectors (their general path)."""
        if self.tiling is None:
            strips = _strips(plan, self)
            a, k = self.anchors, self.keys
            self.tiling = (strips, _strips_touching(strips, a.valid == 0, k.valid == 0),
                           _strips_touching(strips, a.short, k.short))
        return self.tiling

    def without_units(self) -> "_Pairs":
        anchors = dataclasses.replace(self.anchors, units=None)
        keys = anchors if self.symmetric else dataclasses.replace(self.keys, units=None)
        return dataclasses.replace(self, anchors=anchors, keys=keys)

    def with_units(self, hidden: torch.Tensor, keys: torch.Tensor, plan: _Plan) -> "_Pairs":
        anchors = dataclasses.replace(self.anchors, units=_units(hidden, self.anchors, plan))
        if self.symmetric:
            return dataclasses.replace(self, anchors=anchors, keys=anchors)
        keys = dataclasses.replace(self.keys, units=_units(keys, self.keys, plan))
        return dataclasses.replace(self, anchors=anchors, keys=keys)


def _side(hidden: torch.Tensor, segment: int, label_ids: torch.Tensor, valid: torch.Tensor, plan: _Plan) -> _Side:
    """The tokens of `hidden` `[b, s, h]` cut into segments, each padded to a whole number of blocks."""
    scale, short = _token_scales(hidden, plan)
    padded = _padding(_padded_length(segment, plan.block_size))
    side = _Side(
        units=None,
        token_scale=scale,
        segment=segment,
        scale=padded(_batched(scale, segment), 0.0),
        short=padded(_batched(short, segment), False),
        labels=padded(torch.where(valid, label_ids.to(plan.dtype), -1.0), -1.0),
        valid=padded(valid.to(plan.dtype), 0.0),
        bias=padded(torch.where(valid, 0.0, -MASKED).to(plan.dtype), -MASKED),
    )
    side.units = _units(hidden, side, plan)
    return side


def _units(hidden: torch.Tensor, side: _Side, plan: _Plan) -> torch.Tensor:
    return _segment_units(hidden, side.token_scale, side.segment, side.labels.shape[1], plan.dtype)


@dataclass(frozen=True)
class _Strip:
    """Anchors of one block (`rows`) of some segments against consecutive blocks of their keys (`cols`).

    In a symmetric plan the keys start at the anchors' own block: the strip's columns beyond that block
    (from `mirrored`, a column offset) also stand for the transposed tiles, whose anchors they are.
    """

    segments: slice
    rows: slice
    cols: slice
    row_block: int  # index of the anchors' block: the partial slot of the mirrored columns
    col_block: int  # index of the first key block: the partial slots of the rows are col_block, col_block + 1, ...
    blocks: int  # key blocks in the strip
    mirrored: int  # first mirrored column; cols.stop - cols.start if none

    @property
    def is_mirrored(self) -> bool:
        return self.mirrored < self.cols.stop - self.cols.start


def _strips(plan: _Plan, pairs: _Pairs) -> list[_Strip]:
    """Strips of one block of anchors against up to 4 blocks of keys (as many as the hidden size allows, so the
    scratch stays below three blocks of units): larger products and fewer operations than single tiles.
    Short segments share a strip, up to `block x block` pairs."""
    batch, rows, h = pairs.anchors.units.shape
    cols = pairs.keys.units.shape[1]
    row_block, col_block = min(rows, plan.block_size), min(cols, plan.block_size)
    width = max(1, min(4, h // col_block))
    per_strip = max(1, plan.block_size**2 // (row_block * col_block))
    strips = []
    for segments in _blocks(batch, per_strip):
        for i in range(rows // row_block):
            first = i if pairs.symmetric else 0
            for j in range(first, cols // col_block, width):
                blocks = min(width, cols // col_block - j)
                mirrored = col_block if pairs.symmetric and j == i else (0 if pairs.symmetric else blocks * col_block)
                strips.append(_Strip(
                    segments, slice(i * row_block, (i + 1) * row_block), slice(j * col_block, (j + blocks) * col_block),
                    i, j, blocks, mirrored,
                ))
    return strips


def _strips_touching(strips: list[_Strip], rows: torch.Tensor | None, cols: torch.Tensor | None) -> list[bool]:
    """Per strip: does any of its anchors (per `rows`) or keys (per `cols`; None: no token) need the general path?
    One check per strip, and none at all in the common case where no token does."""
    rows, cols = (None if flags is None or not bool(flags.any()) else flags for flags in (rows, cols))
    if rows is None and cols is None:
        return [False] * len(strips)

    def touching(flags: torch.Tensor | None, segments: slice, tokens: slice) -> bool:
        return flags is not None and bool(flags[segments, tokens].any())

    return [touching(rows, t.segments, t.rows) or touching(cols, t.segments, t.cols) for t in strips]


THREADED_PRODUCT_MACS = 2**24
"""Strips whose products are smaller than this many multiply-adds leave torch's thread count alone: changing it
costs the operations after it, in SimReg and in the model (thread pools resume: ~40 us for the next bmm here),
more than one-thread passes save on strips that small. A product of 2^24 multiply-adds takes ~0.3 ms on one
core of this project's CPU."""


@contextlib.contextmanager
def _serial_between_products(strips: list[_Strip], hidden_size: int):
    """Inside, elementwise work runs on one thread; `product(operation, *args)` runs a matrix product on torch's
    threads. Small strips (THREADED_PRODUCT_MACS) run everything as torch would, the thread count untouched.

    A strip's elementwise passes are many short operations; on threads they each end in a barrier, and on a
    shared machine every barrier waits for a descheduled sibling thread (on this project's 2-core VM, with
    other jobs running, a 2-thread clamp of 512 x 1024 took 8 ms against 0.2 ms on one thread, and SimReg
    4x attention). torch keeps its thread count per process: it is lowered for the loop and restored
    after it, also on exceptions.
    """
    threads = torch.get_num_threads()
    largest = max(math.prod(_Workspace.shape(strip)) for strip in strips) * hidden_size
    if threads == 1 or largest < THREADED_PRODUCT_MACS:
        yield lambda operation, *args, **kwargs: operation(*args, **kwargs)
        return

    def product(operation, *args, **kwargs):
        torch.set_num_threads(threads)
        try:
            return operation(*args, **kwargs)
        finally:
            torch.set_num_threads(1)

    torch.set_num_threads(1)
    try:
        yield product
    finally:
        torch.set_num_threads(threads)


class _Workspace:
    """Strip-sized scratch tensors reused from strip to strip: no allocation (and no page faults) per strip."""

    def __init__(self, count: int, strips: list[_Strip], like: torch.Tensor):
        self.flat = [like.new_empty(max(math.prod(self.shape(t)) for t in strips)) for _ in range(count)]

    @staticmethod
    def shape(strip: _Strip) -> tuple[int, int, int]:
        return tuple(r.stop - r.start for r in (strip.segments, strip.rows, strip.cols))

    def views(self, strip: _Strip) -> list[torch.Tensor]:
        shape = self.shape(strip)
        return [flat[: math.prod(shape)].view(shape) for flat in self.flat]


def _by_block(strip_tensor: torch.Tensor, strip: _Strip) -> torch.Tensor:
    """`[n, rows, blocks * block]` as `[n, rows, blocks, block]`: per-tile reductions along the last dim."""
    return strip_tensor.unflatten(-1, (strip.blocks, -1))


def _forward_tiles(pairs: _Pairs, plan: _Plan):
    """Per anchor the positives' and negatives' log-sum-exps (any value for an empty set), and the angle sum."""
    a, k = pairs.anchors, pairs.keys
    strips, irregular, short = pairs.strips(plan)
    # Each tile leaves one partial (max, sum) per anchor and set, in the slot of the other side's block.
    slots = (*a.labels.shape, k.labels.shape[1] // min(k.labels.shape[1], plan.block_size))
    partials = _Partials(*(a.labels.new_zeros(slots) for _ in range(4)))
    angle_sum = torch.zeros((), dtype=torch.float64, device=a.units.device)
    workspace = _Workspace(3, strips, a.units)
    with _serial_between_products(strips, a.units.shape[-1]) as product:
        for strip, masked, general in zip(strips, irregular, short):
            scratch = workspace.views(strip)
            angle_sum += _forward_strip(strip, masked, general, pairs, plan, scratch, product, partials)
    segment = pairs.positive_count.shape[1]
    lse_pos = _combine(partials.pos_max[:, :segment], partials.pos_sum[:, :segment])
    lse_neg = _combine(partials.neg_max[:, :segment], partials.neg_sum[:, :segment])
    return lse_pos, lse_neg, angle_sum * (180.0 / math.pi)


@dataclass
class _Partials:
    """Per anchor and set, one (max, sum of exp(z - max)) per tile, `[batch, length, key blocks]`."""

    pos_max: torch.Tensor
    pos_sum: torch.Tensor
    neg_max: torch.Tensor
    neg_sum: torch.Tensor


def _strip_logits(strip: _Strip, masked, pairs: _Pairs, product, z: torch.Tensor, same: torch.Tensor) -> None:
    """Into `z` the strip's logits (invalid tokens' bias added where the strip holds one), into `same` its
    same-label mask: what forward and backward both compute for a strip."""
    a, k = pairs.anchors, pairs.keys
    at, rows, cols = strip.segments, strip.rows, strip.cols
    product(torch.bmm, a.units[at, rows], k.units[at, cols].transpose(1, 2), out=z)
    if masked:
        z.add_(a.bias[at, rows, None]).add_(k.bias[at, None, cols])
    _same_label(a.labels[at, rows], k.labels[at, cols], out=same)


def _forward_strip(strip: _Strip, masked, general, pairs: _Pairs, plan: _Plan, scratch, product, partials):
    """The strip's partials (its rows', and its mirrored columns'), and the sum of its negative pairs' angles."""
    a, k = pairs.anchors, pairs.keys
    at, rows, cols, m = strip.segments, strip.rows, strip.cols, strip.mirrored
    z, same, work = scratch
    _strip_logits(strip, masked, pairs, product, z, same)
    radians = _negative_angles(z, same, plan, work, (a.valid[at, rows], k.valid[at, cols]) if masked else None)
    # Row sums in the tile's dtype (at most 4 blocks of terms <= pi each), then float64 across rows: a float64
    # sum over the whole tile took ten times longer than the float32 one.
    angle_sum = radians.sum(-1).sum(dtype=torch.float64) + radians[..., m:].sum(-1).sum(dtype=torch.float64)

    row_slots = (at, rows, slice(strip.col_block, strip.col_block + strip.blocks))
    col_slots = (at, slice(cols.start + m, cols.stop), strip.row_block)
    negatives = torch.add(z, same, alpha=-MASKED, out=work)
    partials.neg_max[row_slots], partials.neg_sum[row_slots] = _shifted_sums(_by_block(negatives, strip), -1)
    if strip.is_mirrored:  # afresh: the rows' sums consumed the tile
        negatives = torch.add(z[..., m:], same[..., m:], alpha=-MASKED, out=work[..., m:])
        partials.neg_max[col_slots], partials.neg_sum[col_slots] = _shifted_sums(negatives, -2)
    if general:  # a zero vector: the positives' maxima, as the negatives'
        positives = z.add_(torch.sub(same, 1.0, out=work), alpha=MASKED)
        row_sums = _shifted_sums(_by_block(work.copy_(positives), strip), -1)
        partials.pos_max[row_slots], partials.pos_sum[row_slots] = row_sums
        if strip.is_mirrored:
            partials.pos_max[col_slots], partials.pos_sum[col_slots] = _shifted_sums(positives[..., m:], -2)
    else:  # one exp for rows and columns
        terms = _positive_terms(z, same, plan, out=z)
        partials.pos_max[row_slots], partials.pos_sum[row_slots] = plan.inv_temperature, _by_block(terms, strip).sum(-1)
        if strip.is_mirrored:
            partials.pos_max[col_slots], partials.pos_sum[col_slots] = plan.inv_temperature, terms[..., m:].sum(-2)
    return angle_sum


def _backward_tiles(pairs: _Pairs, plan: _Plan, weights) -> torch.Tensor:
    """d loss / d units for the anchors: sum_j (G_ij + G_ji) u_j over the symmetric W = G + G^T."""
    a, k = pairs.anchors, pairs.keys
    key_weights = weights if pairs.symmetric else _gather_scalars(plan, *weights)
    # Padded to the sides' whole blocks: the padding's rows get a finite shift and sign 0.
    anchor_side, key_side = (
        tuple(_padding(side.labels.shape[1])(w, fill) for w, fill in zip(ws, (MASKED, 0.0, 0.0)))
        for ws, side in ((weights, a), (key_weights, k))
    )
    strips, irregular, _ = pairs.strips(plan)
    signed_rows = _strips_touching(strips, anchor_side[2] != 1, None)
    signed_cols = _strips_touching(strips, None, key_side[2] != 1)
    grad_units = torch.zeros_like(a.units)
    workspace = _Workspace(3, strips, a.units)
    with _serial_between_products(strips, a.units.shape[-1]) as product:
        for strip, masked, signs in zip(strips, irregular, zip(signed_rows, signed_cols)):
            scratch = workspace.views(strip)
            _backward_strip(strip, masked, signs, pairs, (anchor_side, key_side), scratch, product, grad_units)
    return grad_units


def _backward_strip(strip: _Strip, masked, signs, pairs: _Pairs, weights, scratch, product, grad_units) -> None:
    """Adds the strip's share of d loss / d units: W u_J to its anchors, W^T u_I to its mirrored keys."""
    a, k = pairs.anchors, pairs.keys
    (shift, step, sign), (key_shift, key_step, key_sign) = weights
    at, rows, cols, m = strip.segments, strip.rows, strip.cols, strip.mirrored
    z, same, w = scratch
    _strip_logits(strip, masked, pairs, product, z, same)
    # G_ij: anchor i's weight on key j (rows); G_ji: anchor j's weight on key i (columns).
    _pair_weights(z, same, shift[at, rows, None], step[at, rows, None], out=w)
    if signs[0]:
        w.mul_(sign[at, rows, None])
    col_w = _pair_weights(z, same, key_shift[at, None, cols], key_step[at, None, cols], out=z)
    if signs[1]:
        col_w.mul_(key_sign[at, None, cols])
    w.add_(col_w).addcmul_(same, w, value=-2.0)  # + for negatives, - for positives
    if masked:
        w.mul_(a.valid[at, rows, None]).mul_(k.valid[at, None, cols])
    product(grad_units[at, rows].baddbmm_, w, k.units[at, cols])
    if strip.is_mirrored:
        product(grad_units[at, cols.start + m : cols.stop].baddbmm_, w[..., m:].transpose(1, 2), a.units[at, rows])
