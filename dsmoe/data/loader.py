"""Batches of (input, next-token target) rows for training and evaluation.

`TokenBatches` reads a prepared token array and makes each batch a pure function of its index, so
resuming is just passing the same index again, and a batch at world size W is exactly the world=1
batch of W times the rows, split between ranks. Corpora that are never prepared stream through
dsmoe.data.streaming instead.
"""

from __future__ import annotations

import numpy as np
import torch

Batch = tuple[torch.Tensor, torch.Tensor]


def _check_layout(seq_len: int, micro_batch: int, rank: int, world: int) -> None:
    if seq_len < 1 or micro_batch < 1:
        raise ValueError(f"seq_len ({seq_len}) and micro_batch ({micro_batch}) must be positive")
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, world={world}), got {rank}")


def _windows_in(n_tokens: int, seq_len: int) -> int:
    """Non-overlapping windows of seq_len + 1 tokens at stride seq_len (each target row's last
    token is the next window's first input token)."""
    return max(n_tokens - 1, 0) // seq_len


def _gather(tokens: np.ndarray, windows: np.ndarray, seq_len: int) -> Batch:
    starts = windows.astype(np.int64) * seq_len
    rows = np.asarray(tokens[starts[:, None] + np.arange(seq_len + 1)], dtype=np.int64)
    rows = torch.from_numpy(rows)
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


class TokenBatches:
    """Random-order windows over a 1-D token array, sharded across ranks.

    Window positions p = 0, 1, 2, ... run over epochs: position p is window
    perm(epoch = p // windows_per_epoch)[p % windows_per_epoch], with perm a permutation drawn from
    a generator seeded with seed + epoch. Global batch `index` holds positions
    [index * world * micro_batch, (index + 1) * world * micro_batch); rank r takes its r-th slice of
    micro_batch rows.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, micro_batch: int, *, rank: int = 0,
                 world: int = 1, seed: int = 0) -> None:
        _check_layout(seq_len, micro_batch, rank, world)
        if tokens.ndim != 1:
            raise ValueError(f"tokens must be a 1-D array, got shape {tokens.shape}")
        self.tokens = tokens
        self.seq_len, self.micro_batch, self.rank, self.world, self.seed = seq_len, micro_batch, rank, world, seed
        self.windows_per_epoch = _windows_in(len(tokens), seq_len)
        if self.windows_per_epoch < 1:
            raise ValueError(f"the token stream has {len(tokens)} tokens, fewer than one window of "
                             f"seq_len + 1 = {seq_len + 1}; use a shorter seq_len or more data")
        self._permutations: dict[int, np.ndarray] = {}

    @property
    def global_batch(self) -> int:
        return self.world * self.micro_batch

    def rows(self, first: int) -> Batch:
        """This rank's (x, y) int64 [micro_batch, seq_len] of the global micro-step starting at window
        position `first` (a count of samples, layout-free): rank r takes positions
        first + r*micro_batch ... first + (r+1)*micro_batch - 1."""
        if first < 0:
            raise ValueError(f"sample position must be >= 0, got {first}")
        start = first + self.rank * self.micro_batch
        positions = np.arange(start, start + self.micro_batch, dtype=np.int64)
        epochs, offsets = np.divmod(positions, self.windows_per_epoch)
        windows = np.empty_like(positions)
        for epoch in np.unique(epochs):  # one epoch, or two when the batch straddles a boundary
            mask = epochs == epoch
            windows[mask] = self._permutation(int(epoch))[offsets[mask]]
        return _gather(self.tokens, windows, self.seq_len)

    def batch(self, index: int) -> Batch:
        """This rank's rows of global batch `index` (= rows(index * world * micro_batch))."""
        if index < 0:
            raise ValueError(f"batch index must be >= 0, got {index}")
        return self.rows(index * self.global_batch)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._permutations:
            if len(self._permutations) >= 2:  # a batch needs at most two epochs
                self._permutations.pop(next(iter(self._permutations)))
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._permutations[epoch] = torch.randperm(self.windows_per_epoch, generator=generator).numpy()
        return self._permutations[epoch]


def val_batches(val_tokens: np.ndarray, seq_len: int, micro_batch: int, n_batches: int) -> list[Batch]:
    """A fixed list of up to `n_batches` evaluation batches from evenly spaced windows, the same on
    every call and every rank (fewer when the split holds fewer windows)."""
    _check_layout(seq_len, micro_batch, 0, 1)
    if n_batches < 1:
        raise ValueError(f"n_batches must be positive, got {n_batches}")
    n_windows = _windows_in(len(val_tokens), seq_len)
    n_batches = min(n_batches, n_windows // micro_batch)
    if n_batches == 0:
        raise ValueError(f"the validation split has {len(val_tokens)} tokens, fewer than micro_batch "
                         f"({micro_batch}) windows of seq_len + 1 = {seq_len + 1}; raise val_fraction "
                         f"or lower seq_len / micro_batch")
    count = n_batches * micro_batch
    x, y = _gather(val_tokens, np.arange(count, dtype=np.int64) * n_windows // count, seq_len)
    return [(x[i:i + micro_batch], y[i:i + micro_batch]) for i in range(0, count, micro_batch)]
