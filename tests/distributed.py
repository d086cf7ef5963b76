"""Run a function on several gloo processes on this machine and collect what each returns.

`fn(rank, world_size, *args, **kwargs)` must be a module-level function (it is pickled into the
new processes); it runs inside `cpu_compat()`, so megatron-core works on the CPU. A failing rank's
traceback is raised in the caller.

Processes come from a fork server that has imported torch and megatron-core once: each rank still
starts from a clean interpreter state (nothing a test did in the parent or an earlier rank carries
over), without paying the ~10 s of imports a spawned process pays.

The ranks meet at a store this process hosts (`rendezvous`), as torchrun's ranks meet at its agent's.
"""

import contextlib
import os
import tempfile
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_simreg.cpu_compat import cpu_compat

PRELOADED = ["torch", "torch.distributed", "megatron.core", "megatron_simreg.model", "megatron_simreg.local_loop"]
mp.get_context("forkserver").set_forkserver_preload(PRELOADED)


def run_distributed(fn, world_size, *args, **kwargs):
    """Start `world_size` processes with an initialised gloo group; return their results in rank order."""
    with tempfile.TemporaryDirectory() as tmp, rendezvous() as meeting:
        results_dir = os.path.join(tmp, "results")
        os.makedirs(results_dir)
        worker_args = (world_size, {**os.environ, **meeting}, results_dir, fn, args, kwargs)
        mp.start_processes(_worker, args=worker_args, nprocs=world_size, join=True, start_method="forkserver")
        outcomes = [
            torch.load(os.path.join(results_dir, f"{rank}.pt"), weights_only=False) for rank in range(world_size)
        ]
    for rank, (ok, value) in enumerate(outcomes):
        if not ok:
            raise AssertionError(f"rank {rank} of {world_size} failed:\n{value}")
    return [value for _, value in outcomes]


@contextlib.contextmanager
def rendezvous():
    """Host a TCP store here on a port the OS picks as it binds, and yield the environment that makes processes
    join it as clients (torchrun's agent-store variables). A port found free and bound later by a rank was
    sometimes taken in between (by another test's connections: EADDRINUSE); this one is held from the start."""
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)  # served until the block ends
    yield {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port), "TORCHELASTIC_USE_AGENT_STORE": "True"}


def _worker(rank, world_size, environment, results_dir, fn, args, kwargs):
    os.environ.clear()  # the caller's environment now, not the fork server's from when it started
    os.environ.update(environment)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size))
    os.environ.setdefault("LOCAL_RANK", str(rank))
    torch.set_num_threads(1)
    # A rank that fails mid-collective must not leave the others waiting forever.
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=120))
    # gloo can return from init on one rank while another still completes its connections; a rank that then
    # finishes its function and leaves would close a connection the other is still making.
    dist.barrier()
    try:
        with cpu_compat():
            outcome = (True, fn(rank, world_size, *args, **kwargs))
    except BaseException:  # report every failure, assertion or not, to the parent
        outcome = (False, traceback.format_exc())
    finally:
        if dist.is_initialized():  # the function may have torn its group down itself
            dist.destroy_process_group()
    torch.save(outcome, os.path.join(results_dir, f"{rank}.pt"))

