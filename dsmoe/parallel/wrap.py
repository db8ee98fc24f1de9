"""Wrapping the model for data parallelism, and activation checkpointing of blocks."""
from __future__ import annotations

import functools
import warnings
from typing import Callable, Optional, Sequence

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from dsmoe.config import ParallelConfig
from dsmoe.parallel.mesh import Mesh


def wrap_ddp(model: torch.nn.Module, mesh: Mesh, p: ParallelConfig, ignore: Sequence[str] = ()) -> torch.nn.Module:
    """DDP over the world. Every expert is in every step's graph, so no find_unused_parameters;
    the routing bias is updated identically on every rank, so buffers need no broadcast.

    `ignore`: parameter names DDP neither broadcasts at start nor all-reduces (expert-parallel shards:
    each rank holds different experts; their gradients are reduced over edp by ExpertShards)."""
    if not mesh.distributed:
        return model
    if ignore:
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, list(ignore))
    with warnings.catch_warnings():
        # broadcast_buffers is deprecated, but still the only switch that also skips the init sync
        warnings.simplefilter("ignore", FutureWarning)
        return DistributedDataParallel(
            model,
            device_ids=[mesh.device.index] if mesh.device.type == "cuda" else None,
            bucket_cap_mb=p.ddp_bucket_mb,
            gradient_as_bucket_view=True,
            broadcast_buffers=False,
        )


def block_fn_for(p: ParallelConfig) -> Optional[Callable]:
    """How the model runs each block: plainly, or with some of it recomputed in backward (non-reentrant).

    full / every_n: whole blocks (every one, or one in ac_every_n). moe_only: the MoE sub-layer (norm + MoE)
    of MoE blocks. attention_only: the attention sub-layer (norm + attention) of every block. selective: see
    `selective_checkpoint`. Under expert parallelism full, every_n and moe_only rerun each recomputed MoE
    layer's all-to-alls and host sync in backward, in the same order on every rank; selective never does."""
    policy = p.activation_checkpointing
    if policy == "none":
        return None

    def run(block, x):
        if policy == "attention_only":
            return block(x, run_attention=recompute)
        if policy == "moe_only":
            return block(x, run_ffn=recompute) if block.is_moe else block(x)
        if policy == "selective":
            if block.is_moe:
                return block(x, run_attention=selective_checkpoint, run_local=selective_checkpoint)
            return selective_checkpoint(block, x)
        if policy == "full" or block.layer % p.ac_every_n == 0:
            return recompute(block, x)
        return block(x)

    return run


def recompute(fn: Callable, *args):
    """Run `fn` keeping only its inputs; backward reruns it to get what it saved."""
    return checkpoint(fn, *args, use_reentrant=False)


# matmul-like ops, whose outputs selective checkpointing keeps
_SAVED_OPS = {getattr(torch.ops.aten, name) for name in (
    "mm", "addmm", "bmm", "baddbmm", "_grouped_mm", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_flash_attention_for_cpu") if hasattr(torch.ops.aten, name)}


def _keep_matmul_outputs(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op.overloadpacket in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def selective_checkpoint(fn: Callable, *args):
    """Run `fn` keeping its inputs and the outputs of its matmuls and attention kernels; backward recomputes
    only the cheap element-wise work in between (norms, SiLU, RoPE, routing scores).

    The policy runs whole dense blocks, attention sub-layers, and an MoE's local pieces (pre-norm, router,
    routed and shared experts) under this, never the dispatch or combine between them: under expert
    parallelism those run the all-to-alls, which write into preallocated buffers (an in-place op the
    checkpoint cache cannot replay), and the host sync of split sizes, and recomputing them would repeat
    the communication. Nothing recomputed draws random numbers (and checkpoint restores the RNG anyway)."""
    return checkpoint(fn, *args, use_reentrant=False,
                      context_fn=functools.partial(create_selective_checkpoint_contexts, _keep_matmul_outputs))
