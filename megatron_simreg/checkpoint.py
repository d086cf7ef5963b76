"""Checkpoints of the local loop, in Megatron-LM's `torch` layout, written so nothing is ever half there.

    <save>/iter_0000100/mp_rank_00_000/model_optim_rng.pt     (one file per model-parallel rank)
    <save>/iter_0000100/checksums.json                         (each file's size and hash: checksums.py)
    <save>/latest_checkpointed_iteration.txt

Each holds the model, optimizer, LR scheduler and AdaGC states, the RNG states and the data position,
so a resumed run continues exactly as an uninterrupted one. A checkpoint is written into a temporary
folder and renamed when every rank has finished; the `latest` file is updated last.

Loading, here and in megatron.training (megatron_entry.py), first checks the files against their checksums;
a problem (a corrupt file, a `latest` file naming a missing iteration) is one line that offers the latest
intact iteration, in the words of the entry point (`Choice`: resume, export).
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import sys
import zipfile
from typing import NamedTuple

import numpy
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

from megatron_simreg import checksums

LATEST = "latest_checkpointed_iteration.txt"
FILE = "model_optim_rng.pt"


def iteration_dir(save: str, iteration: int) -> str:
    return os.path.join(save, f"iter_{iteration:07d}")


def rank_dir_name(tp: int, pp: int, ep: int, expert_ranks: int) -> str:
    """The folder of one tensor/pipeline/expert rank's file (Megatron's names; the expert rank only with EP > 1)."""
    name = f"mp_rank_{tp:02d}_{pp:03d}"
    return name if expert_ranks == 1 else f"{name}_{ep:03d}"


def _rank_dir() -> str:
    return rank_dir_name(parallel_state.get_tensor_model_parallel_rank(),
                         parallel_state.get_pipeline_model_parallel_rank(),
                         parallel_state.get_expert_model_parallel_rank(),
                         parallel_state.get_expert_model_parallel_world_size())


def _writes_checkpoint() -> bool:
    """One writer per model-parallel shard: data-parallel rank 0 (and context rank 0)."""
    return parallel_state.get_data_parallel_rank(with_context_parallel=True) == 0 or (
        parallel_state.get_expert_model_parallel_world_size() > 1
        and parallel_state.get_expert_data_parallel_rank() == 0
    )


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names the file and what to do."""


class Choice(NamedTuple):
    """How an entry point lets its user choose an iteration ({} stands for it), for messages that offer one."""

    option: str  # the setting that chooses one
    fix: str  # what to do with an intact iteration offered


RESUME = Choice("checkpoint.load_iteration={}", "resume from it with --set checkpoint.load_iteration={}")
EXPORT = Choice("--iteration {}", "export it with --iteration {}")


def save_checkpoint(save: str, iteration: int, state: dict) -> str:
    final = iteration_dir(save, iteration)
    partial = final + ".partial"
    if dist.get_rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)
    dist.barrier()
    problem = None
    if _writes_checkpoint():
        state = {**state, "rng": _rng_state(), "iteration": iteration}
        problem = _write(state, os.path.join(partial, _rank_dir(), FILE))
    _all_written_or_raise(problem, save, iteration, partial)
    checksums.record(partial)  # inside the folder before its rename: a checkpoint never exists without them
    if dist.get_rank() == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        with open(os.path.join(save, LATEST + ".partial"), "w") as f:
            f.write(str(iteration))
        os.replace(os.path.join(save, LATEST + ".partial"), os.path.join(save, LATEST))
    dist.barrier()
    return final


