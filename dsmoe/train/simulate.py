"""A simulated rehearsal: one training step of a config at world size N, on this CPU, without its memory.

    python -m dsmoe.estimate configs/runs/v3-mini-h100-fsdp.yaml --simulate --world 64

This process plays rank 0 of an N-rank job. A fake process group (torch's `fake` backend: every
collective returns at once, with the right shapes) and FakeTensorMode (tensors with shape, dtype and
device but no storage) let the training code itself build the model on the meta device, shard it
(FSDP2) or split its experts (EP), materialise it, run forward and backward of the micro-steps, reduce
the expert gradients, clip, step AdamW and plan a sharded checkpoint. torch's memory tracker
(torch.distributed._tools: FSDPMemTracker under FSDP2, MemTracker otherwise) books every tensor the
step makes to parameters, gradients, optimizer state or activations and keeps the rank's peak.

Assumptions, returned with the result (`assumptions`):
- routing is balanced: expert-parallel split sizes come from the token counts the ranks exchange,
  which fake tensors do not hold, so every expert gets T*K/E rows from every rank
  (dsmoe.parallel.dispatch.split_sizes is swapped for that);
- CPU kernels: the fake tensors live on the CPU in the config's precision (`auto` = bf16 for a GPU
  config), so SDPA picks the CPU's kernel (MLA pads V there, not on CUDA), and CUDA's allocator
  (512-byte rounding, caching, fragmentation) and the scratch memory inside single kernels are not
  counted: the tracker sees each op's outputs. The expert-parallel dispatcher takes the transport of
  the config's device;
- DDP: its C++ reducer cannot run on fake tensors, so its gradient buckets are reproduced as what they
  are under gradient_as_bucket_view (BucketedDDP): one flat buffer the replicated gradients become
  views of on the synchronising backward, beside which the no_sync micro-steps accumulate;
- micro-steps: the first and the last run; the ones between start and end like the last (every
  unit's gradient held unsharded under FSDP2, or in DDP's buckets), so they add no new peak.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Optional

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.testing._internal.distributed.fake_pg import FakeStore

from dsmoe.config import Config
from dsmoe.metrics.memory import StepMemory
from dsmoe.model import attention, moe
from dsmoe.model.grouped_mm import GROUPED_MM, _grouped_mm_op
from dsmoe.parallel import dispatch
from dsmoe.parallel.dispatch import make_dispatcher
from dsmoe.parallel.mesh import Mesh
from dsmoe.tools.model import vocab_size_of
from dsmoe.checkpoint.sharded import ShardedState
from dsmoe.train.build import build, wrap
from dsmoe.train.state import Progress
from dsmoe.train.step import train_step

ASSUMPTIONS = [
    "balanced routing: every expert gets T*K/E token rows from every rank per MoE layer (the real split "
    "sizes depend on the data)",
    "CPU kernels on fake tensors: SDPA takes the CPU's kernel (MLA pads V there), and CUDA's allocator "
    "rounding, caching and any kernel's internal scratch memory are not counted",
]
DDP_ASSUMPTION = ("DDP's gradient buckets (gradient_as_bucket_view) are one flat buffer; gradients become its views "
                  "on the synchronising backward")


class BucketedDDP(torch.nn.Module):
    """What DistributedDataParallel(gradient_as_bucket_view=True) holds: one flat buffer for the
    replicated parameters' gradients. On a synchronising backward each gradient is copied into its view
    and becomes it; under no_sync its reducer stays out of the way, so after zero_grad(set_to_none=True)
    the micro-steps accumulate into gradients of their own beside the buckets. Its C++ reducer cannot run
    on fake tensors; the all-reduce itself changes no memory and is left out."""

    def __init__(self, module: torch.nn.Module, ignore: set[str]):
        super().__init__()
        self.module, self.sync = module, True
        params = [p for n, p in module.named_parameters() if n not in ignore and p.requires_grad]
        self.buckets = torch.zeros(sum(p.numel() for p in params), dtype=params[0].dtype, device=params[0].device)
        for p, view in zip(params, self.buckets.split([p.numel() for p in params])):
            p.register_post_accumulate_grad_hook(self._into_bucket(view.view_as(p)))

    def _into_bucket(self, view: torch.Tensor):
        def hook(p: torch.Tensor) -> None:
            if self.sync and p.grad is not view:
                view.copy_(p.grad)
                p.grad = view
        return hook

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self):
        self.sync = False
        try:
            yield
        finally:
            self.sync = True


@contextlib.contextmanager
def fake_world(world: int):
    """A fake default process group of `world` ranks in which this process is rank 0."""
    if dist.is_initialized():
        raise RuntimeError("a simulated rehearsal needs a process without a process group: run it on its own "
                           "(python -m dsmoe.estimate CONFIG --simulate --world N)")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def rank0_mesh(world: int, ep: int) -> Mesh:
    """Rank 0's Mesh as dsmoe.parallel.mesh.init_mesh lays it out (EP groups of contiguous ranks, edp
    groups strided by ep), built over the fake group; init_mesh's gloo monitor group cannot be."""
    mesh = Mesh(rank=0, world=world, ep=ep, device=torch.device("cpu"))
    if ep > 1:
        mesh.ep_group = dist.new_group(list(range(ep)))
        mesh.edp_group = dist.new_group(list(range(0, world, ep)))
    return mesh


