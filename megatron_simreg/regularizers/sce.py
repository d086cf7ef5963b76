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
online view is the cross-entropy pass's final states with dropout (or a second forward with hidden and attention
dropout, views "forward"); the target view, with no gradient, comes from the momentum encoder (`target: ema`,
the default): an exponential moving average of the whole model, in fp32, run forward on the same tokens
(`SCEState`). The original's momentum and target temperature are those of its ImageNet run (CEA-LIST/SCE,
`resnet50_imagenet.yaml`: momentum 0.99, tau_m 0.07; its momentum then rises to 1 along a cosine, ours stays).
`target: view` is the cheap option: another dropout view of the model's own states, detached. With
sum_k w_ik = 1, L_i = lse_i - lambda z_ii - (1 - lambda) <z1_i, o_i> / tau where o_i = sum_k s2_ik z2_k; a
token with no other valid token has w = one-hot (the original's L1 renormalisation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_simreg.regularizers import base
from megatron_simreg.regularizers.base import PairingSettings, RegularizerInputs, RegularizerOutput
from megatron_simreg.regularizers.pairing import pairs_for
from megatron_simreg.regularizers.pairwise import pair_logsumexp, pair_softmax_average


@dataclass
class SCESettings(PairingSettings):
    temperature: float = 0.1  # tau, the original's
    target_temperature: float = 0.07  # tau_m, the original's (its ImageNet run)
    mix: float = 0.5  # lambda, the original's
    dropout: float = 0.1  # the online view's
    target_dropout: float = 0.1  # the target view's (0: the target's final states as they are)
    target: str = "ema"  # "ema": the momentum encoder; "view": the model's own states, detached
    momentum: float = 0.99  # target "ema": the original's (its ImageNet run)
    views: str = "dropout"  # "dropout" on the final states, or "forward": a second forward is the online view

    def __post_init__(self):
        super().__post_init__()
        base.check_positive("temperature", self.temperature)
        base.check_positive("target_temperature", self.target_temperature)
        base.check_fraction("mix", self.mix, closed=True)
        base.check_fraction("dropout", self.dropout)
        base.check_fraction("target_dropout", self.target_dropout)
        base.check_fraction("momentum", self.momentum)
        base.check_choice("target", self.target, ("ema", "view"))
        base.check_choice("views", self.views, ("dropout", "forward"))


class SCEState(torch.nn.Module):
    """The momentum encoder: `encoder`, a copy of the model (built by the caller, same layers and parallel
    layout, so each rank holds the EMA of its own shard) whose weights follow the model's by
    ema <- momentum * ema + (1 - momentum) * weight after every optimizer step, run forward without gradient.

    Its weights are kept in fp32 whatever the model's dtype: Megatron's Float16Module casts the whole model to
    bf16, and an update of (1 - momentum) times a step's change is below bf16's resolution. Its forward runs in
    the model's precision (autocast, in the objective). Its weights are buffers in
    effect (no gradient): the optimizer and DDP skip them; both checkpoint formats keep them.
    """

    def __init__(self, settings: SCESettings, model: torch.nn.Module, encoder: torch.nn.Module):
        super().__init__()
        self.momentum = settings.momentum
        self.encoder = encoder.requires_grad_(False).float()
        self.start_from(model)

    @torch.no_grad()
    def start_from(self, model: torch.nn.Module) -> None:
        """The encoder as a copy of `model`'s weights: at the start of a run, and after a weights-only load."""
        self.encoder.load_state_dict(model.state_dict())

    def _apply(self, fn, recurse=True):
        return super()._apply(lambda t: fn(t).float() if t.is_floating_point() else fn(t), recurse)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """One EMA step towards `model`'s weights (`model` holds this state; its own names match the encoder's)."""
        for name, ema in self.encoder.named_parameters():
            ema.mul_(self.momentum).add_(model.get_parameter(name).float(), alpha=1.0 - self.momentum)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        """Megatron's distributed checkpoint: the encoder's shards, keyed and split as the model's own."""
        return self.encoder.sharded_state_dict(prefix=f"{prefix}encoder.", sharded_offsets=sharded_offsets,
                                               metadata=metadata)


def sce_loss(inputs: RegularizerInputs, settings: SCESettings, state: SCEState | None = None) -> RegularizerOutput:
    pairs = pairs_for(inputs.labels, inputs.valid, settings.chunk(), inputs.sequence_group, inputs.sequence_layout)
    if settings.views == "forward":
        if inputs.second_view is None:
            raise ValueError("regularizer.views=forward needs the second forward's hidden states (inputs.second_view)")
        online, target = inputs.second_view, inputs.hidden
    else:
        online, target = base.dropped_out(inputs, inputs.hidden, settings.dropout), inputs.hidden
    if settings.target == "ema":
        if inputs.target_view is None:
            raise ValueError("sce with target=ema needs the momentum encoder's final states (inputs.target_view)")
        target = inputs.target_view
    with torch.no_grad():
        target = base.units(base.batch_major(base.dropped_out(inputs, target, settings.target_dropout)))
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
