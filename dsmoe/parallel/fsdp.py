"""FSDP2 (`fully_shard`): every block and the root sharded over the world, or HSDP (replicate x shard);
under expert parallelism the routed-expert stacks are sharded over edp (the ranks holding the same
experts) as their own FSDP units.

Gradients match DDP's: the dense parameters' reduce-scatter averages over the world. An expert
shard's gradient already sums its EP group's tokens (the all-to-all backward); the reduce-scatter
over edp averages in the other replicas', and ExpertShards.reduce_grads divides by ep to make it the
world's mean (a divide factor on the reduce-scatter would need PREMUL_SUM, which gloo lacks).
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from dsmoe.config import ConfigError, ParallelConfig
from dsmoe.parallel.mesh import Mesh

_PARAM_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16}


def dense_mesh(mesh: Mesh, replicate: int) -> DeviceMesh:
    """The world as a 1-D mesh, or (replicate, shard) for HSDP."""
    if mesh.world % replicate:
        raise ConfigError(f"parallel.replicate={replicate} does not divide the world size {mesh.world}: "
                          f"launch a multiple of {replicate} processes or change parallel.replicate")
    if replicate > 1:
        return init_device_mesh(mesh.device.type, (replicate, mesh.world // replicate),
                                mesh_dim_names=("replicate", "shard"))
    return DeviceMesh.from_group(dist.group.WORLD, mesh.device.type)


def apply_fsdp(model: torch.nn.Module, mesh: Mesh, p: ParallelConfig, precision: str) -> torch.nn.Module:
    """Shard `model` in place (its class changes; the object stays): experts over edp, each router, each
    block, then the root (embeddings, final norm, head).

    Under bf16/fp16 the parameters are gathered in that dtype and gradients reduced in fp32. The
    numerics stay DDP's under autocast: no forward input is cast (`cast_forward_inputs=False`), the
    embedding's output is made fp32 (an fp32 residual stream, as DDP's fp32 embedding gives), and each
    router is its own unit gathered in fp32 (routing decisions on fp32 weights)."""
    dense = dense_mesh(mesh, p.replicate)
    experts_mesh = DeviceMesh.from_group(mesh.edp_group, mesh.device.type) if mesh.ep > 1 else None
    kwargs = {"reshard_after_forward": p.reshard_after_forward}
    if precision in _PARAM_DTYPE:  # compute in half precision, reduce gradients in fp32
        kwargs = {**kwargs, "mp_policy": MixedPrecisionPolicy(param_dtype=_PARAM_DTYPE[precision],
                                                              reduce_dtype=torch.float32, cast_forward_inputs=False)}
    if p.cpu_offload:
        if mesh.device.type != "cuda":
            raise ConfigError("parallel.cpu_offload moves GPU parameters to the host: it needs CUDA; "
                              "set parallel.cpu_offload=false on a CPU run")
        kwargs["offload_policy"] = CPUOffloadPolicy()
    router_kwargs = {k: v for k, v in kwargs.items() if k != "mp_policy"}
    for block in model.layers:
        if getattr(block, "is_moe", False):
            if experts_mesh is not None:
                fully_shard(block.ffn.experts, mesh=experts_mesh, **kwargs)
            fully_shard(block.ffn.router, mesh=dense, **router_kwargs)
        fully_shard(block, mesh=dense, **kwargs)
    fully_shard(model, mesh=dense, **kwargs)
    if "mp_policy" in kwargs:
        model.tok_embeddings.register_forward_hook(lambda module, args, out: out.float())
    return model


@contextlib.contextmanager
def no_gradient_sync(model: torch.nn.Module):
    """Accumulate unreduced gradients on this micro-step (FSDP's `no_sync`)."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def local(t):
    """This rank's part of a DTensor; a plain tensor as it is."""
    return t.to_local() if isinstance(t, DTensor) else t


def full(t):
    """The whole tensor (a collective for a DTensor: every rank of its mesh must call it)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def shard_like(value: torch.Tensor, like) -> torch.Tensor:
    """`value` (whole, on every rank) laid out like `like`: its DTensor shard, or itself."""
    if isinstance(like, DTensor):
        return distribute_tensor(value.to(like.device, like.dtype), like.device_mesh, like.placements,
                                 src_data_rank=None)  # every rank has the whole value: slice, no communication
    return value


@torch.no_grad()
def place_shard(param: torch.Tensor, whole: torch.Tensor) -> None:
    """Copy this rank's shard of a whole (single-process shaped) tensor into an FSDP parameter."""
    local(param).copy_(local(shard_like(whole, param)))


def grad_norm_sets(model: torch.nn.Module, replicate: int, expert_names: set[str]) -> list[tuple]:
    """(params, group) sets for `clip_grad_norm` over sharded gradients: each set's squared norm of the
    local shards is summed over its group. Expert shards are disjoint over the whole world (edp shards x
    ep experts); dense ones over the shard group (HSDP replicas hold copies, counted once)."""
    dense = [p for n, p in model.named_parameters() if n not in expert_names]
    shard_group = dist.group.WORLD
    if replicate > 1:
        shard_group = dense[0].device_mesh.get_group("shard")
    sets = [(dense, shard_group)]
    experts = [p for n, p in model.named_parameters() if n in expert_names]
    if experts:
        sets.append((experts, dist.group.WORLD))
    return sets


def optional_no_sync(model: torch.nn.Module, fsdp: bool, distributed: bool, last: bool):
    """The context of one micro-step: synchronise gradients only on the last."""
    if last or not distributed:
        return contextlib.nullcontext()
    return no_gradient_sync(model) if fsdp else model.no_sync()
