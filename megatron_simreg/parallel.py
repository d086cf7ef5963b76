"""Process groups and seeds for a run: torch.distributed (nccl on GPUs, gloo on CPU) and megatron's
model-parallel state, from the config's `parallel` section, after checking the layout can work."""

from __future__ import annotations

import os
import random
from datetime import timedelta

import numpy
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from megatron_simreg.config import Config, check_layout
from megatron_simreg.cpu_compat import enable_cpu_compat


def initialize(cfg: Config) -> None:
    """Join the process group torchrun set up (or a group of one) and build megatron's parallel groups."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    check_layout(cfg, world_size)  # before anything is started
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl"
    else:
        enable_cpu_compat()
        backend = "gloo"
    if not dist.is_initialized():
        if "MASTER_PORT" in os.environ:  # torchrun (or Slurm's launcher) set up the rendezvous
            dist.init_process_group(backend, timeout=timedelta(minutes=10))
        else:  # a plain single process: an in-memory store, so concurrent runs on one machine never share a port
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timedelta(minutes=10))
    p = cfg.parallel
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=p.tensor,
        pipeline_model_parallel_size=p.pipeline,
        context_parallel_size=p.context,
        expert_model_parallel_size=p.expert,
    )
    seed = cfg.training.seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    numpy.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def destroy() -> None:
    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def is_logging_rank() -> bool:
    """The rank that reports: last pipeline stage, first of its tensor, context and data groups."""
    return (
        parallel_state.is_pipeline_last_stage()
        and parallel_state.get_tensor_model_parallel_rank() == 0
        and parallel_state.get_context_parallel_rank() == 0
        and parallel_state.get_data_parallel_rank() == 0
    )
