"""Exact causal attention under context parallelism, for CPU tests of whole models with CP > 1.

megatron-core's local DotProductAttention refuses context parallelism (only Transformer Engine's
attention, a GPU kernel, implements it). This stand-in has the same constructor and forward contract:
each rank holds the zigzag chunks r and 2*cp-1-r of every sequence; it gathers the keys and values of
all ranks (the gradient flows back to their owners), puts them in sequence order, and lets its queries
attend causally by global position. Slow and memory-hungry, but exact, which is all a test needs.
`use_on_cpu()` puts it in the local layer spec and gives RoPE a CPU way to pick each rank's positions
(megatron-core's pins memory and moves the index to CUDA).
"""

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.transformer.module import MegatronModule


class _GatherOverContext(torch.autograd.Function):
    """All-gather along dim 0 over the context group; backward sums every rank's gradient, keeps ours."""

    @staticmethod
    def forward(ctx, local, group):
        ctx.group = group
        gathered = torch.empty((dist.get_world_size(group) * local.shape[0], *local.shape[1:]), dtype=local.dtype)
        dist.all_gather_into_tensor(gathered, local.contiguous(), group=group)
        return gathered

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad.chunk(dist.get_world_size(ctx.group))[dist.get_rank(ctx.group)], None


def zigzag_positions(seq_local: int, rank: int, size: int) -> torch.Tensor:
    """Global positions of the tokens a context-parallel rank holds (chunks rank and 2*size-1-rank)."""
    chunk = seq_local // 2
    return torch.cat([torch.arange(rank * chunk, (rank + 1) * chunk),
                      torch.arange((2 * size - 1 - rank) * chunk, (2 * size - rank) * chunk)])


class ContextParallelAttention(MegatronModule):
    def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None):
        super().__init__(config=config)
        self.group = parallel_state.get_context_parallel_group()
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        size, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        seq_local = query.shape[0]
        order = torch.cat([zigzag_positions(seq_local, r, size) for r in range(size)]).argsort()
        key = _GatherOverContext.apply(key, self.group)[order]  # [s, b, groups, head dim], sequence order
        value = _GatherOverContext.apply(value, self.group)[order]
        repeat = query.shape[2] // key.shape[2]  # grouped-query attention
        key, value = key.repeat_interleave(repeat, dim=2), value.repeat_interleave(repeat, dim=2)
        allowed = zigzag_positions(seq_local, rank, size)[:, None] >= torch.arange(key.shape[0])[None, :]
        # [s, b, heads, d] -> [b, heads, s, d]
        out = F.scaled_dot_product_attention(query.permute(1, 2, 0, 3), key.permute(1, 2, 0, 3),
                                             value.permute(1, 2, 0, 3), attn_mask=allowed, scale=self.softmax_scale)
        return out.permute(2, 0, 1, 3).reshape(seq_local, query.shape[1], -1)


def rope_on_this_cp_rank(pos_emb, seq_dim, cp_group):
    """RoPE frequencies of the tokens this rank holds (megatron's get_pos_emb_on_this_cp_rank, on CPU)."""
    size = cp_group.size()
    return pos_emb.index_select(seq_dim, zigzag_positions(pos_emb.shape[seq_dim] // size, cp_group.rank(), size))


def use_on_cpu() -> None:
    from megatron.core.models import backends
    from megatron.core.models.common.embeddings import rotary_pos_embedding

    backends.DotProductAttention = ContextParallelAttention  # the local spec's core attention
    rotary_pos_embedding.get_pos_emb_on_this_cp_rank = rope_on_this_cp_rank
