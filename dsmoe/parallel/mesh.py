"""The process layout: world = edp x ep, its process groups, the backend and the device.

EP groups are contiguous ranks (rank = edp_index * ep + ep_index) so an all-to-all stays inside a
node whenever ep <= GPUs per node.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from dsmoe.config import ConfigError


@dataclass
class Mesh:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    ep: int = 1
    device: torch.device = torch.device("cpu")
    ep_group: Optional[dist.ProcessGroup] = None  # ranks holding different experts of one replica
    edp_group: Optional[dist.ProcessGroup] = None  # ranks holding the same experts
    monitor_group: Optional[dist.ProcessGroup] = None  # gloo, to name the ranks missing from a hung collective

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def edp(self) -> int:
        return self.world // self.ep

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(requested)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device={requested} but no CUDA device is visible: use train.device=cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


class StartupError(RuntimeError):
    """The ranks could not form their process groups; the message names the likely cause and the fix."""


def process_group_backend(device: torch.device) -> str:
    """NCCL for CUDA tensors beside gloo for host ones (asynchronous checkpoint saves need a CPU backend);
    gloo alone on the CPU."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def init_mesh(device: str = "auto", ep: int = 1, timeout_s: int = 600, connect_timeout_s: int = 60) -> Mesh:
    """Read torchrun's environment, start the process group (NCCL on CUDA beside gloo for host tensors,
    gloo on CPU), build the groups. Creating them runs under `connect_timeout_s`, so an attempt that
    cannot reach its peers fails fast with StartupError; then collectives get `timeout_s` for start-up."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if world % ep:
        raise ConfigError(f"world size {world} is not divisible by parallel.ep={ep}: "
                          f"launch a multiple of {ep} processes or change parallel.ep")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    mesh = Mesh(rank=rank, world=world, local_rank=local_rank, ep=ep, device=dev)
    if world == 1:
        return mesh
    connect = datetime.timedelta(seconds=connect_timeout_s)
    try:
        if not dist.is_initialized():
            kwargs = {"device_id": dev} if dev.type == "cuda" else {}
            dist.init_process_group(process_group_backend(dev), timeout=connect, **kwargs)
        mesh.monitor_group = dist.new_group(backend="gloo", timeout=connect)
        if ep > 1:
            edp = world // ep
            for i in range(edp):  # every rank creates every group, in the same order
                group = dist.new_group(list(range(i * ep, (i + 1) * ep)), timeout=connect)
                if rank // ep == i:
                    mesh.ep_group = group
            for j in range(ep):
                group = dist.new_group(list(range(j, world, ep)), timeout=connect)
                if rank % ep == j:
                    mesh.edp_group = group
        dist.barrier(group=mesh.monitor_group)  # every rank is here: the groups are connected
    except (RuntimeError, dist.DistError) as e:
        restarts = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        raise StartupError(
            f"rank {rank} could not connect to the other {world - 1} ranks within {connect_timeout_s} s "
            f"(torchrun attempt {restarts}): {str(e).splitlines()[0][:300]}. "
            + ("A restarted attempt that shares torchrun's rendezvous store can read the previous attempt's "
               "addresses: launch with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun ... (launch/*.sh do). "
               if os.environ.get("TORCH_DISABLE_SHARE_RDZV_TCP_STORE") != "1" else "")
            + "Otherwise check that every rank started and can reach MASTER_ADDR; parallel.connect_timeout_s "
              "sets the limit") from None
    set_timeout(mesh, timeout_s)
    return mesh


def shutdown(mesh: Mesh) -> None:
    if mesh.distributed and dist.is_initialized():
        dist.destroy_process_group()


def set_timeout(mesh: Mesh, seconds: int) -> None:
    """Tighten the collectives' timeout once start-up (data preparation, first steps) is over."""
    if not mesh.distributed:
        return
    from torch.distributed.distributed_c10d import _set_pg_timeout

    for group in [None] + [g for g in (mesh.ep_group, mesh.edp_group) if g is not None]:
        _set_pg_timeout(datetime.timedelta(seconds=seconds), group)


def missing_ranks(mesh: Mesh, seconds: float) -> str:
    """After a collective timed out: which ranks do not answer a monitored barrier."""
    try:
        dist.monitored_barrier(group=mesh.monitor_group, timeout=datetime.timedelta(seconds=seconds),
                               wait_all_ranks=True)
    except RuntimeError as e:
        return str(e).splitlines()[0]
    return "every rank answers now (the hang was transient or inside one group)"
