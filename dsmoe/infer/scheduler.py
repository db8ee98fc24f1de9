"""Continuous batching: one thread owns the model and decodes every live request together.

Requests wait in a queue; between two decode steps the thread drops the sequences whose clients left,
gives waiting ones the free rows of the Batch, prefills (a chunk of) their prompts, then decodes one
token for every decoding row. A row whose sampling fails ends alone (dsmoe.infer.engine); a step that
raises ends the requests in it with an error, and the server goes on. A request's
output depends only on its own prompt, settings and seed (each row samples from its own generator and
routing never drops tokens), so it is the same alone or batched with others.
"""
from __future__ import annotations

import collections
import logging
import threading
from typing import Optional

from dsmoe.infer.engine import Batch, Sequence

log = logging.getLogger("dsmoe.serve")


class QueueFull(RuntimeError):
    """More requests are waiting than the scheduler accepts; the client should retry later."""


class Scheduler:
    """Drives `batch` from a daemon thread (`start`/`stop`). `submit` and `cancel` are thread-safe;
    a sequence's listener is called from the decoding thread."""

    def __init__(self, batch: Batch, max_waiting: int = 256):
        self.batch, self.max_waiting = batch, max_waiting
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._cancelled: set[Sequence] = set()
        self._cv = threading.Condition()
        self._stopping = False
        self._thread: Optional[threading.Thread] = None
        self.finished = collections.Counter()  # finish reason -> sequences
        self.peak_batch = 0  # most rows decoded in one step
        self.steps = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="dsmoe-decode", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join()

    def submit(self, seq: Sequence) -> None:
        """Queue `seq`; raises QueueFull when max_waiting requests already wait."""
        with self._cv:
            if len(self._waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting: retry later")
            self._waiting.append(seq)
            self._cv.notify()

    def cancel(self, seq: Sequence) -> None:
        """The client left: drop `seq` before the next step (its row is freed)."""
        with self._cv:
            if seq in self._waiting:
                self._waiting.remove(seq)
                seq.finish_reason = "cancelled"
                self.finished["cancelled"] += 1
            elif not seq.finished:
                self._cancelled.add(seq)
                self._cv.notify()

    def snapshot(self) -> dict:
        with self._cv:
            waiting = len(self._waiting)
        return {"running": len(self.batch.rows) + len(self.batch.prefilling), "waiting": waiting, "slots": self.batch.cache.batch,
                "peak_batch": self.peak_batch, "steps": self.steps, "finished": dict(self.finished)}

    def _run(self) -> None:
        while True:
            with self._cv:
                while not (self._stopping or self._waiting or self._cancelled or self.batch.busy):
                    self._cv.wait()
                if self._stopping:
                    return
                cancelled, self._cancelled = self._cancelled, set()
            for seq in cancelled:
                if seq in self.batch.rows or seq in self.batch.prefilling:
                    self.batch.remove(seq, "cancelled")
            with self._cv:
                new = [self._waiting.popleft() for _ in range(min(self.batch.free, len(self._waiting)))]
            live = (list(self.batch.rows) + list(self.batch.prefilling) + new
                    + [s for s in cancelled if s.finish_reason == "cancelled"])
            try:
                self.batch.add(new)
                if self.batch.busy:
                    self.batch.step()
                    self.steps += 1
                self.peak_batch = max(self.peak_batch, len(self.batch.rows))
            except Exception:  # a failing step must not end the server: fail its requests, keep serving
                log.exception("decoding failed; its requests end with an error")
                for seq in list(self.batch.rows) + list(self.batch.prefilling):
                    self.batch.remove(seq, "error")
                for seq in new:
                    if not seq.finished:
                        self.batch.finish(seq, "error")
            self.finished.update(s.finish_reason for s in live if s.finished)
