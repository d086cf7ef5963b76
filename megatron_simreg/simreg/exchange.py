"""What ranks exchange under sequence or context parallelism: the gathered sequence and per-token scalars.

Full SimReg pairs each rank's anchors with the whole sequence, so its keys (embeddings, labels and validity in one
gather, and, in backward, the keys' per-token weights) are all-gathered along the sequence; chunk-wise SimReg
exchanges nothing here. With no process group every function returns the local values as they are.

Forward keeps the gathered embeddings for backward while the group is small (`KEEP_GATHERED_KEYS_UP_TO`), so a
micro-batch's full SimReg costs three collectives in forward (labels and validity, embeddings, the loss's sums)
and one in backward (the keys' weights).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_simreg.simreg.plan import _Plan

KEEP_GATHERED_KEYS_UP_TO = 16
"""The largest group whose gathered embeddings forward keeps for backward; larger groups gather them again there.

The trade: world * s_local * b * h values held from forward to backward (per micro-batch in flight, like every
activation), against one all-gather of that size in backward. The gathered keys are `world` copies of the rank's
own hidden states, while one transformer layer under sequence parallelism saves about 17 of them in 16-bit
training (34 s b h / t bytes, Korthikanti et al. 2022, with the attention scores recomputed): up to 16 ranks the
keys cost less than one more layer of the model's activations, a few percent of them at 24 layers or more."""


def _pairing_partners(labels: torch.Tensor, valid: torch.Tensor, plan: _Plan):
    """The keys' labels and validity: the anchors' own, or the gathered sequence's (one gather for both)."""
    if plan.gather is None:
        return labels, valid
    gathered = _all_gather_sequence(torch.stack([labels, valid.to(labels.dtype)], dim=-1), plan.gather)
    return gathered[..., 0], gathered[..., 1].bool()


def _keys(hidden: torch.Tensor, plan: _Plan, kept: torch.Tensor | None = None) -> torch.Tensor:
    """The keys' hidden states: the anchors' own, the gathered ones forward kept (`_kept_keys`), or gathered now."""
    if plan.gather is None:
        return hidden
    return kept if kept is not None else _all_gather_sequence(hidden, plan.gather)


def _kept_keys(keys: torch.Tensor, plan: _Plan) -> torch.Tensor | None:
    """What forward saves of the gathered keys for backward: them up to KEEP_GATHERED_KEYS_UP_TO ranks, else
    None (backward gathers them again); None without a gather (the keys are the anchors, saved anyway)."""
    if plan.gather is None or dist.get_world_size(plan.gather) > KEEP_GATHERED_KEYS_UP_TO:
        return None
    return keys


def _local_share(gathered: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """This rank's own tokens out of a gathered `[b, world * s, ...]` tensor (all of it without a gather)."""
    if plan.gather is None:
        return gathered
    rank = dist.get_rank(plan.gather)
    return gathered[:, rank * plan.segment : (rank + 1) * plan.segment]


def _gather_scalars(plan: _Plan, *per_token: torch.Tensor) -> list[torch.Tensor]:
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
