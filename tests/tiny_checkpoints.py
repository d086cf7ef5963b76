"""Tiny models saved as the training entry saves them, for the export and evaluation tests.

`save_tiny_checkpoint` runs on every rank of a gloo group (see distributed.py): it builds a tiny model in
the given parallel layout, gives every weight a value that is the same on every rank for replicated
tensors, and saves it either in our CPU loop's `torch` layout or as megatron.training does
(`torch_dist` through megatron-core's dist_checkpointing). It returns this rank's logits on `tokens`.
"""

import dataclasses
import io
import os

import torch
from megatron.core import dist_checkpointing, parallel_state

from megatron_simreg import parallel
from megatron_simreg.checkpoint import LATEST, iteration_dir, save_checkpoint
from megatron_simreg.config import load_config, save_config
from megatron_simreg.model import model_provider

SHAPE = ["model.seq_length=16", "model.num_layers=2"]


def save_tiny_checkpoint(rank, world, name, run_dir, tokens, layout="torch", overrides=(), seed=0):
    cfg = load_config(f"configs/{name}.yaml", SHAPE + list(overrides) + [f"training.seed={seed}"])
    parallel.initialize(cfg)
    try:
        model = model_provider(cfg)
        with torch.no_grad():  # non-trivial norms, equal on every rank, so their mapping is checked too
            for index, (key, param) in enumerate(model.named_parameters()):
                if "norm" in key:
                    param.copy_(torch.rand(param.shape, generator=torch.Generator().manual_seed(seed + index)) + 0.5)
        model.eval()
        with torch.no_grad():
            logits = model(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None)
        save = os.path.join(run_dir, "checkpoints")
        if rank == 0:
            save_config(cfg, run_dir)
        if layout == "torch":
            save_checkpoint(save, 1, {"model": model.state_dict()})
        else:
            _save_like_megatron_training(model, save, iteration=1, transformer_engine=layout == "torch_dist_te")
        return logits, parallel_state.get_tensor_model_parallel_rank()
    finally:
        parallel.destroy()


def _save_like_megatron_training(model, save: str, iteration: int, transformer_engine: bool = False) -> None:
    """What megatron.training's save_checkpoint does for the model part of a `torch_dist` checkpoint.

    `transformer_engine`: the layout Transformer Engine's layers write. Their weights' sharded keys are the
    local layers' (the norms live inside the fused layers as `linear_qkv.layer_norm_weight` and
    `linear_fc1.layer_norm_weight` in both), and TE adds per-module `_extra_state` (FP8 metadata), among them
    the core attention's, which local layers do not have.
    """
    metadata = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
    folder = iteration_dir(save, iteration)
    if torch.distributed.get_rank() == 0:
        os.makedirs(folder, exist_ok=True)
    torch.distributed.barrier()
    sharded = model.sharded_state_dict(metadata=metadata)
    if transformer_engine:
        for key in [k for k in sharded if k.endswith("self_attention.linear_qkv._extra_state")]:
            layer = key.removesuffix("linear_qkv._extra_state")
            sharded[layer + "core_attention._extra_state"] = dataclasses.replace(
                sharded[key], key=sharded[key].key.replace("linear_qkv", "core_attention"),
                data=io.BytesIO(b"fp8 meta"))
    state = {"model": sharded, "iteration": iteration, "checkpoint_version": 3.0}
    dist_checkpointing.save(state, folder, content_metadata=metadata)
    if torch.distributed.get_rank() == 0:
        with open(os.path.join(save, LATEST), "w") as f:
            f.write(str(iteration))
    torch.distributed.barrier()


def full_logits(results) -> torch.Tensor:
    """One process's logits from every rank's (vocabulary shards are concatenated in TP rank order)."""
    shards = {}
    for logits, tp_rank in results:
        shards.setdefault(tp_rank, logits)
    return torch.cat([shards[r] for r in sorted(shards)], dim=-1)
