"""Expert-parallel training state: which parameters are expert shards and how their gradients are
reduced.

Rank r = edp_index * ep + ep_rank holds routed experts [ep_rank * E/ep, (ep_rank + 1) * E/ep) of every
MoE layer. Gradients: each rank's loss is the mean over its own b sequences, and the single-process
reference is the mean over world * b sequences, i.e. (1/world) * sum of the ranks' losses. The
all-to-all backward already sums, into each expert shard, the gradients of every rank of its EP group;
summing those over the edp group adds the other replicas' tokens, and dividing by world gives the
gradient of the global mean. (DDP's average over the world does the same for replicated weights.)

Checkpoints present each stack as a DTensor over an (ep, edp) mesh (dsmoe.checkpoint.sharded.
ShardedState), so they hold every expert at its single-process shape whatever ep wrote them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist

from dsmoe.parallel.fsdp import local
from dsmoe.parallel.mesh import Mesh

EXPERT_MARK = ".ffn.experts."  # routed-expert stacks: layers.{i}.ffn.experts.{w_gate,w_up,w_down}


def is_expert_param(name: str) -> bool:
    return EXPERT_MARK in name


@dataclass
class ExpertShards:
    """The routed-expert parameters of a model whose experts are split over the EP group."""

    mesh: Mesh
    n_experts: int
    names: list[str]
    params: list[torch.Tensor]
    _buckets: Optional["_GradBuckets"] = None  # set by reduce_in_backward

    @classmethod
    def of(cls, model: torch.nn.Module, mesh: Mesh, n_experts: int) -> "ExpertShards":
        named = [(n, p) for n, p in model.named_parameters() if is_expert_param(n)]
        shards = cls(mesh, n_experts, [n for n, _ in named], [p for _, p in named])
        for n, p in named:
            if p.shape[0] != shards.n_local:
                raise ValueError(f"{n} holds {p.shape[0]} experts, expected {shards.n_local} "
                                 f"(moe.n_routed_experts={n_experts} over parallel.ep={mesh.ep})")
        return shards

    @property
    def n_local(self) -> int:
        return self.n_experts // self.mesh.ep

    @property
    def rows(self) -> slice:
        first = self.mesh.ep_rank * self.n_local
        return slice(first, first + self.n_local)

    # ------------------------------------------------------------------ gradients

    def reduce_in_backward(self, sync: Callable[[], bool], bucket_mb: float = 25.0) -> None:
        """Start the edp all-reduces during backward: each bucket (expert tensors of at most `bucket_mb`
        MiB together, a bigger tensor alone) is reduced as soon as backward has produced all its
        gradients, while backward goes on; `reduce_grads` then only waits, and divides. As DDP's
        reducer does for the replicated weights.

        `sync()`: whether the backward now running is the optimizer step's last (DDP's
        `require_backward_grad_sync`, which its `no_sync()` clears on the other micro-steps); only then
        are buckets reduced. Buckets are launched in one fixed order on every rank (a bucket waits for
        the ones before it), so the collectives match across ranks whatever order backward finishes
        them in. Nothing to do when edp is 1. Under FSDP2 the experts' reduce-scatter does this itself."""
        if self.mesh.edp > 1 and self._buckets is None:
            self._buckets = _GradBuckets(self.params, self.mesh.edp_group, sync, int(bucket_mb * 2 ** 20))

    def reduce_grads(self, edp_averaged: bool = False) -> None:
        """Sum over the ranks holding the same experts (edp), then divide by world (see module doc).

        Call once per optimizer step, after the last micro-batch's backward (never on no_sync
        micro-steps). Waits for the buckets `reduce_in_backward` started; without it, one all-reduce
        per expert tensor, all in flight together. Under FSDP the reduce-scatter over edp has already
        averaged (`edp_averaged`): only the 1/ep is left."""
        grads = [local(p.grad) for p in self.params if p.grad is not None]
        if not grads:
            return
        if edp_averaged:
            torch._foreach_div_(grads, float(self.mesh.ep))
            return
        if self._buckets is not None:
            self._buckets.wait()
        elif self.mesh.edp > 1:
            works = [dist.all_reduce(g, group=self.mesh.edp_group, async_op=True) for g in grads]
            for w in works:
                w.wait()
        torch._foreach_div_(grads, float(self.mesh.world))


class _GradBuckets:
    """Expert gradients all-reduced over edp in buckets, launched from backward's grad hooks."""

    def __init__(self, params: list, group, sync: Callable[[], bool], cap_bytes: int):
        self.buckets, size = [[]], 0
        for p in reversed(params):  # backward produces the last layers' gradients first
            nbytes = p.numel() * p.element_size()
            if self.buckets[-1] and size + nbytes > cap_bytes:
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(p)
            size += nbytes
        self.bucket_of = {id(p): i for i, bucket in enumerate(self.buckets) for p in bucket}
        self.group, self.sync = group, sync
        self.hooks = [p.register_post_accumulate_grad_hook(self._ready) for p in params]
        self._reset()

    def _reset(self) -> None:
        self.missing = [len(b) for b in self.buckets]  # gradients each bucket still waits for
        self.launched = 0  # buckets 0 .. launched-1 are in flight
        self.inflight: list = []  # (work, flat buffer or None, gradients)

    def _ready(self, p: torch.Tensor) -> None:
        if not self.sync():
            return
        self.missing[self.bucket_of[id(p)]] -= 1
        while self.launched < len(self.buckets) and not self.missing[self.launched]:
            self._launch()

    def _launch(self) -> None:
        grads = [local(p.grad) for p in self.buckets[self.launched] if p.grad is not None]
        self.launched += 1
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads]) if len(grads) > 1 else None  # one collective
        work = dist.all_reduce(grads[0] if flat is None else flat, group=self.group, async_op=True)
        self.inflight.append((work, flat, grads))

    def wait(self) -> None:
        """Launch the buckets backward left (gradients it did not produce), wait for all, unflatten."""
        while self.launched < len(self.buckets):
            self._launch()
        for work, flat, grads in self.inflight:
            work.wait()
            if flat is not None:
                parts = flat.split([g.numel() for g in grads])
                torch._foreach_copy_(grads, [part.view_as(g) for part, g in zip(parts, grads)])
        self._reset()
