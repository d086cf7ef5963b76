"""Stopping without losing work, the same way in both loops (the local loop and megatron.training).

Non-finite gradients: megatron-core's DDP checks every gradient bucket for NaN/Inf before the data-parallel
reduction (Megatron-LM's `--check-for-nan-in-loss-and-grad`, on in both loops), so the run stops before the
optimizer touches the weights, and names the last checkpoint, which holds finite weights: a save is refused
when any weight is not finite.

Output folders are checked before any work (`check_writable`), and a checkpoint that cannot be written (a full
disk) says why and leaves the previous one the latest (checkpoint.py).

Signals: SIGTERM (a Slurm time limit or preemption) and SIGINT (Ctrl-C) let the current step finish; the run
saves a checkpoint, says so in one line and exits with 128 + the signal's number, so a requeued job resumes
from it. The local loop's handler only records the signal (nothing is interrupted mid-step, so no traceback
from inside a backward pass); megatron.training does the same with its own `--exit-signal-handler`.
"""

from __future__ import annotations

import os
import signal
import tempfile
import threading

import torch
import torch.distributed as dist

from megatron_simreg.checkpoint import latest_iteration


class TrainingError(RuntimeError):
    """Training stopped for a reason the user must act on (a NaN loss, say)."""


class UnwritablePath(ValueError):
    """An output folder that cannot be written, found before any work."""


def check_writable(folder: str, name: str, fix: str) -> None:
    """Refuse an output folder that cannot be created or written (tried, so read-only filesystems count too)."""
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UnwritablePath(f"{name}={folder} cannot be written ({existing} is a file, not a folder): {fix}")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise UnwritablePath(f"{name}={folder} cannot be written ({existing}: {error.strerror}): {fix}") from None


def check_run_folders(run_dir: str, save_dir: str) -> None:
    """Both loops, at start-up: the run folder (config, logs) and the checkpoint folder."""
    check_writable(run_dir, "logging.run_dir", "set it to a folder you can write to (--set logging.run_dir=DIR)")
    check_writable(save_dir, "checkpoint.save", "set it to a folder you can write to (--set checkpoint.save=DIR)")


def is_non_finite_gradient(error: BaseException) -> bool:
    """megatron-core's gradient check failed (its rerun state machine raises this when result validation
    is off: "Unexpected result nan (message='found NaN in local grad norm for bucket #0 ...')")."""
    text = str(error)
    return isinstance(error, RuntimeError) and "Unexpected result" in text and "grad norm" in text


def last_good_checkpoint(save_dir: str) -> str:
    """Where to resume after a stop for non-finite numbers, and how."""
    iteration = latest_iteration(save_dir)
    if iteration is None:
        return "No checkpoint was saved yet; lower optimizer.lr and start again."
    return (f"The last good checkpoint is iteration {iteration} in {save_dir}: resume from it with a lower "
            "learning rate (--set optimizer.lr=...).")


def non_finite_gradient_stop(iteration: int, save_dir: str) -> TrainingError:
    return TrainingError(f"the gradient is not finite at iteration {iteration}; stopped before the optimizer step. "
                         + last_good_checkpoint(save_dir))


def check_finite_weights(model_chunks, iteration: int, save_dir: str) -> None:
    """Refuse to checkpoint non-finite weights (every rank decides alike: the save's barriers need all of them)."""
    params = [p for chunk in model_chunks for p in chunk.parameters()]
    flags = [~torch.isfinite(p).all() for p in params]  # on the weights' device: NCCL reduces GPU tensors only
    bad = torch.stack(flags).sum().reshape(1).long() if flags else torch.zeros(1, dtype=torch.long)
    if dist.is_initialized():
        dist.all_reduce(bad)
    if int(bad):
        raise TrainingError(f"{int(bad)} weight tensors are not finite after iteration {iteration}; not saved. "
                            + last_good_checkpoint(save_dir))


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(TrainingError):
    """Stopped by a signal after saving; the process should exit with `exit_code` (128 + the signal)."""

    def __init__(self, signum: int, iteration: int, save_dir: str):
        super().__init__(interrupted_message(signum, iteration, save_dir))
        self.exit_code = 128 + signum


def interrupted_message(signum: int, iteration: int | None, save_dir: str) -> str:
    name = signal.Signals(signum).name
    if iteration is None:
        return f"received {name} before the first checkpoint; nothing was saved (exit code {128 + signum})"
    return (f"received {name}: finished iteration {iteration} and saved it in {save_dir}; exit code {128 + signum}, "
            "run the same command to resume")


class StopSignals:
    """Records SIGTERM/SIGINT while training (main thread only; the previous handlers come back on exit).

    Written here because megatron.training's DistributedSignalHandler takes one signal and sits in its loop.
    """

    def __enter__(self):
        self.received = 0
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {sig: signal.signal(sig, self._record) for sig in STOP_SIGNALS}
        return self

    def _record(self, signum, frame) -> None:
        self.received = self.received or signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def agreed(self) -> int:
        """The signal some rank received (0: none), the same on every rank so all of them stop together."""
        flag = torch.tensor([self.received])
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag)
