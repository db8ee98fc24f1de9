"""Memory measurements: the bytes a real forward pass keeps for backward.

The analytic ledger these check lives in dsmoe.tools.memory; the simulated rehearsal of a whole step
in dsmoe.tools.simulate.
"""
from __future__ import annotations

from itertools import chain
from typing import Callable, Optional

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

class _StorageLog(TorchDispatchMode):
    """Weak references to the storage of every tensor an op makes while it is active."""

    def __init__(self):
        super().__init__()
        self.made: list[tuple[StorageWeakRef, int, int]] = []  # (storage, data_ptr, bytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                self.made.append((StorageWeakRef(st), st.data_ptr(), st.nbytes()))
        return out


def saved_tensor_bytes(fn: Callable[[], object], model: torch.nn.Module) -> int:
    """Bytes a forward keeps for backward, each storage counted once. `fn()` runs the forward and returns
    its loss only (which keeps the graph alive; logits it drops are not counted).

    Counted: what autograd saves (its saved-tensor hooks see it, a non-reentrant checkpoint's inputs and
    tensors made before `fn` such as the targets included), and every other storage made during `fn` that
    outlives it once autocast's weight-cast cache is cleared (the trainer leaves autocast before backward):
    what selective checkpointing caches beside the graph. Parameters and buffers are excluded (they are
    counted as parameters); autocast's weight copies that backward uses are included."""
    inner = getattr(model, "module", model)
    exclude = {t.untyped_storage().data_ptr() for t in chain(inner.parameters(), inner.buffers())}
    storages: dict[int, int] = {}
    held = []  # keep every packed tensor alive so no address is reused before we finish

    def count(ptr: int, nbytes: int) -> None:
        if ptr not in exclude and ptr != 0:
            storages[ptr] = max(storages.get(ptr, 0), nbytes)

    def pack(t: torch.Tensor) -> torch.Tensor:
        held.append(t)
        count(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    log = _StorageLog()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), log:
        loss = fn()
    torch.clear_autocast_cache()
    exclude.add(loss.untyped_storage().data_ptr())  # alive because returned, not because backward needs it
    for ref, ptr, nbytes in log.made:
        if not ref.expired():
            count(ptr, nbytes)
    total = sum(storages.values())
    held.clear()
    del loss
    return total


def measure_saved_activation_bytes(model: torch.nn.Module, batch, block_fn: Optional[Callable] = None) -> int:
    """Bytes of the tensors a real dsmoe forward pass keeps for backward under an activation-checkpointing
    `block_fn` (see saved_tensor_bytes).

    `batch` is (idx, targets) or idx alone (targets = idx). Run it inside `torch.autocast` to measure
    mixed precision.
    """
    idx, targets = batch if isinstance(batch, (tuple, list)) else (batch, batch)
    return saved_tensor_bytes(lambda: model(idx, targets, block_fn=block_fn).loss, model)