def _precision(cfg: Config) -> str:
    p = cfg.train.precision
    if p != "auto":
        return p
    return "fp32" if cfg.train.device == "cpu" else "bf16"  # what `auto` resolves to on an sm_80+ GPU


def _balanced_split_sizes(sizes: torch.Tensor, n_assignments: int) -> list[int]:
    """dispatch.split_sizes under balanced routing: what this rank sends, then receives, spread evenly
    over the entries of each half (per peer rank, or per expert)."""
    half = sizes.numel() // 2
    rows = [n_assignments // half + (i < n_assignments % half) for i in range(half)]
    return rows + rows


def _grouped_mm_on_fake(a_NK: torch.Tensor, b_EKN: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """aten's grouped_mm has a fake (meta) function for bf16 only; fp32 and fp16 take dsmoe's custom op
    around the same aten call (dsmoe.model.grouped_mm), whose fake function gives the same shapes."""
    if a_NK.dtype == torch.bfloat16:
        return GROUPED_MM(a_NK, b_EKN, offs=offs_E)
    return _grouped_mm_op(a_NK, b_EKN, offs_E)


def _v_padding_on_real(*args) -> bool:
    """attention.v_padding_needed asks SDPA's kernel choice about probe tensors; fake ones always get the
    math kernel, so it asks with real (empty, never written) ones."""
    with unset_fake_temporarily():
        return _V_PADDING_NEEDED(*args)


_V_PADDING_NEEDED = attention.v_padding_needed


def _dispatcher_factory(cfg: Config, mesh: Mesh):
    """The trainer's dispatchers, with the transport a CUDA rank takes (it is picked by device type)."""
    E = cfg.moe.n_routed_experts

    def factory(layer):
        dispatcher = make_dispatcher(E, mesh, drops=cfg.moe.capacity_factor is not None)
        if cfg.train.device != "cpu":
            dispatcher.transport = "reorder"
        return dispatcher
    return factory if mesh.ep > 1 else None


def _bucketed_ddp(model, mesh, parallel, ignore):
    return BucketedDDP(model, ignore)


def checkpoint_plan(sharded: ShardedState) -> dict:
    """Bytes of a checkpoint: what this rank's state offers a sharded (DCP) save, from DCP's own local
    save plan, and the whole state (one file's tensors; what rank 0 gathers for checkpoint.format=file)."""
    state = sharded.tensors()
    planner = DefaultSavePlanner()
    planner.set_up_planner(state, is_coordinator=True)
    items = [i for i in planner.create_local_plan().items if i.tensor_data is not None]
    local = sum(torch.Size(i.tensor_data.chunk.sizes).numel() * i.tensor_data.properties.dtype.itemsize for i in items)
    whole = sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t))
    return {"tensors": len(items), "rank_bytes": local, "whole_bytes": whole}


