"""Sharded checkpoints: a torch.distributed.checkpoint (DCP) directory per step, written by every rank
in parallel, that any layout (world size, ep, DDP or FSDP2) resumes; the default at world > 1.

    checkpoints/step_0000100/
        __0_0.distcp ...    tensor shards, one file per rank (DCP)
        .metadata           DCP's index: every tensor's global shape and where its chunks lie
        meta.pt             progress, scaler, guard, RNG, config, layout (rank 0)
        manifest.json       every file's sha256 and size, the run's lineage (rank 0, written last: manifest.py)

Keys: `model.<name>` and `optimizer.<param name>.<state>` (exp_avg, exp_avg_sq, step), each a global
tensor at the single-process shape (`ShardedState`). The directory is written as `.step_N.tmp` and
renamed once complete, so `--resume auto` never sees a partial one. With `checkpoint.async_save` the
shards are written on a background thread (`dcp.async_save`, after a host copy is staged) and rank 0
renames when every rank's are written. `python -m dsmoe.checkpoint.convert` turns a directory into one
`step_N.pt` file and back.
"""
from __future__ import annotations

import functools
import hashlib
import io
import os
import shutil
import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.staging import AsyncStager, DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from dsmoe.parallel.expert_state import ExpertShards
from dsmoe.parallel.fsdp import local, place_shard
from dsmoe.parallel.mesh import Mesh
from dsmoe.checkpoint.file import SHARDED_META, CheckpointDamaged, CheckpointError, fsync_dir, prune
from dsmoe.checkpoint.manifest import MANIFEST, ManifestWriter, SafeReader, read_manifest, read_metadata_file, write_manifest
from dsmoe.checkpoint.manifest import problem as manifest_problem

SHARDED_FORMAT = "dsmoe-sharded-v1"


# DCP warns on every call without a process group, even when asked for exactly that (no_dist=True),
# also from an asynchronous save's thread
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


def expert_mesh(mesh: Mesh) -> DeviceMesh:
    """(ep, edp): an expert stack is cut into ep blocks first, each block over edp (rank = edp_i * ep + ep_i)."""
    ranks = torch.arange(mesh.world).reshape(mesh.edp, mesh.ep).T
    return DeviceMesh(mesh.device.type, ranks, mesh_dim_names=("ep", "edp"))


