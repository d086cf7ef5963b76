"""SimReg's pairwise kernel for calls whose pairs all fit one tile: the whole logit matrix at once.

Tiles (`tiles`) bound memory for long sequences. When every segment's pairs together fit in
one tile, `batch * segment^2 <= block_size^2` (the tiny model's 4 x 128 tokens, chunk-wise SimReg on short
batches), there is nothing to bound, and the tiles' bookkeeping (strips, partial log-sum-exps, padding to
blocks, their scratch) costs more than the pairs themselves: 279 dispatched PyTorch operations per forward and
backward of `simreg_loss` at 4 x 128 x 64 against 152 with this kernel, each ~5-10 us on a CPU whatever its
size at that scale. Same contract as `tiles._SimRegFunction` and the same arithmetic (fp32 math, masks
from labels, the floors, positives shifted by 1/tau). Unlike the tiles, it keeps the logits and the label
mask for backward instead of recomputing them (at most block_size^2 values each, 1 MiB in fp32 at the default
512, the size of the tiles' own scratch), and the units (the size of the hidden states).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megatron_simreg.simreg.base import (
    MASKED,
    _anchor_gradients,
    _drop_radial_part_,
    _gradient_in_layout,
    _logit_weights,
    _lsr,
    _negative_angles,
    _negative_counts,
    _pair_weights,
    _positive_terms,
    _same_label,
    _segment_units,
    _shifted_sums,
    _token_scales,
    ieee_fp32_products,
)
from megatron_simreg.simreg.plan import _batched, _kernel_labels, _Plan


def fits(plan: _Plan) -> bool:
    """Whether the plan's pairs fit one tile: keys are the anchors themselves and batch * segment^2 <= block^2."""
    return plan.gather is None and plan.labels.shape[0] * plan.segment**2 <= plan.block_size**2


@dataclass
class _Tokens:
    """Per-token inputs of the matrix, batched like the plan (`[batch, segment]`) unless said otherwise."""

    scale: torch.Tensor  # [b, s] 1 / (max(|h|, eps) sqrt(tau)), as the hidden states are laid out
    labels: torch.Tensor  # plan.dtype; -1 for invalid tokens, so they pair with no valid one
    bias: torch.Tensor | None  # 0 for valid tokens, -MASKED for invalid ones; None when all are valid
    short: torch.Tensor | None  # bool, |h| < NORM_EPS; None when no vector is that short

    @classmethod
    def of(cls, hidden: torch.Tensor, plan: _Plan) -> "_Tokens":
        scale, short = _token_scales(hidden, plan)
        labels = _kernel_labels(plan.labels).to(plan.dtype)
        if bool(plan.valid.all()):
            bias = None
        else:
            labels = torch.where(plan.valid, labels, -1.0)
            bias = torch.where(plan.valid, 0.0, -MASKED).to(plan.dtype)
        return cls(scale, labels, bias, _batched(short, plan.segment) if bool(short.any()) else None)

    def units(self, hidden: torch.Tensor, plan: _Plan) -> torch.Tensor:
        """`[batch, segment, h]`, z_ij = units_i . units_j."""
        return _segment_units(hidden, self.scale, plan.segment, plan.segment, plan.dtype)

    def logits(self, units: torch.Tensor):
        """z `[batch, segment, segment]` (pairs with an invalid token at -MASKED) and the same-label mask."""
        z = torch.bmm(units, units.transpose(1, 2))
        if self.bias is not None:
            z.add_(self.bias[:, :, None]).add_(self.bias[:, None, :])
        return z, _same_label(self.labels, self.labels, out=torch.empty_like(z))


class DenseSimRegFunction(torch.autograd.Function):
    """Lsr per token from the embeddings, the whole matrix at once (see the module docstring)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, plan: _Plan):
        tokens = _Tokens.of(hidden, plan)
        with ieee_fp32_products():
            units = tokens.units(hidden, plan)
            z, same = tokens.logits(units)
        positive_count = same.sum(-1)  # of a valid anchor: the valid keys with its label (invalid ones are -1)
        negative_count = _negative_counts(positive_count, plan.valid, plan.valid)
        work = torch.empty_like(z)
        valid_pairs = None if tokens.bias is None else (plan.valid, plan.valid)
        angle_sum = _negative_angles(z, same, plan, work, valid_pairs).sum(-1).sum(dtype=torch.float64)

        neg_max, neg_sum = _shifted_sums(torch.add(z, same, alpha=-MASKED, out=work), -1)
        lse_neg = neg_sum.log_().add_(neg_max)
        if tokens.short is None:  # the largest positive logit is 1/tau (see `_positive_terms`)
            lse_pos = _positive_terms(z, same, plan, out=work).sum(-1).log_().add_(plan.inv_temperature)
        else:  # a zero vector: the positives' maxima, as the negatives'
            positives = torch.add(z, torch.sub(same, 1.0, out=work), alpha=MASKED, out=work)
            pos_max, pos_sum = _shifted_sums(positives, -1)
            lse_pos = pos_sum.log_().add_(pos_max)
        lsr, lse_neg = _lsr(lse_pos, lse_neg, negative_count)

        angles = torch.stack([angle_sum * (180.0 / math.pi), negative_count.sum(dtype=torch.float64)])
        ctx.plan, ctx.tokens = plan, tokens
        ctx.save_for_backward(hidden, units, lse_pos, lse_neg, z, same)
        ctx.mark_non_differentiable(positive_count, angles)
        ctx.set_materialize_grads(False)  # no zeros for the non-differentiable outputs' gradients
        return lsr, positive_count, angles

    @staticmethod
    def backward(ctx, grad_lsr, _grad_count, _grad_angles):
        hidden, units, lse_pos, lse_neg, z, same = ctx.saved_tensors
        plan: _Plan = ctx.plan
        tokens: _Tokens = ctx.tokens
        if grad_lsr is None:  # Lsr took no part in what is differentiated
            return None, None
        grad = _anchor_gradients(grad_lsr, lse_neg, plan.dtype)
        shift, step, sign = _logit_weights(lse_pos, lse_neg, grad)
        with ieee_fp32_products():
            # G_ij = |grad_i d Lsr_i / d z_ij| (pairs with an invalid token fall to the floor, then to 0), signed;
            # d loss / d units = W units over the symmetric W = G + G^T, + for negatives, - for positives.
            g = _pair_weights(z, same, shift[..., None], step[..., None])
            g.mul_(sign[..., None])
            w = g + g.transpose(1, 2)
            w.addcmul_(same, w, value=-2.0)
            grad_units = torch.bmm(w, units)
        _drop_radial_part_(grad_units, units, tokens.short, plan)
        return _gradient_in_layout(grad_units, tokens.scale, hidden, plan.segment), None
