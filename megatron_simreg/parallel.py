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


def initialize(cfg: Config) -> None:
    """Join the process group torchrun set up (or a group of one) and build megatron's parallel groups."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    check_layout(cfg, world_size)  # before anything is started
    # megatron-core itself needs `cpu_compat()` around this on CPU (the local loop enters it)
    join_process_group("nccl" if torch.cuda.is_available() else "gloo")
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


def launched() -> bool:
    """Whether a launcher (torchrun, also under our Slurm scripts) set this process's rank variables. A MASTER_PORT
    alone is no launcher: cluster allocations often export it to every shell."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def join_process_group(backend: str) -> None:
    """Join the launcher's group (env:// rendezvous), or make a group of one on an in-memory store, so that
    concurrent single-process runs on one machine never share a port."""
    if dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if launched():
        dist.init_process_group(backend, timeout=timedelta(minutes=10))
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timedelta(minutes=10))


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
