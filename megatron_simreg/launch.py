"""torchrun, with the exit status of a stopped run: `python -m megatron_simreg.launch` takes torchrun's arguments.

    python -m megatron_simreg.launch --standalone --nproc-per-node 8 -m megatron_simreg.train --config ...

torchrun answers SIGTERM and Ctrl-C with a SignalException traceback and exit code 1, and kills its workers 30 s
after passing the signal on, however long their checkpoint takes; so a requeue script sees a failure. Here the
launcher passes SIGTERM and SIGINT to the workers (torchrun starts them in sessions of their own, out of reach of
a terminal's Ctrl-C) and waits while they finish the step and save; then it exits as they did: 143 or 130, with
one line. Any worker's failure ends in one line too, naming the rank and its exit code, which the launcher
exits with. The rest is torch.distributed.run itself.
"""

import os
import signal
import sys

from megatron_simreg.cli import one_line_errors

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _pass_to_workers(signum, frame) -> None:
    """The workers are this process's children (torchrun's agent runs in it); each one saves and exits 128 + signum."""
    import psutil

    workers = psutil.Process().children()
    if not workers:  # before the workers start: stop here
        raise KeyboardInterrupt(f"interrupted by {signal.Signals(signum).name} before the workers started "
                                f"(exit code {128 + signum})")
    for worker in workers:
        worker.send_signal(signum)


def main(argv=None) -> None:
    os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = "SIGHUP,SIGQUIT"  # SIGTERM and SIGINT are ours (above)
    with one_line_errors("launch"):
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
        from torch.distributed.run import parse_args, run

        args = parse_args(argv)
        for sig in STOP_SIGNALS:
            signal.signal(sig, _pass_to_workers)
        try:
            run(args)
        except ChildFailedError as error:
            rank, failure = min(error.failures.items())
            code = failure.exitcode if failure.exitcode >= 0 else 128 - failure.exitcode  # killed: 128 + signal
            why = "stopped by a signal after saving" if code in (128 + s for s in STOP_SIGNALS) else "failed"
            print(f"launch: rank {rank} {why} (exit code {code}); its own lines above say more", file=sys.stderr)
            sys.exit(code)


if __name__ == "__main__":
    main()
