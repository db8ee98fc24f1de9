"""The input pipeline off the critical path: the next micro-batch is built on a background thread (in
pinned host memory on CUDA, so its copy to the device is asynchronous) while the current one trains."""
from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Optional

import torch

Batch = tuple[torch.Tensor, torch.Tensor]


class Prefetcher:
    """`fetch(position) -> (x, y)` on the host; `get(position, next_position)` returns the batch at
    `position` on the device and starts building `next_position`'s. A position other than the one
    prefetched (a rollback, localisation's replay) is built at once: batches stay a pure function of
    their position."""

    def __init__(self, fetch: Callable[[int], Batch], device: torch.device):
        self.fetch, self.device = fetch, device
        self.pin = device.type == "cuda"
        self.lock = threading.Lock()  # the loader's permutation cache is not thread-safe
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="dsmoe-prefetch")
        self.pending: Optional[tuple[int, Future]] = None

    def _load(self, position: int) -> Batch:
        with self.lock:
            x, y = self.fetch(position)
        return (x.pin_memory(), y.pin_memory()) if self.pin else (x, y)

    def get(self, position: int, next_position: Optional[int] = None) -> Batch:
        if self.pending is not None and self.pending[0] == position:
            x, y = self.pending[1].result()
        else:
            x, y = self._load(position)
        self.pending = (next_position, self.pool.submit(self._load, next_position)) if next_position is not None \
            else None
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
