"""One training run at a time in a run folder (and in a checkpoint folder), in both loops.

A run holds an exclusive lock on `.lock` in its run folder and in its checkpoint folder for its whole life, so
a second run started on either stops before any work instead of writing the same metrics and `iter_*` folders.
The file names the holder (host, pid, start time) for the refusal's message. The kernel releases the lock when
its process dies, so a run killed with -9 blocks nothing: the next run takes its lock over and says so. A run
that ends empties the file; one that still names a holder when its lock is free was left by a killed run.
A POSIX lock (`lockf`), not `flock`: forked children (DataLoader workers) do not inherit it, so they cannot
hold it after their parent is killed, and it holds across the nodes of an NFS mount. (Closing any descriptor of
the file releases a POSIX lock: nothing else in the process may open `.lock`.)

Under torchrun, global rank 0 takes the locks and every rank learns its decision, so all of them stop alike.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
import sys
import time

import torch.distributed as dist

from megatron_simreg.failures import TrainingError, check_run_folders

LOCK_FILE = ".lock"


class FolderInUse(TrainingError):
    """Another live run holds the folder."""


class RunFolders:
    """The locks of one run's folders, released on leaving the `with` block (or by `release`)."""

    def __init__(self, run_dir: str, save_dir: str):
        check_run_folders(run_dir, save_dir)
        self._files = []
        refusal = None
        if _rank() == 0:
            try:
                for folder, key in _distinct([(run_dir, "logging.run_dir"), (save_dir, "checkpoint.save")]):
                    self._files.append(_lock(folder, key))
            except FolderInUse as error:
                self.release()
                refusal = str(error)
        refusal = _rank_zeros(refusal)
        if refusal is not None:
            raise FolderInUse(refusal)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        for file in reversed(self._files):
            file.truncate(0)  # a run that ended: the next one has nothing to take over
            file.close()  # closing the descriptor releases the lock
        self._files = []


def _rank_zeros(refusal: str | None) -> str | None:
    """Rank 0's decision, on every rank: over the local loop's process group, or, before megatron.training has
    one, through torchrun's store (the others wait there, not in Megatron's start-up, whose SIGTERM handler
    would keep them alive 30 s after a refused rank 0 ended the launch)."""
    if dist.is_initialized():
        shared = [refusal]
        if dist.get_world_size() > 1:
            dist.broadcast_object_list(shared, src=0)
        return shared[0]
    if int(os.environ.get("WORLD_SIZE", "1")) == 1 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return refusal  # rank 0 alone: a refused rank 0 ends the launch
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=datetime.timedelta(minutes=10))
    key = f"megatron_simreg/run_folders/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    if _rank() == 0:
        store.set(key, refusal or "")
        return refusal
    return store.get(key).decode() or None


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def _distinct(folders: list[tuple[str, str]]) -> list[tuple[str, str]]:
    seen, out = set(), []
    for folder, key in folders:
        real = os.path.realpath(folder)
        if real not in seen:
            seen.add(real)
            out.append((folder, key))
    return out


def _lock(folder: str, key: str):
    os.makedirs(folder, exist_ok=True)
    file = open(os.path.join(folder, LOCK_FILE), "a+", encoding="utf-8")
    try:
        fcntl.lockf(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno not in (errno.EACCES, errno.EAGAIN):
            raise
        holder = _holder(file, wait=True)
        file.close()
        who = f"pid {holder['pid']} on host {holder['host']} since {holder['started']}" if holder else "another run"
        raise FolderInUse(f"{key}={folder} is in use by {who}: wait for it, stop it, or set another {key}") from None
    stale = _holder(file)
    if stale:
        print(f"{key}={folder}: taking over the lock of pid {stale['pid']} on host {stale['host']} "
              f"(since {stale['started']}), which ended without releasing it", file=sys.stderr, flush=True)
    file.truncate(0)
    json.dump({"host": socket.gethostname(), "pid": os.getpid(),
               "started": datetime.datetime.now().isoformat(timespec="seconds")}, file)
    file.flush()
    return file


def _holder(file, wait: bool = False) -> dict | None:
    """Who the lock file names; a holder may have the lock a moment before it has written its name."""
    for _ in range(20 if wait else 1):
        file.seek(0)
        try:
            holder = json.loads(file.read())
            if {"host", "pid", "started"} <= holder.keys():
                return holder
        except (ValueError, AttributeError):
            pass
        if wait:
            time.sleep(0.05)
    return None
