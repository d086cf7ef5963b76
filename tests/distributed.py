"""Run a function on several gloo processes on this machine and collect what each returns.

`fn(rank, world_size, *args, **kwargs)` must be a module-level function (it is pickled into
spawned processes). A failing rank's traceback is raised in the caller.
"""

import os
import socket
import tempfile
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def run_distributed(fn, world_size, *args, **kwargs):
    """Spawn `world_size` processes with an initialised gloo group; return their results in rank order."""
    with tempfile.TemporaryDirectory() as tmp:
        results_dir = os.path.join(tmp, "results")
        os.makedirs(results_dir)
        mp.spawn(_worker, args=(world_size, _free_port(), results_dir, fn, args, kwargs), nprocs=world_size, join=True)
        outcomes = [torch.load(os.path.join(results_dir, f"{rank}.pt"), weights_only=False) for rank in range(world_size)]
    for rank, (ok, value) in enumerate(outcomes):
        if not ok:
            raise AssertionError(f"rank {rank} of {world_size} failed:\n{value}")
    return [value for _, value in outcomes]


def _worker(rank, world_size, port, results_dir, fn, args, kwargs):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    os.environ.setdefault("LOCAL_RANK", str(rank))
    torch.set_num_threads(1)
    # A rank that fails mid-collective must not leave the others waiting forever.
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=120))
    try:
        outcome = (True, fn(rank, world_size, *args, **kwargs))
    except BaseException:  # report every failure, assertion or not, to the parent
        outcome = (False, traceback.format_exc())
    finally:
        if dist.is_initialized():  # the function may have torn its group down itself
            dist.destroy_process_group()
    torch.save(outcome, os.path.join(results_dir, f"{rank}.pt"))


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
