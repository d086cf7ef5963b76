"""One training step of the tiny LLaMA in any parallel layout, for tests that compare layouts.

Weights are shared through megatron-core's distributed checkpointing (the library reshards them onto each
layout); the step runs through the local loop's DDP, optimizer wrapper and megatron's schedules; gradients
and parameters are gathered back to the single-process names and shapes.
"""

import os
import re

import torch
import torch.distributed as dist

BASE = [
    "model.seq_length=32", "model.num_layers=2", "training.micro_batch_size=2", "training.global_batch_size=4",
    "schedule.train_iters=10", "schedule.warmup_steps=2", "simreg.temperature=0.1", "simreg.block_size=8",
]


def batch_for(seed=0, micro_batches=2, micro_batch=2, seq=32, masked=True):
    """Token ids with repeats (so SimReg has positives), the same on every rank; 10% of the loss masked."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 50, (micro_batches * micro_batch, seq + 1), generator=gen)
    mask = (
        (torch.rand(micro_batches * micro_batch, seq, generator=gen) > 0.1)
        if masked else torch.ones(tokens[:, 1:].shape)
    )
    return {
        "tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": mask.float(),
        "position_ids": torch.arange(seq).expand(micro_batches * micro_batch, seq).clone(),
    }


def model_with_shared_weights(cfg, checkpoint, save):
    """The layout's model and optimizer, holding the single-process run's weights (resharded by megatron)."""
    from megatron.core import dist_checkpointing

    from megatron_simreg.local_loop import build_model_and_optimizer

    model, optimizer = build_model_and_optimizer(cfg)
    if save:
        os.makedirs(checkpoint, exist_ok=True)
        dist_checkpointing.save(model.module.sharded_state_dict(), checkpoint)
    else:  # a regularizer's state (CPretrain's temperature, SCE's EMA) is not among the shared weights: as built
        sharded = {k: v for k, v in model.module.sharded_state_dict().items() if not k.startswith(STATE)}
        loaded = model.module.load_state_dict(dist_checkpointing.load(sharded, checkpoint), strict=False)
        assert not loaded.unexpected_keys and all(k.startswith(STATE) for k in loaded.missing_keys), loaded
        state = getattr(model.module, "regularizer_state", None)
        if hasattr(state, "encoder"):  # SCE's momentum encoder starts as a copy of the model: of the shared weights
            own = {k: v for k, v in model.module.state_dict().items() if not k.startswith(STATE)}
            state.encoder.load_state_dict(own)
    return model, optimizer


STATE = "regularizer_state."


def forward_backward(cfg, model, seed=0, masked=True, forward_only=False):
    """One global batch through megatron's schedule (forward only: as evaluation runs it); this rank's share of
    it; the reduced report."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_simreg.batches import on_this_rank
    from megatron_simreg.objective import SimRegObjective, forward_step, reduce_reports
    from megatron_simreg.run_plan import plan_run

    plan = plan_run(cfg, dist.get_world_size())
    dp, dp_rank, mbs = plan.data_parallel, parallel_state.get_data_parallel_rank(), cfg.training.micro_batch_size
    full = batch_for(seed=seed, micro_batches=cfg.training.global_batch_size // mbs, micro_batch=mbs, masked=masked)
    micro = [{k: v[(m * dp + dp_rank) * mbs:(m * dp + dp_rank + 1) * mbs] for k, v in full.items()}
             for m in range(plan.micro_batches)]
    model.zero_grad_buffer()
    reports = get_forward_backward_func()(
        forward_step_func=lambda it, m: forward_step(
            SimRegObjective.from_config(cfg), lambda i: on_this_rank(next(i)), it, m
        ),
        data_iterator=iter(micro), model=[model], num_microbatches=plan.micro_batches,
        seq_length=cfg.model.seq_length, micro_batch_size=mbs, forward_only=forward_only,
    )
    return (
        reduce_reports(reports, parallel_state.get_data_parallel_group(with_context_parallel=True)) if reports else None
    )


def gathered_grads(model):
    """Every trained parameter's gradient as the single-process model would name and shape it."""
    return gathered(model, lambda param: param.main_grad if param.requires_grad else None)


def gathered(model, tensor_of):
    """`tensor_of(param)` for every parameter (where not None), as the single-process model would name and shape it."""
    from megatron.core import parallel_state

    out = {}
    tp_group = parallel_state.get_tensor_model_parallel_group()
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    for name, param in model.named_parameters():
        tensor = tensor_of(param)
        if tensor is None:
            continue
        grad = tensor.detach().clone()
        if getattr(param, "tensor_model_parallel", False) and parallel_state.get_tensor_model_parallel_world_size() > 1:
            pieces = [torch.empty_like(grad) for _ in range(dist.get_world_size(tp_group))]
            dist.all_gather(pieces, grad.contiguous(), group=tp_group)
            if name.endswith("linear_fc1.weight"):  # SwiGLU: each rank holds [gate shard; up shard]
                gates, ups = zip(*(piece.chunk(2, dim=0) for piece in pieces))
                pieces = list(gates) + list(ups)
            grad = torch.cat(pieces, dim=param.partition_dim)
        out[_global_name(model, name, ep_rank)] = grad
    return out


def _global_name(model, name, ep_rank):
    match = re.search(r"layers\.(\d+)\.", name)
    if match:
        layer = model.decoder.layers[int(match.group(1))]
        name = name.replace(match.group(0), f"layers.{layer.layer_number - 1}.", 1)
        experts = re.search(r"local_experts\.(\d+)\.", name)
        if experts:
            per_rank = len(layer.mlp.experts.local_experts)
            name = name.replace(experts.group(0), f"local_experts.{ep_rank * per_rank + int(experts.group(1))}.", 1)
    return name


def merged(per_rank):
    grads, metrics = {}, None
    for rank_metrics, rank_grads in per_rank:
        metrics = metrics or rank_metrics
        for name, grad in rank_grads.items():
            if name in grads:
                torch.testing.assert_close(grad, grads[name])  # replicas agree
            grads[name] = grad
    return metrics, grads


# Layouts compute the same fp32 model with other matmul shapes (tensor-parallel splits, micro-batches), so every
# sum runs in another order: a dot product of k <= 172 terms is within k * 2^-24 ~ 1e-5 of its exact value
# relative to |a||b|, whatever the CPU's vector width, and two layers forward and back compound that to ~1e-4.
LOSS_REL = 1e-5  # token means of fp32 cross-entropies and SimReg values: a few ulps of the sums behind them
GRAD_RTOL = 1e-4


def assert_gradients_close(got, want, name):
    """Equal up to fp32 summation order; entries that cancel to about zero are judged against the tensor's scale."""
    torch.testing.assert_close(got, want, rtol=GRAD_RTOL, atol=1e-5 * want.abs().max().item(), msg=name)

