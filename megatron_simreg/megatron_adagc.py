"""AdaGC on Megatron's optimizers: replaces global-norm clipping inside `optimizer.step()`.

Works for `FP32Optimizer`, `Float16OptimizerWithFloat16Params`, `DistributedOptimizer` and a
`ChainedOptimizer` of dense and expert parts, so megatron.training's `train_step` and our CPU loop,
which both call `optimizer.step()`, clip with AdaGC. Each fp32 main gradient (or its distributed
optimizer shard) is named after its model parameter and reduced over exactly the groups that hold the
rest of that tensor: the tensor group for tensor-parallel splits (expert tensor group for experts),
the optimizer's data-parallel group for distributed-optimizer shards, never the pipeline.
"""

from __future__ import annotations

from megatron.core import parallel_state

from megatron_simreg.adagc import AdaGC, AdaGCStats, GradShard


def attach_adagc(optimizer, model_chunks, adagc: AdaGC) -> None:
    """Make `optimizer.step()` clip with `adagc`; its stats land in `optimizer.adagc_stats`."""
    names = {id(param): name for chunk in model_chunks for name, param in _unwrap(chunk).named_parameters()}
    parts = list(getattr(optimizer, "chained_optimizers", [optimizer]))
    for part in parts:
        part.config.clip_grad = 0.0  # AdaGC replaces Megatron's global-norm clipping

    def step():
        if optimizer.prepare_grads():  # found inf/nan with a loss scaler: skip, as Megatron does
            return False, None, None
        shards = [shard for part in parts for shard in _grad_shards(part, names, adagc.config.variant)]
        stats: AdaGCStats = adagc.clip(shards)
        optimizer.adagc_stats = stats
        return optimizer.step_with_ready_grads(), stats.grad_norm, None

    optimizer.step = step


def _unwrap(module):
    while hasattr(module, "module"):
        module = module.module
    return module


def _main_and_model_params(part):
    """(main param holding the fp32 grad, model param it belongs to) for one Megatron optimizer."""
    if hasattr(part, "shard_fp32_from_float16_groups"):  # DistributedOptimizer
        pairs = zip(part.model_float16_groups + part.model_fp32_groups,
                    part.shard_fp32_from_float16_groups + part.shard_fp32_groups)
    elif hasattr(part, "fp32_from_float16_groups"):  # Float16OptimizerWithFloat16Params
        pairs = zip(part.float16_groups + part.fp32_from_fp32_groups,
                    part.fp32_from_float16_groups + part.fp32_from_fp32_groups)
    else:  # FP32Optimizer: the model params are the main params
        groups = [group["params"] for group in part.optimizer.param_groups]
        pairs = zip(groups, groups)
    for model_group, main_group in pairs:
        yield from zip(main_group, model_group)


def _grad_shards(part, names: dict[int, str], variant: str) -> list[GradShard]:
    distributed = hasattr(part, "shard_fp32_from_float16_groups")
    global_groups = (part.get_grad_stats_parallel_group(),)
    shards = []
    for main, model in _main_and_model_params(part):
        if main.grad is None:
            continue
        is_expert = not getattr(model, "allreduce", True)
        split = getattr(model, "tensor_model_parallel", False)
        norm_groups = []
        if split and variant != "shard":
            norm_groups.append(
                parallel_state.get_expert_tensor_parallel_group() if is_expert else parallel_state.get_tensor_model_parallel_group()
            )
        if distributed:
            norm_groups.append(part.data_parallel_group)
        tp_rank = parallel_state.get_expert_tensor_parallel_rank() if is_expert else parallel_state.get_tensor_model_parallel_rank()
        shards.append(
            GradShard(
                name=names[id(model)],
                grad=main.grad,
                norm_groups=tuple(norm_groups),
                global_groups=global_groups,
                counted=split or tp_rank == 0,
            )
        )
    return shards
