"""Memory measurements: the bytes a real forward pass keeps for backward.

The analytic ledger these check lives in dsmoe.tools.memory; the simulated rehearsal of a whole step
in dsmoe.train.simulate.
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


# ----------------------------------------------------------------------------- one step, by category


class _Propagating:
    """Marks DTensor's sharding propagation, which runs each op on whole-size fake tensors under the active
    fake mode to learn output shapes: metadata, not memory any rank holds. DTensor serialises that work
    under `ShardingPropagator._fake_mode_lock`, a context manager meant to be replaced (a lock in
    multi-threaded use); this one counts how deep inside it the process is."""

    def __init__(self):
        self.depth = 0

    def __enter__(self):
        self.depth += 1

    def __exit__(self, *exc):
        self.depth -= 1


def _tracker_class(base: type) -> type:
    """`base` (MemTracker or FSDPMemTracker) that skips DTensor's shape propagation and keeps only the
    whole rank's peak: the stock peak update also scans every module's statistics on every op, which
    makes a step of a 24-layer model cost minutes on fake tensors."""

    class Tracker(base):
        propagating = _Propagating()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if self.propagating.depth:
                return func(*args, **(kwargs or {}))
            return super().__torch_dispatch__(func, types, args, kwargs)

        def _update_peak_stats(self, peak_state) -> None:
            for dev, snap in self._curr_mem_snap.items():
                if self._peak_mem.get(dev, 0) < snap["Total"]:
                    self._peak_mem[dev] = snap["Total"]
                    self._peak_mem_snap[dev] = dict(snap)

    return Tracker


class StepMemory:
    """Peak memory of a training step by category, from torch's memory tracker
    (torch.distributed._tools: FSDPMemTracker for an FSDP2 model, MemTracker otherwise), on real or fake
    tensors. Use as a context manager around the step and call `micro_step_done()` after each micro-step's
    backward; `peak()` gives bytes per CATEGORIES and their total at the rank's peak.

    `gradients`: tensors to book as gradients from the start (DDP's buckets, which the gradients only
    view from their first backward on)."""

    CATEGORIES = ("parameters", "gathered", "gradients", "optimizer", "activations", "buffers")
    # the trackers' reference types -> CATEGORIES ("Other": what `gradients` registered before a
    # gradient claims it)
    _KINDS = {"Parameter": "parameters", "Sharded Param": "parameters", "Unsharded Param": "gathered",
              "All Gather": "gathered", "Gradient": "gradients", "Sharded Grad": "gradients",
              "Unsharded Grad": "gradients", "Reduce Scatter": "gradients", "Other": "gradients",
              "Optstate": "optimizer", "OptState": "optimizer", "Activation": "activations",
              "Temp": "activations", "Inputs": "activations", "Buffer": "buffers"}

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, fsdp: bool,
                 gradients: tuple = ()):
        from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
        from torch.distributed._tools.mem_tracker import MemTracker

        self.model, self.fsdp = model, fsdp
        if fsdp:
            self.tracker = _tracker_class(FSDPMemTracker)(model, optimizer)
        else:
            self.tracker = _tracker_class(MemTracker)()
            self.tracker.track_external(model, optimizer, *gradients)

    def __enter__(self) -> "StepMemory":
        from torch.distributed.tensor._sharding_prop import ShardingPropagator

        self._lock = ShardingPropagator._fake_mode_lock
        ShardingPropagator._fake_mode_lock = self.tracker.propagating
        self.tracker.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        from torch.distributed.tensor._sharding_prop import ShardingPropagator

        self.tracker.__exit__(*exc)
        ShardingPropagator._fake_mode_lock = self._lock

    def micro_step_done(self) -> None:
        """The trackers refuse a second forward of the root module: forget the per-module statistics
        (the peak stays). Under FSDP2 gradient accumulation the unsharded fp32 gradients kept between
        micro-steps are made in post-backward, which the tracker books as temporaries: book them as
        gradients."""
        self.tracker.reset_mod_stats()
        if not self.fsdp:
            return
        from torch.distributed._tools.fsdp2_mem_tracker import _FSDPRefType
        from torch.distributed.fsdp import FSDPModule

        for module in self.model.modules():
            group = module._get_fsdp_state()._fsdp_param_group if isinstance(module, FSDPModule) else None
            for fsdp_param in group.fsdp_params if group is not None else ():
                if fsdp_param.unsharded_accumulated_grad is not None:
                    self.tracker._update_and_maybe_create_winfos(fsdp_param.unsharded_accumulated_grad,
                                                                 _FSDPRefType.UNSHARDED_GRAD)

    def peak(self) -> dict:
        """Bytes per category at the peak, and "total"."""
        out = dict.fromkeys(self.CATEGORIES, 0)
        for snap in self.tracker.get_tracker_snapshot("peak").values():
            for kind, nbytes in snap.items():
                if kind != "Total":
                    out[self._KINDS[kind.value]] += nbytes
        out["total"] = sum(out[c] for c in self.CATEGORIES)
        return out
