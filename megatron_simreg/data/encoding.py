"""Tokenize documents in worker processes, keeping their order, so any number of workers writes the same bytes.

Each document comes back as its UTF-8 size and a token array ending in EOD, already in the dtype the
indexed dataset stores: the main process only reads text and writes arrays.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import signal
import warnings
from collections.abc import Iterable, Iterator

import numpy

from megatron_simreg.data.tokenizer import build_tokenizer

BATCH_DOCUMENTS = 64  # documents per task: few IPC round trips, small enough to keep every worker busy


class DocumentEncoder:
    """`with DocumentEncoder(path, dtype, workers) as encode: for size, tokens in encode(documents): ...`

    One worker encodes in this process; more fork a pool (they inherit the loaded libraries rather than
    importing torch again). Each encodes with the same megatron-core tokenizer `build_tokenizer` returns,
    so the data holds exactly the ids `tokenizer.tokenize` gives.
    """

    def __init__(self, tokenizer_path: str, dtype, workers: int):
        if workers < 1:
            raise ValueError(f"workers={workers}: use 1 or more tokenizer worker processes")
        self.tokenizer_path, self.dtype, self.workers, self.pool = tokenizer_path, dtype, workers, None

    def __enter__(self):
        if self.workers == 1:
            _init_worker(self.tokenizer_path, self.dtype, in_pool=False)
            mapper = map
        else:
            methods = multiprocessing.get_all_start_methods()
            context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
            with warnings.catch_warnings(), _stop_signals_held():
                # torch/numpy leave idle native threads; the children only tokenize, touching none of their locks.
                warnings.filterwarnings("ignore", message=r".*use of fork\(\) may lead to deadlocks",
                                        category=DeprecationWarning)
                self.pool = context.Pool(self.workers, _init_worker, (self.tokenizer_path, self.dtype, True))
            mapper = self.pool.imap

        def encode(documents: Iterable[str]) -> Iterator[tuple[int, numpy.ndarray]]:
            for encoded in mapper(_encode_batch, _batches(documents)):
                yield from encoded

        return encode

    def __exit__(self, *exc):
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


def _batches(documents: Iterable[str]) -> Iterator[list[str]]:
    batch = []
    for document in documents:
        batch.append(document)
        if len(batch) == BATCH_DOCUMENTS:
            yield batch
            batch = []
    if batch:
        yield batch


_TOKENIZER = None
_DTYPE = None


STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


@contextlib.contextmanager
def _stop_signals_held():
    """Ctrl-C and SIGTERM held back (pending, not lost) while the pool forks its workers: a forked worker runs
    the main process's handlers until `_init_worker` replaces them, and one that ran there could raise inside
    code CPython runs at fork and drops exceptions from, leaving a worker alive that Pool.terminate meant to end
    (the main process then waits for it forever). Each worker lets them through once its own handlers are set;
    threads the pool starts meanwhile keep them held, so they reach the main thread, as Python's handlers do."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def _init_worker(tokenizer_path: str, dtype, in_pool: bool) -> None:
    global _TOKENIZER, _DTYPE
    if in_pool:
        # Ctrl-C and Slurm's SIGTERM are the main process's to handle: it stops the pool and cleans up.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # held since the fork (_stop_signals_held)
    _TOKENIZER, _DTYPE = build_tokenizer(tokenizer_path), dtype


def _encode_batch(texts: list[str]) -> list[tuple[int, numpy.ndarray]]:
    eod = _TOKENIZER.eod
    return [
        (len(text.encode("utf-8")), numpy.array([*_TOKENIZER.tokenize(text), eod], dtype=_DTYPE))
        for text in texts
    ]