def simulate(cfg: Config, world: int, ep: Optional[int] = None) -> dict:
    """Peak memory of rank 0 of a `world`-rank run of `cfg` (expert parallelism `ep`, default
    parallel.ep) over one training step, in bytes by category (see StepMemory.CATEGORIES), with the
    checkpoint plan, the assumptions made and the seconds it took.

    Raises ValueError for a layout the trainer would refuse (world not divisible by ep, experts not by
    ep) and for parallel.cpu_offload, which needs CUDA."""
    t0 = time.perf_counter()
    ep = cfg.parallel.ep if ep is None else ep
    E = cfg.moe.n_routed_experts
    if world < 1 or world % ep:
        raise ValueError(f"world={world} is not a positive multiple of ep={ep}: pass --world a multiple of {ep}")
    if E and E % ep:
        raise ValueError(f"moe.n_routed_experts={E} is not divisible by ep={ep}: choose ep dividing {E}")
    if cfg.parallel.cpu_offload:
        raise ValueError("parallel.cpu_offload moves state to the host of a CUDA run; a CPU rehearsal cannot "
                         "model it: simulate with --parallel.cpu_offload=false")
    cfg = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, ep=ep))
    t, precision = cfg.train, _precision(cfg)
    micro_steps = sorted({0, t.grad_accum - 1})
    with fake_world(world), _swapped(dispatch, "split_sizes", _balanced_split_sizes), \
            _swapped(moe, "grouped_mm", _grouped_mm_on_fake), \
            _swapped(attention, "v_padding_needed", _v_padding_on_real):
        mesh = rank0_mesh(world, ep)
        with FakeTensorMode(allow_non_fake_inputs=True):
            # the trainer's build and step on fake tensors: weights stay uninitialised (no value changes a
            # byte count), DDP is BucketedDDP, no guard (its verdict is a host copy of values)
            state = build(cfg, mesh, vocab_size_of(cfg), precision, _dispatcher_factory(cfg, mesh), fake=True)
            wrap(state, cfg, mesh, ddp=_bucketed_ddp, compile=False)
            state.sharded.init_optimizer_state()  # AdamW's moments exist from the first step on: the steady state
            V = vocab_size_of(cfg)
            batches = [(torch.randint(0, V, (t.micro_batch, t.seq_len)),) * 2 for _ in micro_steps]
            buckets = (state.wrapped.buckets,) if isinstance(state.wrapped, BucketedDDP) else ()
            with StepMemory(state.model, state.optimizer, state.fsdp, gradients=buckets) as memory:
                train_step(state, Progress(), batches, None, cfg, micro_steps=micro_steps,
                           on_micro_step=memory.micro_step_done)
            with unset_fake_temporarily():  # the planner computes chunk offsets with real tensors
                plan = checkpoint_plan(state.sharded)
    assumptions = ASSUMPTIONS[:1] * (ep > 1) + ASSUMPTIONS[1:] + [DDP_ASSUMPTION] * (world > 1 and not state.fsdp)
    if t.grad_accum > 2:
        assumptions.append(f"micro-steps 1 and {t.grad_accum} run; 2..{t.grad_accum - 1} repeat the memory "
                           f"state of {t.grad_accum}")
    return {"world": world, "ep": ep, "dp": "fsdp" if state.fsdp else "ddp", "precision": precision,
            "device": "cpu (fake tensors)", "micro_steps": [m + 1 for m in micro_steps], "peak": memory.peak(),
            "checkpoint": {"format": cfg.checkpoint.format, **plan}, "assumptions": assumptions,
            "seconds": time.perf_counter() - t0}


@contextlib.contextmanager
def _swapped(module, name: str, value):
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)
