"""Expert-parallel training state: which parameters are expert shards and how their gradients are
reduced.

Rank r = edp_index * ep + ep_rank holds routed experts [ep_rank * E/ep, (ep_rank + 1) * E/ep) of every
MoE layer. Gradients: each rank's loss is the mean over its own b sequences, and the single-process
reference is the mean over world * b sequences, i.e. (1/world) * sum of the ranks' losses. The
all-to-all backward already sums, into each expert shard, the gradients of every rank of its EP group;
summing those over the edp group adds the other replicas' tokens, and dividing by world gives the
gradient of the global mean. (DDP's average over the world does the same for replicated weights.)

Checkpoints present each stack as a DTensor over an (ep, edp) mesh (dsmoe.train.sharded_checkpoint.
ShardedState), so they hold every expert at its single-process shape whatever ep wrote them.
"""
from __future__ import annotations

from dataclasses import dataclass

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

    def reduce_grads(self, edp_averaged: bool = False) -> None:
        """Sum over the ranks holding the same experts (edp), then divide by world (see module doc).

        Call once per optimizer step, after the last micro-batch's backward (never on no_sync
        micro-steps). One all-reduce per expert tensor, all in flight together. Under FSDP the
        reduce-scatter over edp has already averaged (`edp_averaged`): only the 1/ep is left."""
        grads = [local(p.grad) for p in self.params if p.grad is not None]
        if not grads:
            return
        if edp_averaged:
            torch._foreach_div_(grads, float(self.mesh.ep))
            return
        if self.mesh.edp > 1:
            works = [dist.all_reduce(g, group=self.mesh.edp_group, async_op=True) for g in grads]
            for w in works:
                w.wait()
        torch._foreach_div_(grads, float(self.mesh.world))
