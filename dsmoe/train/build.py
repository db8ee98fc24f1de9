"""The one place a training model is built and wrapped: meta device, fp8, FSDP2, `to_empty`,
`init_weights`, expert shards, gradient-norm sets, optimizer, then (after any restore) DDP and compile.
The trainer and the simulated rehearsal (dsmoe/train/simulate.py, on fake tensors) both call it.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Optional

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily

from dsmoe.checkpoint.sharded import ShardedState
from dsmoe.config import Config
from dsmoe.model import Transformer
from dsmoe.parallel.dispatch import make_dispatcher
from dsmoe.parallel.expert_state import ExpertShards, is_expert_param
from dsmoe.parallel.fsdp import apply_fsdp, grad_norm_sets, place_shard
from dsmoe.parallel.mesh import Mesh
from dsmoe.parallel.wrap import block_fn_for, compile_blocks, wrap_ddp
from dsmoe.train.optim import build_optimizer
from dsmoe.train.precision import apply_fp8, grad_scaler


@dataclasses.dataclass
class TrainState:
    """What a training step touches, built by `build`."""

    model: torch.nn.Module
    """the bare Transformer (FSDP2-sharded in place under parallel.dp=fsdp)"""
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    """fp16's loss scaler; disabled otherwise"""
    experts: Optional[ExpertShards]
    """this rank's routed-expert shards under parallel.ep > 1, reduced over edp only; else None"""
    param_sets: list
    """[(params, process group or None)]: the sets whose gradient norms make the global norm"""
    sharded: ShardedState
    """the model and optimizer as a sharded (DCP) checkpoint sees them"""
    block_fn: Optional[Callable]
    """how each block runs (activation checkpointing), see block_fn_for"""
    fsdp: bool
    distributed: bool
    precision: str
    """fp32, bf16 or fp16 (resolved, never auto)"""
    device: torch.device
    samples_per_micro_step: int
    """samples of one micro-step over every rank: world x micro_batch"""
    tokens_per_step: int
    """tokens of one optimizer step over every rank: world x micro_batch x grad_accum x seq_len"""
    wrapped: Optional[torch.nn.Module] = None
    """what the step calls: DDP around the model, or the model itself (FSDP2, one process); set by `wrap`"""


def build(cfg: Config, mesh: Mesh, vocab_size: int, precision: str, dispatcher_factory=None,
          fake: bool = False) -> TrainState:
    """The model, sharded and materialised on `mesh.device` (each rank only what it holds: its experts,
    its FSDP shards), initialised from the config's seed so the weights do not depend on the layout,
    with its optimizer and scaler. Not yet wrapped: restore or load weights first, then call `wrap`.

    `dispatcher_factory(layer)`: the MoE dispatchers under parallel.ep > 1 (default: make_dispatcher).
    `fake`: build under FakeTensorMode for a rehearsal: the meta model and FSDP2's device mesh are made of
    real tensors, weights stay uninitialised (no value changes a byte count), fp8 and the scaler are off."""
    t = cfg.train
    if dispatcher_factory is None and mesh.ep > 1:
        E, drops = cfg.moe.n_routed_experts, cfg.moe.capacity_factor is not None

        def dispatcher_factory(layer):
            return make_dispatcher(E, mesh, drops=drops)
    fsdp = cfg.parallel.dp == "fsdp" and mesh.distributed
    with _real_tensors(fake):
        with torch.device("meta"):
            model = Transformer(cfg, vocab_size, dispatcher_factory=dispatcher_factory)
        if t.fp8 and not fake:  # before sharding: FSDP2 then gathers the float8 weights' own way
            apply_fp8(model, mesh.device)
        if fsdp:  # first: sharding replaces the parameters
            apply_fsdp(model, mesh, cfg.parallel, precision)
    model.to_empty(device=mesh.device)
    model.tie_weights()
    if not fake:
        model.init_weights(t.seed, place=place_shard if fsdp else None)
        torch.manual_seed(t.seed)  # the RNG stream after init (sampling, dropout-free training) is layout-free
    # expert parallelism: routed-expert shards stay out of DDP and are reduced over edp only
    expert_names = {n for n, _ in model.named_parameters() if is_expert_param(n)}
    experts = ExpertShards.of(model, mesh, cfg.moe.n_routed_experts) if mesh.ep > 1 and expert_names else None
    if fsdp:
        param_sets = grad_norm_sets(model, cfg.parallel.replicate, set(experts.names) if experts else set())
    elif experts is not None:  # replicated, and sharded over the EP group
        names = set(experts.names)
        param_sets = [([p for n, p in model.named_parameters() if n not in names], None),
                      (experts.params, mesh.ep_group)]
    else:
        param_sets = [(list(model.parameters()), None)]
    optimizer = build_optimizer(model, t)
    sharded = ShardedState(model, optimizer, mesh, experts, fsdp)
    if fake and experts is not None:
        with _real_tensors(fake):
            sharded.experts_mesh  # noqa: B018 - built now, outside fake mode (a device mesh)
    scaler = grad_scaler("fp32" if fake else precision, mesh.device)
    samples = mesh.world * t.micro_batch
    return TrainState(model, optimizer, scaler, experts, param_sets, sharded, block_fn_for(cfg.parallel), fsdp,
                      mesh.distributed, precision, mesh.device, samples, samples * t.grad_accum * t.seq_len)


def wrap(state: TrainState, cfg: Config, mesh: Mesh, ddp=wrap_ddp, compile: bool = True) -> None:
    """Sets `state.wrapped`: DDP over the world for the replicated parameters (not under FSDP2, nor in
    one process), then train.compile's regional compilation. `ddp(model, mesh, parallel, ignore=names)`:
    the DDP wrapper, and `compile=False`: eager whatever train.compile says (the rehearsal on fake
    tensors passes both)."""
    ignore = set(state.experts.names) if state.experts else set()
    distributed_ddp = not state.fsdp and mesh.distributed
    state.wrapped = ddp(state.model, mesh, cfg.parallel, ignore=ignore) if distributed_ddp else state.model
    if compile and cfg.train.compile:
        compile_blocks(state.wrapped)


def _real_tensors(fake: bool):
    """Device meshes and process groups are made of real tensors: leave FakeTensorMode around them."""
    return unset_fake_temporarily() if fake else contextlib.nullcontext()
