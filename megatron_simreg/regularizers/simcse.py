"""SimCSE (Gao et al. 2021, arXiv 2104.08821) on the tokens of a sequence.

The original's unsupervised loss: two dropout views h, h' of each sentence; InfoNCE with the same sentence's
other view as positive and the other sentences' views in the batch as negatives, cosine similarity,
temperature 0.05:  l_i = -log exp(cos(h_i, h'_i)/tau) / sum_j exp(cos(h_i, h'_j)/tau).

Adapted: a "sentence" is a token's final hidden state and the "batch" is its sequence (or chunk), so

    L_i = log sum_{j valid} exp(cos(a_i, b_j) / tau) - cos(a_i, b_i) / tau

with a, b two views (`base.two_views`): by default the cross-entropy pass's final states and those of a second
forward with the original's dropout (hidden and attention, p = 0.1); `views: dropout` is the cheap option;
every other token of the sequence is a negative, whatever its label (SimCSE has no labels). A sequence's
value is the mean of L_i over its valid tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_simreg.regularizers import base
from megatron_simreg.regularizers.base import PairingSettings, RegularizerInputs, RegularizerOutput
from megatron_simreg.regularizers.pairing import pairs_for
from megatron_simreg.regularizers.pairwise import pair_logsumexp


@dataclass
class SimCSESettings(PairingSettings):
    temperature: float = 0.05  # the original's
    dropout: float = 0.1  # the original's (BERT's hidden and attention dropout)
    views: str = "forward"  # a second forward with hidden and attention dropout; "dropout": twice on the final states

    def __post_init__(self):
        super().__post_init__()
        base.check_positive("temperature", self.temperature)
        base.check_fraction("dropout", self.dropout)
        base.check_choice("views", self.views, ("dropout", "forward"))


def simcse_loss(inputs: RegularizerInputs, settings: SimCSESettings, state=None) -> RegularizerOutput:
    pairs = pairs_for(inputs.labels, inputs.valid, settings.chunk(), inputs.sequence_group, inputs.sequence_layout)
    a, b = (base.units(base.batch_major(view)) for view in base.two_views(inputs, settings.views, settings.dropout))
    rows, keys = pairs.rows(a), pairs.keys(b)
    lse = pair_logsumexp(rows, keys, 1.0 / settings.temperature, pairs, "all", settings.block_size)
    positive = (rows * pairs.rows(b)).sum(-1) / settings.temperature
    per_token = torch.where(pairs.row_valid, lse - positive, 0.0)
    return base.mean_output("simcse", {"infonce": (per_token.sum(), pairs.group)}, pairs.row_valid.sum(), pairs.group)
