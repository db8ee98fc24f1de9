"""Sharded checkpoints: a torch.distributed.checkpoint (DCP) directory per step, written by every rank
in parallel, that any layout (world size, ep, DDP or FSDP2) resumes.

    checkpoints/step_0000100/
        __0_0.distcp ...    tensor shards, one file per rank (DCP)
        .metadata           DCP's index: every tensor's global shape and where its chunks lie
        meta.pt             progress, scaler, guard, RNG, config, layout (rank 0, written last)

Keys: `model.<name>` and `optimizer.<param name>.<state>` (exp_avg, exp_avg_sq, step), each a global
tensor at the single-process shape: FSDP shards are DTensors already, and an expert stack is presented
as a DTensor over an (ep, edp) mesh, so DCP can cut it differently on load. The tensors handed to DCP
share storage with the live parameters and optimizer state: saving reads them, loading writes into them.

The directory is written as `.step_N.tmp` and renamed once complete, so `--resume auto` never sees a
partial one. `python -m dsmoe.train.convert` turns it into one `step_N.pt` file and back.
"""
from __future__ import annotations

import contextlib
import functools
import os
import shutil
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from dsmoe.parallel.expert_state import ExpertShards
from dsmoe.parallel.fsdp import local
from dsmoe.parallel.mesh import Mesh
from dsmoe.train.checkpoint import SHARDED_META, CheckpointError, fsync_dir, prune

SHARDED_FORMAT = "dsmoe-sharded-v1"


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns on every call without a process group, even when asked for exactly that."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def expert_mesh(mesh: Mesh) -> DeviceMesh:
    """(ep, edp): an expert stack is cut into ep blocks first, each block over edp (rank = edp_i * ep + ep_i)."""
    ranks = torch.arange(mesh.world).reshape(mesh.edp, mesh.ep).T
    return DeviceMesh(mesh.device.type, ranks, mesh_dim_names=("ep", "edp"))


class ShardedState:
    """The live model and optimizer as DCP sees them: global tensors over this rank's storage."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, mesh: Mesh,
                 experts: Optional[ExpertShards], fsdp: bool):
        self.model, self.optimizer, self.mesh, self.experts, self.fsdp = model, optimizer, mesh, experts, fsdp
        self.expert_names = set(experts.names) if experts is not None else set()

    @functools.cached_property
    def experts_mesh(self) -> DeviceMesh:
        """Built on first use, not at start-up: its process groups only serve sharded checkpoints (every
        rank saves and loads together, so every rank builds it at the same point)."""
        return expert_mesh(self.mesh)

    def _view(self, name: str, t: torch.Tensor) -> torch.Tensor:
        if name not in self.expert_names:
            return t  # replicated (DDP) or an FSDP DTensor: DCP reads both as they are
        shard = local(t)
        shape = (self.experts.n_experts, *t.shape[1:])
        stride = torch.empty(shape, device="meta").stride()
        placements = (Shard(0), Shard(0) if self.fsdp else Replicate())
        return DTensor.from_local(shard, self.experts_mesh, placements, shape=torch.Size(shape), stride=stride)

    def tensors(self) -> dict:
        out = {f"model.{k}": self._view(k, v) for k, v in self.model.state_dict().items()}
        names = {id(p): n for n, p in self.model.named_parameters()}
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                for key, v in self.optimizer.state.get(p, {}).items():
                    if torch.is_tensor(v):
                        name = names[id(p)]
                        out[f"optimizer.{name}.{key}"] = self._view(name, v) if v.shape == p.shape else v
        return out

    @torch.no_grad()
    def init_optimizer_state(self) -> None:
        """DCP loads in place, so AdamW's state must exist: one step with zero gradients and lr 0
        creates it and leaves every parameter as it was."""
        if self.optimizer.state:
            return
        saved = [(g["lr"], g["weight_decay"]) for g in self.optimizer.param_groups]
        for g in self.optimizer.param_groups:
            g["lr"] = g["weight_decay"] = 0.0
            for p in g["params"]:
                p.grad = torch.zeros_like(p)
        self.optimizer.step()
        for g, (lr, wd) in zip(self.optimizer.param_groups, saved):
            g["lr"], g["weight_decay"] = lr, wd
        self.optimizer.zero_grad(set_to_none=True)

    def load(self, path: Path) -> None:
        self.init_optimizer_state()
        with _quiet_single_process():
            dcp.load(self.tensors(), checkpoint_id=str(path), no_dist=not dist.is_initialized())


def save_sharded(tensors: dict, meta: dict, path: Path, keep_last: Optional[int], mesh: Mesh,
                 before_commit: Optional[Callable[[], None]] = None) -> Optional[Path]:
    """Every rank calls it. Rank 0 adds meta.pt and commits by renaming; returns the path on rank 0."""
    tmp = path.with_name(f".{path.name}.tmp")
    if mesh.is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted save
        tmp.mkdir(parents=True)
    if mesh.distributed:
        dist.barrier()
    with _quiet_single_process():
        dcp.save(tensors, checkpoint_id=str(tmp), no_dist=not mesh.distributed)
    committed = None
    if mesh.is_main:
        write_meta(meta, tmp)
        if before_commit is not None:
            before_commit()
        commit(tmp, path)
        prune(path.parent.parent, keep_last, path)
        committed = path
    if mesh.distributed:
        dist.barrier()
    return committed


def write_meta(meta: dict, directory: Path) -> None:
    with open(directory / SHARDED_META, "wb") as f:
        torch.save({"format": SHARDED_FORMAT, **meta}, f)
        f.flush()
        os.fsync(f.fileno())


def commit(tmp: Path, path: Path) -> None:
    if path.exists():  # a rerun of the same step
        shutil.rmtree(path)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def load_meta(path: Path) -> dict:
    """meta.pt of a sharded directory, checked; the error says what is wrong and what to do."""
    meta_file = path / SHARDED_META
    if not (path / ".metadata").is_file() or not meta_file.is_file():
        raise CheckpointError(f"'{path}' is not a complete sharded checkpoint (no .metadata or {SHARDED_META}); "
                              f"resume from an earlier checkpoint in {path.parent}")
    try:
        meta = torch.load(meta_file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"'{meta_file}' is truncated or corrupt ({type(e).__name__}: {e}); "
                              f"resume from an earlier checkpoint in {path.parent}") from None
    if not isinstance(meta, dict) or meta.get("format") != SHARDED_FORMAT:
        raise CheckpointError(f"'{path}' is not a dsmoe sharded checkpoint")
    return meta


def tensor_shapes(path: Path) -> dict[str, torch.Size]:
    """Global shapes of the saved tensors, from DCP's index (no tensor data is read)."""
    try:
        metadata = FileSystemReader(str(path)).read_metadata()
    except Exception as e:
        raise CheckpointError(f"the index of '{path}' is unreadable ({type(e).__name__}: {e}); "
                              f"resume from an earlier checkpoint in {path.parent}") from None
    return {k: v.size for k, v in metadata.state_dict_metadata.items() if hasattr(v, "size")}


