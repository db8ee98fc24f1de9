"""Wrapping the model for data parallelism, and activation checkpointing of blocks."""
from __future__ import annotations

import warnings
from typing import Callable, Optional, Sequence

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

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
    """How the model runs each block: plainly, or recomputed in backward (non-reentrant)."""
    if p.activation_checkpointing == "none":
        return None

    def run(block, x):
        if p.activation_checkpointing == "full" or block.layer % p.ac_every_n == 0:
            return checkpoint(block, x, use_reentrant=False)
        return block(x)

    return run
