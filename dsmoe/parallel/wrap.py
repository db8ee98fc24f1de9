"""Wrapping the model for data parallelism, and activation checkpointing of blocks."""
from __future__ import annotations

import functools
import warnings
from contextlib import contextmanager
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


def compile_blocks(model: torch.nn.Module, backend: str = "inductor", dynamic: Optional[bool] = False,
                   mode: Optional[str] = None) -> torch.nn.Module:
    """Regional compilation: `torch.compile` each transformer block's forward, in place (torchtitan's
    `apply_compile` compiles per block too): the blocks share one compiled graph per structure (dense,
    MoE), compile in seconds rather than the whole model's minutes, and the embedding, loss and
    optimizer stay eager. Returns `model` (a DDP wrapper or the bare model), whose blocks now run compiled.

    Only `forward` methods are replaced, so parameter names, state dicts and checkpoints are unchanged,
    and hooks on the block (FSDP2's gathers) and activation checkpointing around it (`block_fn_for`)
    stay outside the compiled code. A dense block and a single-process MoE block are one graph each,
    without breaks. Under expert parallelism the MoE's route (split-size host sync, all-to-alls, experts
    on a row count that changes every step, combine) must run eagerly; a graph break that deep would
    cut the block at every enclosing call (dynamo ends the outer frames' graphs there too), so such a
    block is compiled in its pieces instead: the attention sub-layer, the MoE's norm, router and shared
    experts' gate and up projections, with the route between them eager: in effect one break per MoE
    block, at its host sync.
    Activation checkpointing policies work as they do eagerly (tests/test_compile.py).
    `dynamic=False` specialises on shapes (the training micro-batch; another shape compiles another
    graph); `backend`/`mode` go to torch.compile as they are.
    Raises ValueError when the model has no `layers` of blocks."""
    inner = getattr(model, "module", model)  # DDP keeps the model as .module
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or not len(layers):
        raise ValueError(f"compile_blocks: {type(inner).__name__} has no `layers` of transformer blocks to compile")

    def compiled(fn):
        return torch.compile(fn, backend=backend, dynamic=dynamic, mode=mode)

    for block in layers:
        moe = block.ffn if block.is_moe else None
        if moe is not None and moe.dispatcher.syncs_host:
            block.attention_residual = compiled(block.attention_residual)
            block.ffn_norm.forward = compiled(block.ffn_norm.forward)
            moe.router.forward = compiled(moe.router.forward)
            if moe.shared is not None:  # its gate and up projections; the down projection is one GEMM
                moe.shared.hidden = compiled(moe.shared.hidden)
        else:
            block.forward = compiled(block.forward)
    return model


@contextmanager
def eager_blocks(model: torch.nn.Module):
    """Runs the functions `compile_blocks` compiled uncompiled while inside; restored on exit.

    Cached generation calls each block with its own attention closure and reads `block.layer`: dynamo
    guards on both (and on grad mode), so a compiled block would recompile once per layer per sample,
    then give up to eager after its recompile limit. Generation is a few small steps: eager is cheaper."""
    swapped = [(m, name, fn) for m in model.modules() for name, fn in list(vars(m).items())
               if hasattr(fn, "_torchdynamo_orig_callable")]
    for m, name, fn in swapped:
        setattr(m, name, fn._torchdynamo_orig_callable)
    try:
        yield
    finally:
        for m, name, fn in swapped:
            setattr(m, name, fn)
