"""What ranks exchange under sequence or context parallelism: the gathered sequence and per-token scalars.

Full SimReg pairs each rank's anchors with the whole sequence, so its keys (embeddings, labels, validity and, in
backward, the keys' per-token weights) are all-gathered along the sequence; chunk-wise SimReg exchanges nothing
here. With no process group every function returns the local values as they are.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_simreg.simreg.plan import _Plan


def _pairing_partners(labels: torch.Tensor, valid: torch.Tensor, plan: _Plan):
    """The keys' labels and validity: the anchors' own, or the gathered sequence's."""
    if plan.gather is None:
        return labels, valid
    return _all_gather_sequence(labels, plan.gather), _all_gather_sequence(valid, plan.gather)


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
