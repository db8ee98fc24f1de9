"""Expert-parallel training state: which parameters are expert shards, how their gradients are
reduced, and a checkpoint that does not depend on the layout.

Rank r = edp_index * ep + ep_rank holds routed experts [ep_rank * E/ep, (ep_rank + 1) * E/ep) of every
MoE layer. Gradients: each rank's loss is the mean over its own b sequences, and the single-process
reference is the mean over world * b sequences, i.e. (1/world) * sum of the ranks' losses. The
all-to-all backward already sums, into each expert shard, the gradients of every rank of its EP group;
summing those over the edp group adds the other replicas' tokens, and dividing by world gives the
gradient of the global mean. (DDP's average over the world does the same for replicated weights.)

Checkpoints: on save the shards (weights and every optimizer tensor shaped like its parameter, e.g.
AdamW's exp_avg / exp_avg_sq) are gathered on rank 0 into full [E, ...] tensors, so the file equals a
single-process checkpoint; on load every rank keeps its rows. Any ep (and ep = 1) can resume it.
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

    # ------------------------------------------------------------------ checkpoints

    def full_shapes(self, model_state: dict) -> dict:
        """The model state with expert tensors at their single-process shapes (meta tensors): what a
        layout-free checkpoint must match."""
        out = dict(model_state)
        for n in self.names:
            v = model_state[n]
            out[n] = torch.empty((self.n_experts, *v.shape[1:]), dtype=v.dtype, device="meta")
        return out

    def _gather(self, local: torch.Tensor):
        """Full [E, ...] tensor on rank 0 (CPU), None elsewhere; only EP group 0 (ranks < ep) takes part."""
        if self.mesh.rank >= self.mesh.ep:
            return None
        local = local.detach().contiguous()
        parts = [torch.empty_like(local) for _ in range(self.mesh.ep)] if self.mesh.rank == 0 else None
        dist.gather(local, parts, dst=0, group=self.mesh.ep_group)
        return torch.cat([p.cpu() for p in parts]) if parts is not None else None

    def gather_state(self, model_state: dict, optim_state: dict, optimizer: torch.optim.Optimizer) -> None:
        """Replace this rank's shards in the two state dicts by full tensors on rank 0 (in place on the
        dicts, never on the live model or optimizer). Every rank must call it, in the same order."""
        index = _param_index(optimizer)
        for name, p in zip(self.names, self.params):
            full = self._gather(model_state[name])
            if full is not None:
                model_state[name] = full
            i = index[id(p)]
            per_param = optim_state["state"].get(i)
            if per_param is None:  # no step taken yet: the same on every rank
                continue
            per_param = dict(per_param)  # state_dict() shares these dicts with the live optimizer
            for key in sorted(per_param):
                v = per_param[key]
                if torch.is_tensor(v) and v.shape == p.shape:
                    full = self._gather(v)
                    if full is not None:
                        per_param[key] = full
            optim_state["state"][i] = per_param

    def take_slice(self, state: dict, optimizer: torch.optim.Optimizer) -> None:
        """Cut a layout-free checkpoint (already checked against `full_shapes`) down to this rank's
        experts, in place on `state`; clones, so the full tensors can be freed."""
        rows = self.rows
        model = state["model"]
        for name in self.names:
            model[name] = model[name][rows].clone()
        index = _param_index(optimizer)
        for p in self.params:
            per_param = state["optimizer"]["state"].get(index[id(p)])
            if per_param is None:
                continue
            for key, v in per_param.items():
                if torch.is_tensor(v) and v.dim() == p.dim() and v.shape[0] == self.n_experts \
                        and v.shape[1:] == p.shape[1:]:
                    per_param[key] = v[rows].clone()


def _param_index(optimizer: torch.optim.Optimizer) -> dict:
    """id(param) -> its index in optimizer.state_dict() (numbered over the param groups in order)."""
    return {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
