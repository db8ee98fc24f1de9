"""Tokenize documents in background processes, each document followed by end-of-text.

Workers are stateless (they hold only the tokenizer), so what a stream yields never depends on how
many there are; with `workers=0` the same calls run in the caller's process. Workers are spawned, not
forked (the trainer may already hold CUDA and threads), and import no torch: this module and the
tokenizer are all they load. A worker that dies makes the next result raise BrokenProcessPool rather
than wait forever (why concurrent.futures and not multiprocessing.Pool).
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np

_worker_tokenizer = None


def _init_worker(tokenizer_name: str) -> None:
    global _worker_tokenizer
    from dsmoe.data.tokenizer import get_tokenizer

    _worker_tokenizer = get_tokenizer(tokenizer_name)


def encode_documents(texts: list[str], tokenizer=None) -> list[np.ndarray]:
    """Each text's token ids and end-of-text, as int32 arrays (ids < 2**31 for every tokenizer dsmoe has)."""
    tokenizer = tokenizer or _worker_tokenizer
    eot = tokenizer.eot_id
    return [np.asarray(tokenizer.encode(text) + [eot], dtype=np.int32) for text in texts]


def _worker_died() -> RuntimeError:
    return RuntimeError("a tokenizer worker process died (killed, or out of memory); resume from the last "
                        "checkpoint, with fewer data.workers, or 0 to tokenize in the training process")


class EncodePool:
    """`submit(texts)` returns a Future of `encode_documents(texts)`, computed by `workers` processes
    (0 = at once, in this process)."""

    def __init__(self, tokenizer_name: str, workers: int) -> None:
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        from dsmoe.data.tokenizer import get_tokenizer

        self.tokenizer = get_tokenizer(tokenizer_name)  # fails here, in the caller, on a bad name
        self.workers = workers
        self._executor = None
        if workers:
            self._executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                                 initializer=_init_worker, initargs=(tokenizer_name,))

    def submit(self, texts: list[str]) -> Future:
        if self._executor is not None:
            try:
                return self._executor.submit(encode_documents, texts)
            except BrokenProcessPool as e:
                raise _worker_died() from e
        future: Future = Future()
        future.set_result(encode_documents(texts, self.tokenizer))
        return future

    @staticmethod
    def result(future: Future) -> list[np.ndarray]:
        """The future's token arrays; a dead worker is a RuntimeError saying what to do."""
        try:
            return future.result()
        except BrokenProcessPool as e:
            raise _worker_died() from e

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
