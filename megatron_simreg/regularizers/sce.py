"""SCE: similarity contrastive estimation (Denize et al. 2023, WACV, arXiv 2111.14585) on tokens.

The original: an online view z^1 (strong augmentation) and a target view z^2 (weak augmentation through a
momentum encoder, no gradient) of each image; the target distribution mixes the one-hot positive with the
target view's similarities to the other instances, sharpened at tau_m, and the online view's softmax at tau
is trained to match it:

    s2_ik = 1[i != k] exp(z2_i . z2_k / tau_m) / sum_{j != i} exp(z2_i . z2_j / tau_m)
    w_ik  = lambda 1[i == k] + (1 - lambda) s2_ik
    p_ik  = exp(z1_i . z2_k / tau) / sum_j exp(z1_i . z2_j / tau)
    L_i   = - sum_k w_ik log p_ik          (lambda 0.5, tau 0.1, tau_m 0.05; momentum 0.999)

Adapted: instances are a sequence's (or chunk's) tokens, with cosine similarities of final hidden states. The
online view is dropout on the final states (or a second forward with hidden dropout); the target view, with
no gradient, is the other dropout view (`target: view`, the default; or the cross-entropy pass's states with
views "forward") or the final norm with an exponential moving average of its weight applied to the norm's
input (`target: ema`, the original's momentum encoder restricted to the last module; the EMA lives in the
model). With sum_k w_ik = 1, L_i = lse_i - lambda z_ii - (1 - lambda) <z1_i, o_i> / tau where
o_i = sum_k s2_ik z2_k; a token with no other valid token has w = one-hot (the original's L1 renormalisation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megatron_simreg.regularizers import base
from megatron_simreg.regularizers.base import PairingSettings, RegularizerInputs, RegularizerOutput
from megatron_simreg.regularizers.pairing import pairs_for
from megatron_simreg.regularizers.pairwise import pair_logsumexp, pair_softmax_average


@dataclass
class SCESettings(PairingSettings):
    temperature: float = 0.1  # tau, the original's
    target_temperature: float = 0.05  # tau_m, the original's
    mix: float = 0.5  # lambda, the original's
    dropout: float = 0.1  # the online view's
    target_dropout: float = 0.1  # the target view's (0: the final states as they are)
    target: str = "view"  # "view": another view, detached; "ema": the final norm with an EMA weight
    momentum: float = 0.999  # target "ema": the original's momentum
    views: str = "dropout"  # "dropout" on the final states, or "forward": a second forward is the online view

    def __post_init__(self):
        super().__post_init__()
        base.check_positive("temperature", self.temperature)
        base.check_positive("target_temperature", self.target_temperature)
        base.check_fraction("mix", self.mix, closed=True)
        base.check_fraction("dropout", self.dropout)
        base.check_fraction("target_dropout", self.target_dropout)
        base.check_fraction("momentum", self.momentum)
        base.check_choice("target", self.target, ("view", "ema"))
        base.check_choice("views", self.views, ("dropout", "forward"))


class SCEState(torch.nn.Module):
    """The momentum target's final-norm weight: an EMA of the model's, updated after every optimizer step.

    Kept in fp32 whatever the model's dtype (Megatron's Float16Module casts the model to bf16; an EMA at momentum
    0.999 needs more than bf16's 8 bits).
    """

    def __init__(self, settings: SCESettings, hidden_size: int):
        super().__init__()
        self.momentum = settings.momentum
        self.register_buffer("ema_norm_weight", torch.ones(hidden_size, dtype=torch.float32))

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.ema_norm_weight = self.ema_norm_weight.float()
        return self

    @torch.no_grad()
    def update(self, norm_weight: torch.Tensor) -> None:
        self.ema_norm_weight.mul_(self.momentum).add_(norm_weight.float(), alpha=1.0 - self.momentum)

    def target(self, pre_norm: torch.Tensor, epsilon: float) -> torch.Tensor:
        """RMSNorm of the norm's input with the EMA weight (the model's final norm is an RMSNorm)."""
        x = pre_norm.to(torch.promote_types(pre_norm.dtype, torch.float32))
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + epsilon) * self.ema_norm_weight.to(x.dtype)


def sce_loss(inputs: RegularizerInputs, settings: SCESettings, state: SCEState | None) -> RegularizerOutput:
    pairs = pairs_for(inputs.labels, inputs.valid, settings.chunk(), inputs.sequence_group, inputs.sequence_layout)
    if settings.views == "forward":
        if inputs.second_view is None:
            raise ValueError("regularizer.views=forward needs the second forward's hidden states (inputs.second_view)")
        online, target = inputs.second_view, inputs.hidden
    else:
        online, target = F.dropout(inputs.hidden, settings.dropout, training=True), inputs.hidden
    if settings.target == "ema":
        if state is None or inputs.pre_norm is None:
            raise ValueError("sce with target=ema needs its EMA state in the model and the final norm's input")
        target = state.target(inputs.pre_norm, inputs.norm_epsilon)
    with torch.no_grad():
        target = base.units(base.batch_major(F.dropout(target, settings.target_dropout, training=True)))
        target_rows, target_keys = pairs.rows(target), pairs.keys(target)
        average, target_lse = pair_softmax_average(target_rows, target_keys, target_keys,
                                                   1.0 / settings.target_temperature, pairs, "not_self",
                                                   settings.block_size)
    rows = pairs.rows(base.units(base.batch_major(online)))
    lse = pair_logsumexp(rows, target_keys, 1.0 / settings.temperature, pairs, "all", settings.block_size)
    mix = torch.where(torch.isfinite(target_lse), settings.mix, 1.0)  # no other token: the positive alone
    positive = (rows * target_rows).sum(-1) / settings.temperature
    relational = (rows * average).sum(-1) / settings.temperature
    per_token = torch.where(pairs.row_valid, lse - mix * positive - (1 - mix) * relational, 0.0)
    return base.mean_output("sce", {"soft infonce": (per_token.sum(), pairs.group)}, pairs.row_valid.sum(), pairs.group)
