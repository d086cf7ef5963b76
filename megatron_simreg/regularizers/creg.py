"""CReg: consistency regularization training (Yin et al. 2023, ACL, "Consistency Regularization Training for
Compositional Generalization") on the tokens of a sequence.

The original adds two terms to a seq2seq model's cross-entropy: representation consistency across samples
(a contrastive term that pulls together the representations of the same (sub)expression in different
contexts and pushes others apart) and prediction consistency for a single sample (the output distributions
of several dropout passes agree, measured by a Jensen-Shannon-type divergence). The SimReg paper summarises
it as treating "each token pair as an independent negative example". We keep both terms:

- contrastive: supervised over same-label positives within the sequence (or chunk), each pair scored on its
  own by a logistic (binary) term, balanced between the positive and the negative pairs of an anchor:
      z_ij = cos(h_i, h_j) / tau,   P_i = {valid j != i : y_j == y_i},   N_i = {valid j : y_j != y_i}
      C_i = mean_{j in P_i} softplus(-z_ij) + mean_{j in N_i} softplus(z_ij)   (an empty set adds 0)
  on the cross-entropy pass's final hidden states;
- consistency: the Jensen-Shannon divergence between the next-token distributions p, q of two views
  (`base.two_views`), over the whole vocabulary (vocabulary-parallel under tensor parallelism):
      J_t = (KL(p || m) + KL(q || m)) / 2,   m = (p + q) / 2.

L = contrastive_weight * mean_i C_i + consistency_weight * mean_t J_t, each a mean over a sequence's valid
tokens. Weights 1 : 1 (the original tunes its terms' weights per task; see docs/baselines.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.nn.functional import all_reduce
from torch.utils.checkpoint import checkpoint

from megatron_simreg.regularizers import base
from megatron_simreg.regularizers.base import PairingSettings, RegularizerInputs, RegularizerOutput
from megatron_simreg.regularizers.pairing import pairs_for
from megatron_simreg.regularizers.pairwise import pair_softplus_sums


@dataclass
class CRegSettings(PairingSettings):
    temperature: float = 0.1
    contrastive_weight: float = 1.0
    consistency_weight: float = 1.0
    dropout: float = 0.1
    views: str = "dropout"  # the consistency term's two views: see base.two_views

    def __post_init__(self):
        super().__post_init__()
        base.check_positive("temperature", self.temperature)
        base.check_fraction("dropout", self.dropout)
        base.check_choice("views", self.views, ("dropout", "forward"))
        if self.contrastive_weight < 0 or self.consistency_weight < 0:
            raise ValueError("regularizer.contrastive_weight and consistency_weight must not be negative")


def creg_loss(inputs: RegularizerInputs, settings: CRegSettings, state=None) -> RegularizerOutput:
    pairs = pairs_for(inputs.labels, inputs.valid, settings.chunk(), inputs.sequence_group, inputs.sequence_layout)
    hidden = base.units(base.batch_major(inputs.hidden))
    positive, negative, n_positive, n_negative = pair_softplus_sums(
        pairs.rows(hidden), pairs.keys(hidden), 1.0 / settings.temperature, 0.0, pairs, settings.block_size)
    contrastive = positive / n_positive.clamp_min(1) + negative / n_negative.clamp_min(1)
    contrastive = torch.where(pairs.row_valid, contrastive, 0.0)
    parts = {"contrastive": (contrastive.sum(), pairs.group)}
    if settings.consistency_weight > 0:
        if inputs.logits is None:
            raise ValueError("creg's consistency term needs the output layer (inputs.logits)")
        a, b = base.two_views(inputs, settings.views, settings.dropout)
        divergence = jensen_shannon(inputs.logits(a), inputs.logits(b), inputs.vocab_group)  # [s_logits, b]
        mask = inputs.valid if inputs.logit_mask is None else inputs.logit_mask.to(divergence.device) > 0
        parts["consistency"] = (torch.where(mask, divergence.T, 0.0).sum(), inputs.logit_group)
    weights = {"contrastive": settings.contrastive_weight, "consistency": settings.consistency_weight}
    return base.mean_output("creg", parts, pairs.row_valid.sum(), pairs.group, weights)


def jensen_shannon(logits_p: torch.Tensor, logits_q: torch.Tensor,
                   vocab_group: dist.ProcessGroup | None) -> torch.Tensor:
    """JS(p || q) per token (summed over the last dim, the vocabulary), fp32, with the vocabulary split over
    `vocab_group` (each rank holds a slice of the logits' last dim). Only the logits are kept for backward (the
    fp32 vocabulary-sized intermediates are recomputed), as the cross-entropy keeps little beyond its logits."""
    return checkpoint(_jensen_shannon, logits_p, logits_q, vocab_group, use_reentrant=False)


def _jensen_shannon(logits_p, logits_q, vocab_group):
    log_p = _log_softmax(logits_p, vocab_group)
    log_q = _log_softmax(logits_q, vocab_group)
    log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)
    per_entry = log_p.exp() * (log_p - log_m) + log_q.exp() * (log_q - log_m)
    return _sum_over(per_entry.sum(-1), vocab_group) / 2


def _log_softmax(logits: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    logits = logits.float() if logits.dtype != torch.float64 else logits
    if group is None or dist.get_world_size(group) == 1:
        return torch.log_softmax(logits, dim=-1)
    peak = logits.detach().amax(-1, keepdim=True)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
    shifted = logits - peak
    # every rank's shard uses the normaliser, so its gradient is summed over the ranks (all-reduce both ways)
    return shifted - all_reduce(shifted.exp().sum(-1, keepdim=True), group=group).log()


def _sum_over(partial: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Sum of per-rank partial sums, the same on every rank, for a value every rank then uses alike (the loss):
    each rank's gradient reaches its own part in full, with no reduction (Megatron's
    reduce_from_tensor_model_parallel_region)."""
    if group is None or dist.get_world_size(group) == 1:
        return partial
    return _ReduceReplicated.apply(partial, group)


class _ReduceReplicated(torch.autograd.Function):
    @staticmethod
    def forward(ctx, partial: torch.Tensor, group: dist.ProcessGroup):
        total = partial.clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None