def remove_partial_checkpoints(save: str) -> None:
    """Remove what a save cut short by kill -9 left under `.partial` names (rank 0, at the start of a run)."""
    if dist.get_rank() != 0 or not os.path.isdir(save):
        return
    for name in os.listdir(save):
        if name.endswith(".partial") and (name.startswith("iter_") or name == LATEST + ".partial"):
            path = os.path.join(save, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            else:
                os.remove(path)


def _write(state: dict, path: str) -> str | None:
    """Write one rank's file; what went wrong, or None."""
    recording = None
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as file:
            recording = _ErrorRecordingFile(file)
            torch.save(state, recording)
    except (OSError, RuntimeError) as error:
        cause = recording.error if recording is not None and recording.error is not None else error
        if getattr(cause, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
            return f"no space left on {_filesystem(path)} while writing {path}"
        if getattr(cause, "errno", None) == errno.EFBIG:
            return f"the file size limit (ulimit -f) stopped writing {path}"
        return f"could not write {path} ({getattr(cause, 'strerror', None) or cause})"
    return None


class _ErrorRecordingFile:
    """torch.save reports a failed write as "unexpected pos"; this keeps the OSError (ENOSPC, ...) it hides."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data):
        try:
            return self.file.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self):
        return self.file.flush()


def _all_written_or_raise(problem: str | None, save: str, iteration: int, partial: str) -> None:
    """Every rank learns whether all files were written (none waits at a barrier for one that failed);
    on a failure the partial folder goes and the previous checkpoint stays the latest."""
    failed = torch.tensor([problem is not None], dtype=torch.int32)
    dist.all_reduce(failed)
    if not int(failed):
        return
    if dist.get_rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)
    previous = latest_iteration(save)
    kept = f"the last checkpoint, iteration {previous}, is intact" if previous is not None else \
        "no checkpoint was saved before"
    raise CheckpointError(f"{problem or 'another rank could not write its checkpoint file'}; iteration {iteration} "
                          f"was not saved and {kept}: free space (or set checkpoint.save elsewhere) and resume")


def _filesystem(path: str) -> str:
    """The device holding `path` (and its mount point), from /proc/mounts where there is one."""
    mount = os.path.realpath(path)
    while not os.path.ismount(mount) and os.path.dirname(mount) != mount:
        mount = os.path.dirname(mount)
    try:
        with open("/proc/mounts", encoding="utf-8") as mounts:
            devices = [line.split()[0] for line in mounts if line.split()[1:2] == [mount]]
    except OSError:
        devices = []
    return f"{devices[-1]} (mounted at {mount})" if devices else mount


def latest_iteration(load: str | None, choice: Choice = RESUME) -> int | None:
    """The iteration the `latest` file names (None: there is none)."""
    path = os.path.join(load or "", LATEST)
    if not load or not os.path.isfile(path):
        return None
    with open(path, errors="replace") as f:
        text = f.read().strip()
    if not (text.isascii() and text.isdigit()):
        raise CheckpointError(f"{path} is corrupt (it holds {text[:20]!r}, not an iteration number; saved here: "
                              f"{_listed(saved_iterations(load))}); " + _offer(load, choice))
    return int(text)


def chosen_iteration(load: str, wanted: int | None, choice: Choice = RESUME) -> int | None:
    """The iteration to load: `wanted`, else the latest; either must have its folder (None: start from scratch)."""
    saved = saved_iterations(load)
    if wanted is not None:
        if wanted not in saved:
            raise CheckpointError(f"{choice.option.format(wanted)} is not saved in {load} (saved: {_listed(saved)})")
        return wanted
    latest = latest_iteration(load, choice)
    if latest is None and saved:
        raise CheckpointError(f"{load} holds iterations {_listed(saved)} but no {LATEST} naming the latest; "
                              + _offer(load, choice))
    if latest is not None and latest not in saved:
        raise CheckpointError(f"{os.path.join(load, LATEST)} names iteration {latest}, but there is no "
                              f"{iteration_dir(load, latest)} (saved: {_listed(saved)}); " + _offer(load, choice))
    return latest


def check_holds_checkpoint(folder: str | None, name: str) -> None:
    """Refuse a checkpoint folder named explicitly (`name` is checkpoint.load= or --checkpoint ) that holds no
    checkpoint: a typo must not start training from scratch."""
    if folder is None:
        return
    if not os.path.isdir(folder):
        problem = "the folder does not exist" if not os.path.exists(folder) else "it is a file"
    elif not saved_iterations(folder) and not os.path.isfile(os.path.join(folder, LATEST)):
        problem = f"it holds no {LATEST} and no iter_* folders"
    else:
        return
    raise FileNotFoundError(f"no checkpoint at {name}{folder}: {problem}; point it at a run's checkpoint folder "
                            "(RUN/checkpoints)")


def saved_iterations(folder: str) -> list[int]:
    """Iterations with a finished folder in `folder` (partial ones excluded), oldest first."""
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return sorted(int(name[5:]) for name in names if name.startswith("iter_") and name[5:].isdigit())


def load_checkpoint(load: str, iteration: int, weights_only: bool = False) -> dict:
    """This rank's file of a saved iteration, checked first; the RNG states restored unless `weights_only`."""
    _check_saved_layout(iteration_dir(load, iteration))
    verify_checkpoint(load, iteration, RESUME, collective=True)
    path = os.path.join(iteration_dir(load, iteration), _rank_dir(), FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file {path} is missing: the checkpoint is incomplete; "
                              + _offer(load, RESUME, below=iteration))
    state = read_checkpoint_file(path, load, iteration, RESUME)
    if not weights_only:
        _set_rng_state(state["rng"])
    return state


def _check_saved_layout(folder: str) -> None:
    """Refuse a checkpoint of another tensor/pipeline/expert layout, alike on every rank (each sees the folder)."""
    layout = (parallel_state.get_tensor_model_parallel_world_size(),
              parallel_state.get_pipeline_model_parallel_world_size(),
              parallel_state.get_expert_model_parallel_world_size())
    wanted = {rank_dir_name(tp, pp, ep, layout[2])
              for tp in range(layout[0]) for pp in range(layout[1]) for ep in range(layout[2])}
    saved = {name for name in (os.listdir(folder) if os.path.isdir(folder) else []) if name.startswith("mp_rank_")}
    if not saved or saved == wanted:
        return  # a missing shard is reported by name when this rank looks for its own
    parts = [name.split("_")[2:] for name in saved]
    saved_layout = tuple(1 + max(int(p[i]) if len(p) > i else 0 for p in parts) for i in range(3))
    raise CheckpointError(
        f"checkpoint {folder} was saved with another parallel layout (tensor {saved_layout[0]}, pipeline "
        f"{saved_layout[1]}, expert {saved_layout[2]}); this run has tensor {layout[0]}, pipeline {layout[1]}, expert "
        f"{layout[2]}: resume with the layout it was saved with (--set parallel.tensor=... pipeline=... expert=...)"
    )


def verify_checkpoint(load: str, iteration: int, choice: Choice, collective: bool) -> None:
    """Before any weight is read: refuse an iteration whose files differ from the checksums saved with them,
    naming the file and offering the latest earlier intact iteration. Collective: on every rank alike, each
    hashing its share. A folder saved without checksums (an older run; megatron.training killed between its
    save and their record) loads unverified, with a line saying so."""
    folder = iteration_dir(load, iteration)
    problems = checksums.verify(folder, collective)
    if problems is None:
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"checkpoint {folder} has no {checksums.MANIFEST} (saved without checksums): loading it unverified",
                  file=sys.stderr, flush=True)
        return
    if problems:
        more = f" (and {len(problems) - 1} more files)" if len(problems) > 1 else ""
        raise CheckpointError(f"{problems[0]}{more}; " + _offer(load, choice, below=iteration, collective=collective))


def read_checkpoint_file(path: str, folder: str, iteration: int, choice: Choice) -> dict:
    """torch.load, or one line naming a corrupt file and the latest earlier intact iteration."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # truncated or overwritten files fail in zipfile, pickle or torch alike
        cause = str(error).strip().splitlines()[0][:120] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"checkpoint file {path} is corrupt ({cause}); "
                              + _offer(folder, choice, below=iteration)) from None


def _offer(load: str, choice: Choice, below: int | None = None, collective: bool = False) -> str:
    """The latest intact iteration (before `below`) and what to do with it."""
    candidates = [i for i in reversed(saved_iterations(load)) if below is None or i < below]
    intact = next((i for i in candidates if _is_intact(iteration_dir(load, i), collective)), None)
    which = "intact iteration" if below is None else "earlier intact iteration"
    if intact is None:
        return f"no {which} is saved in {load}"
    return f"the latest {which} is {intact}: " + choice.fix.format(intact)


def _listed(iterations: list[int]) -> str:
    return ", ".join(map(str, iterations)) or "none"


def _is_intact(folder: str, collective: bool) -> bool:
    """The one test of a saved iteration: its files match their checksums, or, saved without them, open whole."""
    problems = checksums.verify(folder, collective)
    return not problems if problems is not None else _files_are_whole(folder)


def _files_are_whole(folder: str) -> bool:
    """Every checkpoint file of an iteration opens as a zip archive (a truncated or overwritten one does not)."""
    paths = [os.path.join(root, name) for root, _, names in os.walk(folder) for name in names if name.endswith(".pt")]
    try:
        for path in paths:
            with zipfile.ZipFile(path):
                pass
    except (OSError, zipfile.BadZipFile):
        return False
    return bool(paths)


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
