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
    """JS(p || q) per token (summed over the last dim, the vocabulary), fp32 (float64 stays float64), with the
    vocabulary split over `vocab_group` (each rank holds a slice of the logits' last dim); the same on every rank."""
    return _JensenShannon.apply(logits_p, logits_q, vocab_group)


class _JensenShannon(torch.autograd.Function):
    """JS with its gradient written out, dJS/dlogits_p = p * (log p/m - KL(p || m)) / 2 (and q's alike), so that a
    step makes a few passes over the vocabulary-sized tensors instead of autograd's dozens (through log_softmax and
    logaddexp, with recomputation, CReg's step took 10x the baseline's on the tiny LLaMA; 5.3x with this,
    docs/baselines.md). With
    e = log q/p: log p/m = log 2 - softplus(e) and log q/m = log p/m + e.
    Only the logits and per-token statistics are kept for backward, as the cross-entropy keeps little beyond its
    logits; backward needs no collective (each rank's logits get their own part; the loss is the same on every
    rank, as Megatron's reduce_from_tensor_model_parallel_region)."""

    @staticmethod
    def forward(ctx, logits_p, logits_q, group):
        x, y = _upcast(logits_p), _upcast(logits_q)
        log_norm_p, log_norm_q = _log_normaliser(x, group), _log_normaliser(y, group)
        p, q, e, log_p_over_m = _terms(x, y, log_norm_p, log_norm_q)
        kl_p = _sum_over(p.mul_(log_p_over_m).sum(-1), group)
        kl_q = _sum_over(q.mul_(log_p_over_m.add_(e)).sum(-1), group)  # log q/m = log p/m + log q/p
        ctx.save_for_backward(logits_p, logits_q, log_norm_p, log_norm_q, kl_p, kl_q)
        return (kl_p + kl_q) / 2

    @staticmethod
    def backward(ctx, grad):
        logits_p, logits_q, log_norm_p, log_norm_q, kl_p, kl_q = ctx.saved_tensors
        p, q, e, log_p_over_m = _terms(_upcast(logits_p), _upcast(logits_q), log_norm_p, log_norm_q)
        half = (grad / 2).unsqueeze(-1)
        grad_q = q.mul_(half).mul_(e.add_(log_p_over_m).sub_(kl_q.unsqueeze(-1)))
        grad_p = p.mul_(half).mul_(log_p_over_m.sub_(kl_p.unsqueeze(-1)))
        return grad_p.to(logits_p.dtype), grad_q.to(logits_q.dtype), None


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    return logits if logits.dtype == torch.float64 else logits.float()


def _terms(x, y, log_norm_p, log_norm_q):
    """p, q, e = log q/p and log p/m = log 2 - softplus(e) from the logits x, y, each a fresh tensor; the rest of
    the vocabulary-sized work is done in place (on a CPU every fresh tensor costs its page faults)."""
    log_p, log_q = x - log_norm_p, y - log_norm_q
    e = torch.sub(log_q, log_p)
    log_p_over_m = torch.nn.functional.softplus(e).neg_().add_(math.log(2.0))
    return log_p.exp_(), log_q.exp_(), e, log_p_over_m


def _log_normaliser(logits: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """log sum exp over the last dim, split over `group`, keepdim; no gradient (the backward above has it)."""
    if group is None or dist.get_world_size(group) == 1:
        return torch.logsumexp(logits, -1, keepdim=True)
    peak = logits.amax(-1, keepdim=True)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
    total = (logits - peak).exp_().sum(-1, keepdim=True)
    dist.all_reduce(total, group=group)
    return total.log_().add_(peak)


def _sum_over(partial: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Sum of per-rank partial sums, the same on every rank."""
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(partial, group=group)
    return partial