def model_shapes(path: Path) -> dict[str, torch.Tensor]:
    """The saved model's tensors as meta tensors, for `check_compatible`."""
    return {k[len("model."):]: torch.empty(size, device="meta")
            for k, size in tensor_shapes(path).items() if k.startswith("model.")}


def read_all(path: Path) -> dict:
    """Every tensor of a sharded directory, whole, into this process (no process group needed)."""
    shapes = tensor_shapes(path)
    tensors = {}
    for key, size in shapes.items():
        tensors[key] = torch.empty(size, dtype=_dtype(path, key))
    with _quiet_single_process():
        dcp.load(tensors, checkpoint_id=str(path), no_dist=True)
    return tensors


def _dtype(path: Path, key: str) -> torch.dtype:
    return FileSystemReader(str(path)).read_metadata().state_dict_metadata[key].properties.dtype


def param_order(cfg_dict: dict, vocab_size: int) -> tuple[list[str], list[str]]:
    """Parameter names in optimizer order, decayed then not (index i of a single-file optimizer state)."""
    from dsmoe.config import from_dict
    from dsmoe.model import Transformer
    from dsmoe.train.optim import decay_split

    with torch.device("meta"):
        model = Transformer(from_dict(cfg_dict), vocab_size)
    return decay_split(model)


def to_file_state(path: Path) -> dict:
    """A sharded directory as the state of a single-file checkpoint (what `save_checkpoint` takes)."""
    from dsmoe.config import from_dict
    from dsmoe.train.optim import param_groups_layout

    meta = load_meta(path)
    tensors = read_all(path)
    decay, no_decay = param_order(meta["config"], int(meta["data"]["vocab_size"]))
    index = {n: i for i, n in enumerate(decay + no_decay)}
    optim_state: dict = {}
    for key, v in tensors.items():
        if key.startswith("optimizer."):
            name, state_key = key[len("optimizer."):].rsplit(".", 1)
            optim_state.setdefault(index[name], {})[state_key] = v
    groups = param_groups_layout(len(decay), len(no_decay), from_dict(meta["config"]).train)
    state = {k: v for k, v in meta.items() if k != "format"}
    state["model"] = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    state["optimizer"] = {"state": dict(sorted(optim_state.items())), "param_groups": groups}
    return state


def from_file_state(state: dict) -> tuple[dict, dict]:
    """A single-file checkpoint's state as (tensors, meta) for a sharded directory."""
    decay, no_decay = param_order(state["config"], int(state["data"]["vocab_size"]))
    order = decay + no_decay
    tensors = {f"model.{k}": v for k, v in state["model"].items()}
    for i, per_param in state["optimizer"]["state"].items():
        for key, v in per_param.items():
            tensors[f"optimizer.{order[int(i)]}.{key}"] = v
    meta = {k: v for k, v in state.items() if k not in ("model", "optimizer", "format", "checksum")}
    return tensors, meta


def save_unsharded_as_sharded(state: dict, path: Path) -> Path:
    """One process writes a single-file checkpoint's state as a sharded directory."""
    tensors, meta = from_file_state(state)
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with _quiet_single_process():
        dcp.save(tensors, checkpoint_id=str(tmp), no_dist=True)
    write_meta(meta, tmp)
    commit(tmp, path)
    return path