class ShardedState:
    """The live model and optimizer as checkpoints see them: every tensor at its single-process shape,
    over this rank's storage (saving reads it, loading writes into it).

    Names and optimizer state come from DCP's `get_state_dict` (parameter names rather than optimizer
    indices; it creates AdamW's state for a load to write into). FSDP2 shards are DTensors already. An
    expert stack split over ep is a plain [E/ep, ...] tensor in the live model (the experts compute on
    their local rows), which DCP's state-dict API cannot see as part of a whole: it is presented here
    as a DTensor over the (ep, edp) mesh, global [E, ...] with this rank's rows local."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, mesh: Mesh,
                 experts: Optional[ExpertShards], fsdp: bool):
        self.model, self.optimizer, self.mesh, self.experts, self.fsdp = model, optimizer, mesh, experts, fsdp
        self.expert_names = set(experts.names) if experts is not None else set()

    @functools.cached_property
    def experts_mesh(self) -> DeviceMesh:
        """Built on first use, not at start-up: its process groups only serve checkpoints (every rank
        saves and loads together, so every rank builds it at the same point)."""
        return expert_mesh(self.mesh)

    def _global(self, name: str, t: torch.Tensor) -> torch.Tensor:
        if name not in self.expert_names or t.dim() == 0:
            return t  # replicated (DDP), an FSDP DTensor, or AdamW's step count
        shard = local(t)
        shape = (self.experts.n_experts, *t.shape[1:])
        stride = torch.empty(shape, device="meta").stride()
        placements = (Shard(0), Shard(0) if self.fsdp else Replicate())
        return DTensor.from_local(shard, self.experts_mesh, placements, shape=torch.Size(shape), stride=stride)

    def param_names(self) -> list[str]:
        """Parameter names in optimizer order (index i of a single file's optimizer state)."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        return [names[id(p)] for g in self.optimizer.param_groups for p in g["params"]]

    def view(self, create_optimizer_state: bool = False) -> tuple[dict, dict]:
        """(model {name: tensor}, optimizer {param name: {key: value}}). The optimizer part is empty
        before the first step unless `create_optimizer_state` (then AdamW's state is created, zero)."""
        if self.optimizer.state or create_optimizer_state:
            model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        else:
            model_sd, optim_sd = get_model_state_dict(self.model), {"state": {}}
        model = {k: self._global(k, v) for k, v in model_sd.items()}
        optim = {n: {k: self._global(n, v) if torch.is_tensor(v) else v for k, v in per.items()}
                 for n, per in optim_sd["state"].items()}
        return model, optim

    def init_optimizer_state(self) -> None:
        """Create AdamW's state (zero moments) if no step has: what a load writes into."""
        self.view(create_optimizer_state=True)

    def tensors(self, create_optimizer_state: bool = False) -> dict:
        """The view as DCP's flat keys."""
        model, optim = self.view(create_optimizer_state)
        out = {f"model.{k}": v for k, v in model.items()}
        out.update({f"optimizer.{n}.{k}": v for n, per in optim.items() for k, v in per.items() if torch.is_tensor(v)})
        return out

    def load(self, path: Path, group: Optional[dist.ProcessGroup] = None) -> None:
        """Read a sharded directory into the live tensors, each rank its own chunks (`group`: the
        process group DCP plans over; None: this process alone)."""
        saved_optimizer = any(k.startswith("optimizer.") for k in tensor_shapes(path))
        if not saved_optimizer:  # saved before the first step: so is this optimizer
            self.optimizer.state.clear()
        load_shards(self.tensors(saved_optimizer), path, group)


    @torch.no_grad()
    def gather(self) -> tuple[dict, dict]:
        """The whole model and optimizer state on rank 0's host, whole tensors gathered one at a time;
        the other ranks get empty dicts and hold at most one whole tensor at a time. These are the
        semantics of DCP's `StateDictOptions(full_state_dict=True, cpu_offload=True)`, applied to the
        view because its expert stacks are whole there (in the model they are slices). Every rank must
        call it."""
        model, optim = self.view()
        keep = self.mesh.is_main

        def whole(t):
            if isinstance(t, DTensor):  # a collective over its mesh, on the mesh's device (cpu_offload: to it)
                t = t.to(t.device_mesh.device_type).full_tensor()
            if not keep:
                return None  # dropped at once: the next tensor reuses the memory
            return t.cpu() if torch.is_tensor(t) else t

        out_model = {k: whole(v) for k, v in model.items()}
        out_optim = {n: {k: whole(v) for k, v in optim[n].items()} for n in self.param_names() if n in optim}
        return (out_model, out_optim) if keep else ({}, {})

    @torch.no_grad()
    def place(self, model_state: dict, optim_state: dict) -> None:
        """Copy whole (single-process shaped) tensors, e.g. of a memory-mapped file, into the live ones:
        each rank copies (and so reads) only its part. Not DCP's set_state_dict(full_state_dict=True):
        it scatters every tensor from rank 0, which would read the whole file there, and cannot put an
        [E, ...] expert stack into an EP rank's plain slice. `optim_state`: {param name: {key: value}}."""
        model, optim = self.view(create_optimizer_state=bool(optim_state))
        if not optim_state:
            self.optimizer.state.clear()
        for k, v in model.items():
            place_shard(v, model_state[k])
        for n, per in optim.items():
            for k, v in per.items():
                if torch.is_tensor(v):
                    place_shard(v, optim_state[n][k])


def load_shards(tensors: dict, path: Path, group: Optional[dist.ProcessGroup] = None) -> None:
    """DCP's load into `tensors` (verify the directory first: see manifest.py); `.metadata` is read
    by the restricted unpickler. An unreadable shard is a CheckpointDamaged naming the directory."""
    try:
        dcp.load(tensors, storage_reader=SafeReader(str(path)), process_group=group, no_dist=group is None)
    except (Exception, CheckpointException) as e:
        inner = unwrap(e)
        if isinstance(inner, CheckpointError):
            raise inner from None
        raise CheckpointDamaged(f"the shards of '{path}' are unreadable ({type(inner).__name__}: {inner}); move it "
                                f"away and resume from an earlier checkpoint (--resume auto does)") from None


def unwrap(e: BaseException) -> BaseException:
    """The first rank's own error inside DCP's CheckpointException (a BaseException, with tracebacks)."""
    while isinstance(e, CheckpointException) and e.failures:
        e = next(iter(e.failures.values()))[0]
    return e


def write_shards(tensors: dict, directory: Path, group: Optional[dist.ProcessGroup],
                 stager: Optional[AsyncStager] = None) -> Optional[Future]:
    """Every rank writes its chunks of `tensors` into `directory` (DCP planning over `group`; None: this
    process alone). With a `stager` it returns once the stager holds a host copy of them, and the
    future completes when every rank's chunks and the index are written (dcp.async_save, on a thread;
    it needs a CPU process group)."""
    if stager is not None:
        return dcp.async_save(tensors, storage_writer=ManifestWriter(directory), process_group=group,
                              no_dist=group is None, async_stager=stager)
    dcp.save(tensors, storage_writer=ManifestWriter(directory), process_group=group, no_dist=group is None)
    return None


def host_stager(device: torch.device) -> AsyncStager:
    """The host copy an asynchronous save writes from, kept between saves, so a save only copies into it:
    pinned, with non-blocking copies, on CUDA. DCP's stager keeps one buffer per source storage (the live
    parameters' and optimizer moments') until its close(), which dcp.async_save calls only on a stager it
    created itself (torch 2.13; tests/test_checkpoint_scale.py checks the reuse)."""
    cuda = device.type == "cuda"
    return DefaultStager(StagingOptions(use_pinned_memory=cuda, use_shared_memory=False, use_async_staging=False,
                                        use_non_blocking_copy=cuda))


def then(future: Future, fn: Optional[Callable[[], object]]) -> Future:
    """A future of `fn()` run (on the thread that completes `future`) once `future` succeeds."""
    out: Future = Future()

    def finish(done: Future) -> None:
        try:
            done.result()
            out.set_result(fn() if fn is not None else None)
        except BaseException as e:  # handed to whoever waits on `out`
            out.set_exception(e)

    future.add_done_callback(finish)
    return out


def staging_dir(path: Path) -> Path:
    """The empty temporary directory a save of `path` writes into (left-overs of an interrupted one removed)."""
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit_sharded(tmp: Path, path: Path, meta: dict, keep_last: Optional[int],
                   before_commit: Optional[Callable[[], None]] = None) -> Path:
    """Rank 0, once every rank's chunks are in `tmp`: meta.pt, the manifest last, rename, prune."""
    write_meta(meta, tmp)
    if before_commit is not None:
        before_commit()
    commit(tmp, path)
    prune(path.parent.parent, keep_last, path)
    return path


def write_meta(meta: dict, directory: Path) -> None:
    """meta.pt, then the manifest of every file in `directory` (every rank's shards written)."""
    buf = io.BytesIO()
    torch.save({"format": SHARDED_FORMAT, **meta}, buf)
    data = buf.getbuffer()
    with open(directory / SHARDED_META, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    write_manifest(directory, (meta.get("run") or {}).get("lineage"), int(meta["progress"]["step"]),
                   {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)})


def commit(tmp: Path, path: Path) -> None:
    if path.exists():  # a rerun of the same step
        shutil.rmtree(path)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def load_meta(path: Path) -> dict:
    """meta.pt of a sharded directory, checked; the error says what is wrong and what to do."""
    meta_file = path / SHARDED_META
    missing = [n for n in (".metadata", SHARDED_META, MANIFEST) if not (path / n).is_file()]
    if missing:
        raise CheckpointDamaged(f"'{path}' is not a complete sharded checkpoint (no {' or '.join(missing)}); "
                                f"move it away and resume from an earlier checkpoint (--resume auto does)")
    try:
        meta = torch.load(meta_file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointDamaged(f"'{meta_file}' is truncated or corrupt ({type(e).__name__}: {e}); move {path} "
                                f"away and resume from an earlier checkpoint (--resume auto does)") from None
    if not isinstance(meta, dict) or meta.get("format") != SHARDED_FORMAT:
        raise CheckpointDamaged(f"'{path}' is not a dsmoe sharded checkpoint")
    return meta


def sharded_problem(path: Path, meta: dict, part: int = 0, parts: int = 1, digests: bool = True) -> Optional[str]:
    """What is wrong with files part, part + parts, ... of a sharded directory against its manifest
    (and, part 0, with its set of files and lineage); None: nothing. Raises CheckpointDamaged without
    a manifest."""
    return manifest_problem(path, read_manifest(path), (meta.get("run") or {}).get("lineage"), part, parts,
                            digests)


def read_metadata(path: Path):
    """DCP's index of a sharded directory (its `.metadata`), read without running code."""
    return read_metadata_file(path / ".metadata")


def tensor_shapes(path: Path) -> dict[str, torch.Size]:
    """Global shapes of the saved tensors, from DCP's index (no tensor data is read)."""
    return {k: v.size for k, v in read_metadata(path).state_dict_metadata.items() if hasattr(v, "size")}


def model_shapes(path: Path) -> dict[str, torch.Tensor]:
    """The saved model's tensors as meta tensors, for `check_compatible`."""
    return {k[len("model."):]: torch.empty(size, device="meta")
            for k, size in tensor_shapes(path).items() if k.startswith("model.")}
