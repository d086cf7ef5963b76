"""AdaGC on Megatron's optimizers: replaces global-norm clipping inside `optimizer.step()`.

`attach_adagc` works on what `megatron.core.optimizer.get_megatron_optimizer` builds: `FP32Optimizer`,
`Float16OptimizerWithFloat16Params`, `DistributedOptimizer`, and a `ChainedOptimizer` of dense and
expert parts. megatron.training's `train_step` and our CPU loop both call `optimizer.step()`, so both
clip with AdaGC. Each main gradient (or its distributed-optimizer shard; `decoupled_grad` with the
precision-aware optimizer, bf16 or fp32) is named after its model parameter and reduced over exactly
the ranks holding the rest of that tensor: the part's tensor-parallel group for TP-split tensors (expert
tensor-parallel group for experts), the part's data-parallel group for distributed-optimizer shards
(the expert data-parallel group for experts), never the pipeline. The global norm is summed over each
part's own grad-stats group, counting TP replicas and shared embeddings once, as Megatron does.

Names are layout-independent: decoder layers carry their global layer number and experts their global
expert index, so pipeline stages, virtual-pipeline chunks and expert-parallel ranks never share a name
and AdaGC's checkpointed state (`AdaGC.state_dict()`, keyed by these names) means the same tensors
whatever the layout. They are independent of the layer implementation too (`implementation_free_name`):
Transformer Engine's fused norms and grouped experts get the local layers' names, so a run saved with TE
layers resumes on local ones and back with the same thresholds.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_submodules
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
from megatron.core.transformer.module import param_is_not_shared

from megatron_simreg.adagc import AdaGC, GradShard


def attach_adagc(optimizer, model_chunks, adagc: AdaGC) -> None:
    """Make `optimizer.step()` clip with `adagc` instead of global-norm clipping.

    The step returns what Megatron's does: (success, grad norm before clipping, zeros in grads or None);
    AdaGC's figures for the log are left in `optimizer.adagc_stats`. With a loss scaler that finds
    inf/nan the step is skipped before AdaGC, as Megatron skips it, so AdaGC's state does not move; a non-finite
    gradient norm skips it too (success False: megatron.training counts a skipped iteration), AdaGC's state unmoved.
    """
    names = parameter_names(model_chunks)
    parts = [
        p for p in getattr(optimizer, "chained_optimizers", [optimizer]) if not getattr(p, "is_stub_optimizer", False)
    ]
    layout = [entry for part in parts for entry in _layout(part, names, adagc.config.variant)]

    @torch.no_grad()
    def step():
        if optimizer.prepare_grads():
            return False, None, None
        stats = adagc.clip([entry.shard() for entry in layout])
        optimizer.adagc_stats = stats
        if not math.isfinite(stats.grad_norm):  # as a loss scaler's inf/nan: the step is skipped, weights untouched
            return False, stats.grad_norm, None
        num_zeros = optimizer.count_zeros() if optimizer.config.log_num_zeros_in_grad else None
        return optimizer.step_with_ready_grads(), stats.grad_norm, num_zeros

    optimizer.step = step
    _checkpoint_with_optimizer(optimizer, adagc, {entry.name for entry in layout})


class AdaGCStateMissing(ValueError):
    """A checkpoint to resume from holds no AdaGC state."""


ADAGC_KEY = "adagc"  # the optimizer checkpoint entry's key (resume.py reads it before anything is built)
NO_ADAGC_STATE = ("holds no AdaGC state (saved without AdaGC, or by an older version): resume with "
                  "adagc.load_state=false to start AdaGC afresh (its warm-up again), or with adagc.enabled=false")


def _checkpoint_with_optimizer(optimizer, adagc: AdaGC, names: set[str]) -> None:
    """AdaGC's state travels inside the optimizer's checkpoint entry, so it is saved with the iteration it belongs
    to and resumed with it, whatever writes the checkpoint.

    `state_dict()` (the local loop's per-rank files) holds this rank's thresholds; `sharded_state_dict()`
    (megatron.training's torch_dist checkpoints) holds the whole model's, gathered from every rank into the
    checkpoint's common state, so a run resumes on another layout with the same threshold per parameter name
    (the `shard` variant's per-piece thresholds need the saved layout). Loading a checkpoint without the state is
    refused unless `adagc.load_state` is false, which starts AdaGC afresh (its warm-up again).
    """
    state_dict, load_state_dict, sharded_state_dict = (
        optimizer.state_dict, optimizer.load_state_dict, optimizer.sharded_state_dict
    )

    def state_dict_with_adagc(*args, **kwargs):
        return {**state_dict(*args, **kwargs), ADAGC_KEY: adagc.state_dict()}

    def sharded_state_dict_with_adagc(*args, **kwargs):
        return {**sharded_state_dict(*args, **kwargs), ADAGC_KEY: _whole_model_state(adagc)}

    def load_state_dict_with_adagc(state, *args, **kwargs):
        state = dict(state)
        saved = state.pop(ADAGC_KEY, None)
        if saved is None and adagc.config.load_state:
            raise AdaGCStateMissing(f"the checkpoint {NO_ADAGC_STATE}")
        if saved is not None and adagc.config.load_state:
            adagc.load_state_dict(_this_ranks_state(saved, names))
        return load_state_dict(state, *args, **kwargs)

    optimizer.state_dict = state_dict_with_adagc
    optimizer.sharded_state_dict = sharded_state_dict_with_adagc
    optimizer.load_state_dict = load_state_dict_with_adagc


def _whole_model_state(adagc: AdaGC) -> dict:
    """Every rank's thresholds in one state (the same on every rank), for a checkpoint's common part."""
    own = adagc.state_dict()
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return own
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, own)
    if adagc.config.variant == "shard":  # per-piece thresholds under one name: keep each rank's own
        return {**own, "gamma": {}, "by_rank": [state["gamma"] for state in states]}
    gamma = {}
    for state in states:
        gamma.update(state["gamma"])
    return {**own, "gamma": dict(sorted(gamma.items()))}


def _this_ranks_state(saved: dict, names: set[str]) -> dict:
    """This rank's thresholds; names saved by earlier versions with Transformer Engine's layers are converted."""
    if "by_rank" in saved:
        world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
        if len(saved["by_rank"]) != world:
            raise ValueError(
                f"the AdaGC state was saved by {len(saved['by_rank'])} ranks with adagc.variant=shard, "
                f"whose thresholds belong to that layout's pieces; resume on {len(saved['by_rank'])} ranks "
                "with the same layout, or with adagc.load_state=false"
            )
        return {**saved, "gamma": _implementation_free(saved["by_rank"][rank])}
    gamma = _implementation_free(saved["gamma"])
    return {**saved, "gamma": {name: value for name, value in gamma.items() if name in names}}


def _implementation_free(gamma: dict[str, float]) -> dict[str, float]:
    return {implementation_free_name(name): value for name, value in gamma.items()}


# megatron-core's local layer spec gives its norms the sharded keys of Transformer Engine's fused layers (the norm
# inside linear_qkv and linear_fc1); read backwards, it names TE's parameters as the local layers do.
_TE_TO_LOCAL = {te: local for local, te in get_gpt_layer_local_submodules().sharded_state_dict_keys_map.items()}
_IN_A_LAYER = re.compile(r"(.*\.layers\.\d+\.)(.*)")
_GROUPED_EXPERT = re.compile(r"(.*\.experts\.)(linear_fc[12])\.(weight|bias)(\d+)")  # TEGroupedMLP's


def implementation_free_name(name: str) -> str:
    """A parameter's name as the local layers call it, whichever layers hold it.

    TE's fused norms `self_attention.linear_qkv.layer_norm_weight` and `mlp.linear_fc1.layer_norm_weight` become
    `input_layernorm.weight` and `pre_mlp_layernorm.weight`; TE's grouped experts' `experts.linear_fc1.weight3`
    becomes `experts.local_experts.3.linear_fc1.weight` (megatron-core checkpoints both as expert 3 of one tensor).
    Local names stay, so AdaGC states of earlier versions load as saved, TE-named ones converted.
    """
    grouped = _GROUPED_EXPERT.fullmatch(name)
    if grouped:
        return f"{grouped[1]}local_experts.{grouped[4]}.{grouped[2]}.{grouped[3]}"
    in_layer = _IN_A_LAYER.fullmatch(name)
    if in_layer:
        for te, local in _TE_TO_LOCAL.items():
            if in_layer[2].startswith(te):
                return in_layer[1] + local + in_layer[2][len(te):]
    return name


def parameter_names(model_chunks) -> dict[torch.nn.Parameter, str]:
    """Each parameter's name in the whole model: global layer numbers and expert indices, and the local layers'
    names whatever the layer implementation (`implementation_free_name`)."""
    names, taken = {}, set()
    for chunk in model_chunks:
        for name, param in _named_parameters(_unwrap(chunk), "", 0):
            name = implementation_free_name(name)
            if param in names:
                continue  # tied weights within a chunk: one tensor, one name
            if name in taken:
                raise ValueError(f"two parameters of the model chunks are both named {name!r}")
            names[param] = name
            taken.add(name)
    return names


def _named_parameters(module, prefix: str, expert_offset: int):
    for name, param in module.named_parameters(recurse=False):
        yield prefix + (_offset_index(name, r"(weight|bias)(\d+)", expert_offset)), param
    if hasattr(module, "num_local_experts") and hasattr(module, "ep_group"):  # SequentialMLP, TEGroupedMLP
        expert_offset = module.ep_group.rank() * module.num_local_experts
    for name, child in module.named_children():
        if name.isdigit() and hasattr(child, "layer_number"):  # a TransformerLayer: its global number
            name = str(child.layer_number - 1)
        elif name.isdigit() and prefix.endswith("local_experts."):
            name = str(int(name) + expert_offset)
        yield from _named_parameters(child, f"{prefix}{name}.", expert_offset)


def _offset_index(name: str, pattern: str, offset: int) -> str:
    match = re.fullmatch(pattern, name)
    return f"{match[1]}{int(match[2]) + offset}" if match and offset else name


def _unwrap(module):
    while hasattr(module, "module"):  # DDP, Float16Module
        module = module.module
    return module


@dataclass
class _Entry:
    """One tensor as a part of the optimizer holds it: where its gradient is found each step."""

    name: str
    main: torch.Tensor | None  # main param (or shard) whose grad is clipped; None: no piece on this rank
    grad_attribute: str
    split_group: object
    shard_group: object
    global_group: object
    counted: bool
    empty: torch.Tensor

    def shard(self) -> GradShard:
        grad = getattr(self.main, self.grad_attribute, None) if self.main is not None else None
        return GradShard(self.name, self.empty if grad is None else grad, self.split_group, self.shard_group,
                         self.global_group, self.counted)


def _layout(part, names, variant: str) -> list[_Entry]:
    """Every tensor of one optimizer part in name order (the same on every rank), with its groups."""
    decoupled = part.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8
    distributed = isinstance(part, DistributedOptimizer)
    tp_group = getattr(part, "tp_group", None) or parallel_state.get_tensor_model_parallel_group()
    expert_tp_group = getattr(part, "expert_tp_group", None) or parallel_state.get_expert_tensor_parallel_group()
    main_of = dict(_model_and_main_params(part, decoupled))
    if distributed:  # every tensor of the part's buffers: ranks without a piece of one pass an empty grad
        models = [param for buffer in part.buffers for param in buffer.params]
    else:
        models = list(main_of)
    entries = []
    for model in sorted(models, key=lambda p: names[p]):
        expert = not getattr(model, "allreduce", True)
        split = getattr(model, "tensor_model_parallel", False) and variant != "shard"
        main = main_of.get(model)
        entries.append(_Entry(
            name=names[model],
            main=main,
            grad_attribute="decoupled_grad" if decoupled else "grad",
            split_group=(expert_tp_group if expert else tp_group) if split else None,
            shard_group=part.data_parallel_group if distributed else None,
            global_group=part.get_grad_stats_parallel_group(),
            counted=param_is_not_shared(model)
            and param_is_not_tensor_parallel_duplicate(model, tp_group=tp_group, expert_tp_group=expert_tp_group),
            empty=torch.empty(0, device=model.device),
        ))
    return entries


def _model_and_main_params(part, decoupled: bool):
    """(model param, the main param or shard holding its gradient) for one Megatron optimizer part."""
    if isinstance(part, DistributedOptimizer):
        main_groups = part.shard_float16_groups if decoupled else part.shard_fp32_from_float16_groups
        pairs = zip(part.model_float16_groups + part.model_fp32_groups, main_groups + part.shard_fp32_groups)
    elif isinstance(part, Float16OptimizerWithFloat16Params):
        pairs = zip(
            part.float16_groups + part.fp32_from_fp32_groups,
            part.fp32_from_float16_groups + part.fp32_from_fp32_groups,
        )
    else:  # FP32Optimizer: the model params are the main params
        groups = [group["params"] for group in part.optimizer.param_groups]
        pairs = zip(groups, groups)
    for model_group, main_group in pairs:
        yield from zip(model_group, main_group)
