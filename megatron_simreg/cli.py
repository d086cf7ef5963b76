"""What every entry point does with an error a user can fix, Ctrl-C and SIGTERM: one line, no traceback.

    def main(argv=None):
        with one_line_errors("export_hf"):
            ...  # heavy imports inside, so Ctrl-C while they load is covered too

A known error becomes `program: message` on stderr and exit code 1; Ctrl-C (SIGINT) and SIGTERM become one
line and 128 + the signal (130, 143), after the cleanup their exception unwinds through. Any other exception
is a bug and keeps its traceback. This module imports nothing heavy, so it is entered before torch loads.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

# The errors that say what the user must change: (module, class). An error can be one of these only if its module
# was imported, so the list names them without importing anything.
USER_ERRORS = (
    ("builtins", "ValueError"),  # ConfigError, StudyError, AdaGCStateMissing, UnwritablePath, NotATokenizer, ...
    ("builtins", "FileNotFoundError"),
    ("builtins", "FileExistsError"),
    ("builtins", "NotADirectoryError"),
    ("builtins", "PermissionError"),
    ("builtins", "ImportError"),  # an optional package missing, with the pip command to install it
    ("yaml", "YAMLError"),
    ("megatron_simreg.checkpoint", "CheckpointError"),
    ("megatron_simreg.failures", "TrainingError"),
    ("megatron_simreg.evaluate", "EvaluationError"),
    ("megatron_simreg.data.offline_corpus", "OfflineCorpusError"),
)


class Stopped(KeyboardInterrupt):
    """SIGTERM or Ctrl-C raised where the program is, as KeyboardInterrupt, so the same cleanup runs. Ctrl-C too,
    because a plain KeyboardInterrupt leaving code run from a string (the methods dataclasses and namedtuple
    make, megatron-core's imports are full of them) is flagged by CPython as unhandled, and under `python -m` the
    process then ends by SIGINT whatever exit code the program chose; CPython flags the exact type only."""

    def __init__(self, signum: int, message: str = ""):
        super().__init__(*[message] if message else [])  # str(stop): the message, or "" for one_line_errors' own
        self.signum = signum


def _raise_stopped(signum, frame):
    raise Stopped(signum)


def _user_errors() -> tuple[type, ...]:
    return tuple(getattr(sys.modules[module], name) for module, name in USER_ERRORS if module in sys.modules)


@contextlib.contextmanager
def one_line_errors(program: str):
    """Known errors, Ctrl-C and SIGTERM inside the block end the program with one line (see the module)."""
    main_thread = threading.current_thread() is threading.main_thread()
    signals = (signal.SIGINT, signal.SIGTERM) if main_thread else ()
    previous = {signum: signal.signal(signum, _raise_stopped) for signum in signals}
    try:
        yield
    except KeyboardInterrupt as stop:  # a message in it (set by the program) says what was kept or removed
        signum = getattr(stop, "signum", signal.SIGINT)
        detail = str(stop) or f"interrupted by {signal.Signals(signum).name} (exit code {128 + signum})"
        print(f"{program}: {detail}", file=sys.stderr)
        raise SystemExit(128 + signum) from None
    except Exception as error:
        if not isinstance(error, _user_errors()):
            raise
        code = getattr(error, "exit_code", 1)  # training stopped by a signal: 128 + it, after saving
        if code == 1:
            raise SystemExit(f"{program}: {error}") from None
        if int(os.environ.get("RANK", "0")) == 0:  # every rank stops alike; one of them says so
            print(f"{program}: {error}", file=sys.stderr)
        raise SystemExit(code) from None
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
