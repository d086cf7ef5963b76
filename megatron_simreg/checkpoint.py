"""Checkpoints of the local loop, in Megatron-LM's `torch` layout, written so nothing is ever half there.

    <save>/iter_0000100/mp_rank_00_000/model_optim_rng.pt     (one file per model-parallel rank)
    <save>/latest_checkpointed_iteration.txt

Each holds the model, optimizer, LR scheduler and AdaGC states, the RNG states and the data position,
so a resumed run continues exactly as an uninterrupted one. A checkpoint is written into a temporary
folder and renamed when every rank has finished; the `latest` file is updated last.
"""

from __future__ import annotations

import os
import random
import shutil

import numpy
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

LATEST = "latest_checkpointed_iteration.txt"
FILE = "model_optim_rng.pt"


def iteration_dir(save: str, iteration: int) -> str:
    return os.path.join(save, f"iter_{iteration:07d}")


def _rank_dir() -> str:
    tp = parallel_state.get_tensor_model_parallel_rank()
    pp = parallel_state.get_pipeline_model_parallel_rank()
    ep = parallel_state.get_expert_model_parallel_rank()
    name = f"mp_rank_{tp:02d}_{pp:03d}"
    return name if parallel_state.get_expert_model_parallel_world_size() == 1 else f"{name}_{ep:03d}"


def _writes_checkpoint() -> bool:
    """One writer per model-parallel shard: data-parallel rank 0 (and context rank 0)."""
    return parallel_state.get_data_parallel_rank(with_context_parallel=True) == 0 or (
        parallel_state.get_expert_model_parallel_world_size() > 1 and parallel_state.get_expert_data_parallel_rank() == 0
    )


def save_checkpoint(save: str, iteration: int, state: dict) -> str:
    final = iteration_dir(save, iteration)
    partial = final + ".partial"
    if dist.get_rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)
    dist.barrier()
    if _writes_checkpoint():
        os.makedirs(os.path.join(partial, _rank_dir()), exist_ok=True)
        state = {**state, "rng": _rng_state(), "iteration": iteration}
        torch.save(state, os.path.join(partial, _rank_dir(), FILE))
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        with open(os.path.join(save, LATEST + ".partial"), "w") as f:
            f.write(str(iteration))
        os.replace(os.path.join(save, LATEST + ".partial"), os.path.join(save, LATEST))
    dist.barrier()
    return final


def latest_iteration(load: str | None) -> int | None:
    path = os.path.join(load or "", LATEST)
    if not load or not os.path.isfile(path):
        return None
    with open(path) as f:
        return int(f.read().strip())


def load_checkpoint(load: str, iteration: int) -> dict:
    path = os.path.join(iteration_dir(load, iteration), _rank_dir(), FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"checkpoint {path} is missing: it was saved with another parallel layout or is incomplete; "
            "resume with the layout it was saved with, or point checkpoint.load elsewhere"
        )
    state = torch.load(path, map_location="cpu", weights_only=False)
    _set_rng_state(state["rng"])
    return state


def _rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": numpy.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    numpy.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])
