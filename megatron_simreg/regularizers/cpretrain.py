"""CPretrain: cpt-text's contrastive pre-training (Neelakantan et al. 2022, arXiv 2201.10005) on tokens.

The original embeds paired inputs (x, y) with one encoder, scores every pair of the batch by their cosine
similarity times exp(t), t a trainable temperature parameter, and minimises the symmetric cross-entropy
over the batch's rows and columns (x against every y, y against every x) with the paired one as the target:
in-batch negatives, a CLIP-style loss. We initialise the temperature as CLIP does (0.07) and cap the scale
at 100 as CLIP does.

Adapted: the pair of a token is its final hidden state h_i and the embedding e_i of its next-token label
(the output layer's row y_i, so the positive is the class the token is trained to predict); the batch is the
sequence (or chunk). This pairing is our change of method: cpt-text pairs two texts and never sees a label.
Tokens with the same label share that embedding, so they are not negatives of each other, and a label that
several tokens have is one column, counted once:

    z_ij = s * cos(h_i, e_j),   s = min(exp(t), max_scale),   N_i = {valid j : y_j != y_i}
    Y_i = the distinct labels of N_i (each taken at its first token)
    row_i = softplus(log sum_{y in Y_i} exp(s * cos(h_i, e_y)) - z_ii)   (token -> labels)
    col_i = softplus(log sum_{j in N_i} exp(s * cos(e_i, h_j)) - z_ii)  (label -> tokens: every token counts)
    L_i = (row_i + col_i) / 2

(softplus(lse_N - z_ii) = -log softmax of the positive against the negatives). t lives in the model
(`CPretrainState`), so the optimizer steps it and checkpoints keep it. A sequence's value is the mean of L_i.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megatron_simreg.regularizers import base
from megatron_simreg.regularizers.base import PairingSettings, RegularizerInputs, RegularizerOutput
from megatron_simreg.regularizers.pairing import pairs_for
from megatron_simreg.regularizers.pairwise import pair_logsumexp


@dataclass
class CPretrainSettings(PairingSettings):
    init_temperature: float = 0.07  # CLIP's initialisation of the learnable temperature
    max_scale: float = 100.0  # CLIP's cap on exp(t)
    learnable: bool = True  # False: the temperature stays at init_temperature
    detach_targets: bool = False  # True: the label embeddings get no gradient from this term

    def __post_init__(self):
        super().__post_init__()
        base.check_positive("init_temperature", self.init_temperature)
        base.check_positive("max_scale", self.max_scale)


class CPretrainState(torch.nn.Module):
    """The learnable temperature t (a `[1]` tensor: 1-D, so Megatron applies no weight decay to it).

    Under sequence parallelism each rank's gradient of t is its slice's share: `sequence_parallel` makes
    Megatron sum it over the tensor-parallel group, as for the norms.
    """

    def __init__(self, settings: CPretrainSettings, dtype: torch.dtype = torch.float32,
                 sequence_parallel: bool = False):
        super().__init__()
        self.log_scale = torch.nn.Parameter(torch.full((1,), math.log(1.0 / settings.init_temperature), dtype=dtype))
        self.log_scale.sequence_parallel = sequence_parallel


def cpretrain_loss(inputs: RegularizerInputs, settings: CPretrainSettings,
                   state: CPretrainState | None) -> RegularizerOutput:
    if inputs.label_embeddings is None:
        raise ValueError("cpretrain needs the label embeddings (inputs.label_embeddings)")
    if settings.learnable and state is None:
        raise ValueError("cpretrain with a learnable temperature needs its state (CPretrainState) in the model")
    pairs = pairs_for(inputs.labels, inputs.valid, settings.chunk(), inputs.sequence_group, inputs.sequence_layout)
    hidden = base.units(base.batch_major(inputs.hidden))
    targets = base.batch_major(inputs.label_embeddings())
    targets = base.units(targets.detach() if settings.detach_targets else targets)
    if settings.learnable:
        scale = state.log_scale.to(hidden.dtype).exp().clamp(max=settings.max_scale).reshape(())
    else:
        scale = torch.tensor(1.0 / settings.init_temperature, dtype=hidden.dtype, device=hidden.device)
    rows_h, rows_e = pairs.rows(hidden), pairs.rows(targets)
    positive = (rows_h * rows_e).sum(-1) * scale.to(hidden.dtype)
    token_to_labels = pair_logsumexp(rows_h, pairs.keys(targets), scale, pairs, "other_label_once",
                                     settings.block_size)
    label_to_tokens = pair_logsumexp(rows_e, pairs.keys(hidden), scale, pairs, "other_label", settings.block_size)
    per_token = (F.softplus(token_to_labels - positive) + F.softplus(label_to_tokens - positive)) / 2
    per_token = torch.where(pairs.row_valid, per_token, 0.0)
    out = base.mean_output("cpretrain", {"infonce": (per_token.sum(), pairs.group)}, pairs.row_valid.sum(), pairs.group)
    out.stats["cpretrain temperature"] = 1.0 / scale.detach().to(out.loss.dtype)
    return out
