"""torchrun, with the exit status of a stopped run: `python -m megatron_simreg.launch` takes torchrun's arguments.

    python -m megatron_simreg.launch --standalone --nproc-per-node 8 -m megatron_simreg.train --config ...

torchrun answers SIGTERM and Ctrl-C with a SignalException traceback and exit code 1, and kills its workers 30 s
after passing the signal on, however long their checkpoint takes; so a requeue script sees a failure. Here the
launcher passes SIGTERM and SIGINT to the workers (torchrun starts them in sessions of their own, out of reach of
a terminal's Ctrl-C) and waits while they finish the step and save; then it exits as they did: 143 or 130, with
one line. Any worker's failure ends in one line too, naming the rank and its exit code, which the launcher
exits with. The rest is torch.distributed.run itself.
"""

import signal
import sys

from megatron_simreg.cli import Stopped, one_line_errors

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
received = []  # the stop signals passed on, first first


def _pass_to_workers(signum, frame) -> None:
    """The workers are this process's children (torchrun's agent runs in it); each one saves and exits 128 + signum."""
    import psutil

    received.append(signum)
    workers = psutil.Process().children()
    if not workers:  # before the workers start: stop here
        raise Stopped(signum, f"interrupted by {signal.Signals(signum).name} before the workers started "
                              f"(exit code {128 + signum})")
    for worker in workers:
        worker.send_signal(signum)


def main(argv=None) -> None:
    with one_line_errors("launch"):
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
        from torch.distributed.run import parse_args, run

        args = parse_args(argv)
        args.signals_to_handle = "SIGHUP,SIGQUIT"  # torchrun's own handling; SIGTERM and SIGINT are ours (above)
        for sig in STOP_SIGNALS:
            signal.signal(sig, _pass_to_workers)
        try:
            run(args)
        except ChildFailedError as error:
            codes = {rank: f.exitcode if f.exitcode >= 0 else 128 - f.exitcode for rank, f in error.failures.items()}
            rank, code = min(codes.items())
            if received and 128 + received[0] in codes.values():  # torchrun sends SIGTERM to those left after one
                code = 128 + received[0]
            if code in [128 + s for s in STOP_SIGNALS]:  # a signal to this process, or to the workers (launch.sh)
                print(f"launch: the workers stopped on {signal.Signals(code - 128).name} after saving; exit code "
                      f"{code}, run the same command to resume", file=sys.stderr)
            else:
                print(f"launch: rank {rank} failed with exit code {code} (its own output says why)", file=sys.stderr)
            sys.exit(code)


if __name__ == "__main__":
    main()
