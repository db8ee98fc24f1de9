"""What a checkpoint holds and how a run continues from it: progress, RNG, data position, schedule.

The data position is `samples` consumed (global training windows), a layout-free unit: at world W,
micro-batch m and accumulation A a step reads samples [p, p + W*m*A), micro-step i on rank r the m
samples from p + (i*W + r)*m. A resume at another world size, micro-batch or accumulation therefore
continues at the next unread sample. A resume that changes what a position means (sequence length,
source, tokenizer, data seed) is refused unless `run.allow_data_change` is set.
"""
from __future__ import annotations

import datetime
import errno
import functools
import os
import sys
import time
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from dsmoe.checkpoint.file import (CheckpointDamaged, CheckpointError, CheckpointWriteError, check_compatible,
                                   checkpoint_path, checksum_problem, is_sharded, list_checkpoints, load_checkpoint,
                                   os_error, peek, raise_if_corrupt, remove_temporary, save_checkpoint, write_error)
from dsmoe.checkpoint.resolve import newest_whole, set_aside
from dsmoe.checkpoint.sharded import (commit_sharded, host_stager, load_meta, model_shapes, sharded_problem,
                                      staging_dir, then, unwrap, write_shards)
from dsmoe.config import Config, ConfigError
from dsmoe.data.identity import file_changes
from dsmoe.metrics.logger import RunLogger
from dsmoe.train.build import TrainState
from dsmoe.train.data import TrainData
from dsmoe.train.faults import FaultInjector
from dsmoe.train.guard import Guard, params_finite_everywhere
from dsmoe.train.optim import Schedule

DATA_CHANGE_RULE = ("the run continues at the same sample position in the new files (prepared data: the same "
                    "global sample index of the re-tokenized corpus; streaming: each stream's saved shard index and "
                    "row offset, applied to the new file list), so some documents are skipped or seen twice")
DATA_MEANING = ("source", "tokenizer", "seq_len", "seed")  # fields whose change moves what a sample position means


class RunFinished(Exception):
    """A resume of a run already at its last step: nothing to do (the message says how to train longer)."""


@dataclass
class Progress:
    step: int = 0  # optimizer steps taken (skipped ones included)
    sched_step: int = 0  # steps that advanced the LR schedule (fp16 overflow skips do not)
    samples: int = 0  # training windows consumed, every rank's: the data position
    tokens: int = 0  # tokens trained on (samples x seq_len)
    skipped_overflow: int = 0
    lr_scale: float = 1.0  # lowered by each guard rollback
    seconds: float = 0.0  # wall time of every part of the run up to this point (resumes add theirs)


def broadcast(obj: Any, mesh, group: Optional[dist.ProcessGroup] = None) -> Any:
    """Rank 0's value on every rank: one decider for what the file system says."""
    if not mesh.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def decide(mesh, fn: Callable[[], Any], group: Optional[dist.ProcessGroup] = None) -> Any:
    """Rank 0 runs `fn` (reads or writes the file system, decides) and every rank gets its result, or
    raises its error (a ConfigError, CheckpointError or OSError) alike, so no rank acts on a different
    view of the disk. The others wait under `group`'s timeout (default: the world's)."""
    outcome = None
    if mesh.is_main:
        try:
            outcome = ("ok", fn())
        except (ConfigError, CheckpointError, OSError) as e:
            outcome = ("error", (type(e), str(e)))
    status, value = broadcast(outcome, mesh, group)
    if status == "error":
        raise value[0](value[1])
    return value


def newest_checkpoint(run_dir: Path, mesh) -> Optional[Path]:
    """The newest complete checkpoint of the run directory, as rank 0 sees it."""
    found = list_checkpoints(run_dir) if mesh.is_main else None
    return broadcast(found[-1] if found else None, mesh)


def checkpoint_config(path: str | Path) -> dict:
    """The config stored in a checkpoint (file or sharded directory), without reading its tensors."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint '{path}' does not exist (use --resume auto to take the newest one)")
    return (load_meta(path) if is_sharded(path) else peek(path))["config"]


def data_identity(cfg) -> dict:
    return {"source": cfg.data.source, "tokenizer": cfg.data.tokenizer, "seq_len": cfg.train.seq_len,
            "seed": cfg.train.seed}


class Checkpoints:
    """The trainer's checkpoints: contents, save (one file or a sharded directory, in the background
    with checkpoint.async_save), restore.

    Their collectives run in a gloo group of their own whose timeout is checkpoint.timeout_s, not the
    step timeout: ranks wait there while rank 0 writes a file or commits a directory, and DCP plans
    over it (an asynchronous save from its background thread, beside the training's collectives)."""

    def __init__(self, cfg: Config, state: TrainState, progress: Progress, guard: Guard, data: TrainData, mesh,
                 faults: FaultInjector, vocab_size: int, log: RunLogger, notes: list[str]):
        """`log`: the run's logger (the trainer hands over the run's own when fit() opens it); `notes`:
        what the run's header says, to which a restore adds (a fresh GradScaler)."""
        self.cfg, self.state, self.progress, self.guard, self.data, self.mesh = cfg, state, progress, guard, data, mesh
        self.faults, self.vocab_size, self.log, self.notes = faults, vocab_size, log, notes
        self.run_dir = Path(cfg.run.dir)
        fmt = cfg.checkpoint.format
        self.save_sharded = fmt == "sharded" or (fmt == "auto" and (mesh.distributed or cfg.checkpoint.async_save))
        self.schedule: Optional[Schedule] = None  # saved with the state: set once the run's is known
        self.lineage: Optional[str] = None  # the run directory's lineage, saved with the state: set once claimed
        self.pending: Optional[Future] = None  # the asynchronous save in flight
        self.pending_target: tuple = ()  # its (path, temporary directory, bytes)
        if cfg.checkpoint.async_save and not self.save_sharded:
            raise ConfigError("checkpoint.async_save writes sharded (DCP) directories in the background: set "
                              "checkpoint.format=sharded (or auto), or checkpoint.async_save=false to write one file")

    @functools.cached_property
    def group(self) -> Optional[dist.ProcessGroup]:
        """Built on first use (every rank saves and restores at the same points)."""
        if not self.mesh.distributed:
            return None
        return dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=self.cfg.checkpoint.timeout_s))

    @functools.cached_property
    def stager(self):
        """checkpoint.async_save's host copy of this rank's shards, reused by every save."""
        return host_stager(self.state.device)

    def newest(self) -> Optional[Path]:
        self.wait()
        return newest_checkpoint(self.run_dir, self.mesh)

    def wait(self) -> None:
        """Return once the asynchronous save in flight, if any, is committed; every rank calls it (the
        others wait for rank 0's commit here, under checkpoint.timeout_s) and raises its error alike:
        a CheckpointWriteError, its temporary directory removed. A failed background save is not
        retried synchronously: what fails it (a full, read-only or vanished disk) fails a retry alike,
        and the retry would stall every rank; the run stops with the previous checkpoint intact."""
        pending, self.pending = self.pending, None
        if pending is None:
            return
        path, tmp, nbytes = self.pending_target
        try:
            pending.result()
            problems = [None]
        except (Exception, CheckpointException) as e:  # DCP's write (every rank alike) or rank 0's commit
            problems = [str(write_error(e, path, nbytes)) if os_error(e) else f"{type(e).__name__}: {unwrap(e)}"]
        if self.mesh.distributed:
            mine, problems = problems[0], [None] * self.mesh.world
            dist.all_gather_object(problems, mine, group=self.group)
        found = [p for p in problems if p]
        if found:
            if self.mesh.is_main:
                remove_temporary(tmp)
            raise CheckpointWriteError(found[0] if found[0].startswith("checkpoint ") else
                                       f"checkpoint {path}, written in the background, failed: {found[0]}")
        self.log.print(f"checkpoint: {path} written")

    def poll(self) -> None:
        """After each step while an asynchronous save is in flight: its failure on any rank stops the run
        now (one small all-reduce agrees on it), not at the next save. In the world group, on this
        thread: the checkpoint group is busy with the save's own collectives on its thread."""
        if self.pending is None:
            return
        failed = torch.tensor([float(self.pending.done() and self.pending.exception() is not None)])
        if self.mesh.distributed:
            dist.all_reduce(failed, op=dist.ReduceOp.MAX)
        if failed.item():
            self.wait()

    # ---------------------------------------------------------------- contents

    def gather_rng(self) -> dict:
        """Every rank's RNG states as [world, n] uint8 tensors (all ranks take part)."""
        out = {}
        states = {"cpu": torch.get_rng_state()}
        if self.state.device.type == "cuda":
            states["cuda"] = torch.cuda.get_rng_state(self.state.device)
        for name, s in states.items():
            if self.mesh.distributed:
                comm = s.to(self.state.device) if self.state.device.type == "cuda" else s
                parts = [torch.empty_like(comm) for _ in range(self.mesh.world)]
                dist.all_gather(parts, comm)
                out[name] = torch.stack([p.cpu() for p in parts])
            else:
                out[name] = s[None]
        return out

    def meta_state(self) -> dict:
        """Everything but the model and optimizer tensors; every rank must call it (RNG states are gathered)."""
        return {
            "scaler": self.state.scaler.state_dict(),
            "progress": asdict(self.progress),
            "schedule": self.schedule.state_dict(),
            "guard": self.guard.state_dict(),
            "rng": self.gather_rng(),
            "config": self.cfg.to_dict(),
            "layout": {"world": self.mesh.world, "ep": self.mesh.ep, "dp": "fsdp" if self.state.fsdp else "ddp"},
            "data": {**data_identity(self.cfg), "vocab_size": self.vocab_size, "files": self.data.files},
            "run": {"lineage": self.lineage},
            "data_stream": self.data.state_dict(),  # None for prepared files (their position is `samples`)
        }

    def full_state(self, meta: Optional[dict] = None) -> dict:
        """The whole state as one single-process checkpoint (every expert, whole FSDP tensors) on rank
        0's host; every rank must call it. The others get the meta state with an empty model and
        optimizer state, having held at most one whole tensor at a time (ShardedState.gather)."""
        model, optim = self.state.sharded.gather()
        names = self.state.sharded.param_names()
        optim_state = {i: optim[n] for i, n in enumerate(names) if n in optim}
        return {"model": model, "optimizer": {"state": optim_state,
                                              "param_groups": self.state.optimizer.state_dict()["param_groups"]},
                **(meta or self.meta_state())}

    # ---------------------------------------------------------------- save

    def save(self) -> Optional[Path]:
        """Every rank calls it; never writes from non-finite parameters. The path on every rank (with
        checkpoint.async_save, where the directory will be once its background write commits)."""
        self.wait()  # one save in flight at a time
        if not params_finite_everywhere(self.state.model, self.mesh):
            self.log.warn(f"step {self.progress.step}: parameters are not finite: checkpoint not written")
            return None
        began = time.perf_counter()
        keep, hook, meta = self.cfg.checkpoint.keep_last, self.faults.save_hook(), self.meta_state()
        path = checkpoint_path(self.run_dir, self.progress.step, self.save_sharded)
        decide(self.mesh, lambda: self.check_run_dir(path), self.group)
        if self.save_sharded:  # every rank writes its shards; no rank holds the whole model
            tensors = self.state.sharded.tensors()
            nbytes = sum(v.numel() * v.element_size() for v in tensors.values())  # global shapes: the whole
            tmp = decide(self.mesh, lambda: storage_guarded(lambda: staging_dir(path), path, nbytes), self.group)

            def finish():
                return commit_sharded(tmp, path, meta, keep, before_commit=hook)

            try:
                written = write_shards(tensors, tmp, self.group, self.stager if self.cfg.checkpoint.async_save else None)
            except (Exception, CheckpointException) as e:  # every rank alike (DCP agrees on failures)
                if os_error(e) is None:
                    raise
                decide(self.mesh, lambda: remove_temporary(tmp), self.group)
                raise write_error(e, path, nbytes) from None
            if written is not None:  # rank 0 commits when every rank's shards are written
                self.pending, self.pending_target = then(written, finish if self.mesh.is_main else None), (path, tmp,
                                                                                                         nbytes)
                self.log.print(f"checkpoint: writing {path} in the background (training waited "
                            f"{time.perf_counter() - began:.2f} s)")
                return path
            decide(self.mesh, lambda: storage_guarded(finish, path, nbytes, tmp), self.group)
        else:  # rank 0 gathers and writes; the others wait for it in self.group
            state = self.full_state(meta)
            path = decide(self.mesh, lambda: save_checkpoint(state, path, keep, before_commit=hook), self.group)
            del state
        self.log.print(f"checkpoint: {path} ({time.perf_counter() - began:.2f} s)")
        return path

    def check_run_dir(self, path: Path) -> None:
        """Rank 0: the run directory still exists (a save would otherwise recreate it, silently)."""
        if not self.run_dir.is_dir():
            raise write_error(FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(self.run_dir)), path)

    # ---------------------------------------------------------------- restore

    def restore(self, path: Path) -> dict:
        """From a single file or a sharded directory, whatever layout wrote it. Returns the meta state."""
        self.wait()
        # checkpoints hold tensors at their single-process shapes (every expert): compare with those
        model_view, _ = self.state.sharded.view()
        if is_sharded(path):
            state = load_meta(path)
            self.verify(path, state)
            check_compatible({**state, "model": model_shapes(path)}, self.cfg.model_dict(), model_view, path)
            self.check_data(state, path)
            self.state.sharded.load(path, self.group)  # each rank reads its own shards
        else:
            state = load_checkpoint(path, verify=False)  # memory-mapped: each rank reads what it keeps
            self.verify(path, state)
            check_compatible(state, self.cfg.model_dict(), model_view, path)
            self.check_data(state, path)
            names = self.state.sharded.param_names()
            self.state.sharded.place(state["model"], {names[int(i)]: per for i, per in state["optimizer"]["state"].items()})
        note = restore_scaler(self.state.scaler, state["scaler"])
        if note:
            self.notes.append(note)
        self.data.load_state_dict(state.get("data_stream"))
        vars(self.progress).update(asdict(progress_of(state)))  # in place: the loop holds this object
        self.guard.load_state_dict(state.get("guard") or self.guard.state_dict())
        rng = state["rng"]
        if self.mesh.rank < rng["cpu"].shape[0]:  # a rank beyond the saved world keeps its seeded state
            # clone: set_rng_state reads a row view from its storage's start (and can crash)
            torch.set_rng_state(rng["cpu"][self.mesh.rank].clone())
            if self.state.device.type == "cuda" and "cuda" in rng and self.mesh.rank < rng["cuda"].shape[0]:
                torch.cuda.set_rng_state(rng["cuda"][self.mesh.rank].clone(), self.state.device)
        return state

    def restore_verified(self, path: Optional[Path], auto: bool) -> tuple[Optional[Path], Optional[dict]]:
        """(the checkpoint restored, its meta state), or (None, None) without one. With `auto`
        (--resume auto) a checkpoint that fails verification is named, set aside, and the next older
        one tried: none left, the lineage restarts at step 0."""
        while path is not None:
            try:
                return path, self.restore(path)
            except CheckpointDamaged as e:
                if not auto:
                    raise
                damaged, why, log = path, str(e), self.log

                def next_older():
                    log.warn(f"skipped checkpoint {damaged.name}: {why}; moved to {set_aside(damaged).name}")
                    return newest_whole(self.run_dir, move=True, report=log.warn)

                path = decide(self.mesh, next_older)
        return None, None

    def verify(self, path: Path, state: dict) -> None:
        """The file's checksum or the directory's manifest, verified by every rank together: each re-reads
        1/world of the bytes. Raises CheckpointDamaged on every rank alike."""
        m = self.mesh
        try:
            mine = (sharded_problem if is_sharded(path) else checksum_problem)(path, state, m.rank, m.world)
        except CheckpointError as e:  # no manifest: every rank finds the same
            mine = str(e)
        problems = [mine]
        if m.distributed:
            mine, problems = problems[0], [None] * m.world
            dist.all_gather_object(problems, mine, group=self.group)
        raise_if_corrupt(path, problems)

    def check_data(self, state: dict, path: Path) -> None:
        """Refuse a resume whose sample positions would mean other data (unless run.allow_data_change)."""
        saved = state.get("data", {})
        if "seq_len" not in saved:  # older checkpoints: from their config
            cfg = state["config"]
            saved = {**saved, "seq_len": cfg["train"]["seq_len"], "seed": cfg["train"]["seed"]}
        now = data_identity(self.cfg)
        changed = [f"{k}: checkpoint {saved.get(k)!r} vs now {now[k]!r}" for k in DATA_MEANING if saved.get(k) != now[k]]
        if changed and not self.cfg.run.allow_data_change:
            field = {"seq_len": "train.seq_len", "seed": "train.seed"}
            raise CheckpointError(f"resuming {path} would change what its data position means ("
                                  + "; ".join(changed) + "): samples would be skipped or repeated. Resume with the "
                                  f"checkpoint's values ({', '.join(field.get(k, 'data.' + k) for k in DATA_MEANING)}),"
                                  f" or accept it with --run.allow_data_change=true")
        files = file_changes(saved.get("files"), self.data.files) if not changed else []
        if files and not self.cfg.run.allow_data_change:
            raise CheckpointError(f"the data files changed since {path} was written (" + "; ".join(files) + "): its "
                                  f"position would point into other documents. Restore those files, or accept the "
                                  f"change with --run.allow_data_change=true ({DATA_CHANGE_RULE})")
        if files and self.mesh.is_main:
            print(f"warning: the data files changed since {path} (" + "; ".join(files) + f"); continuing as "
                  f"run.allow_data_change allows: {DATA_CHANGE_RULE}", file=sys.stderr, flush=True)


def storage_guarded(fn: Callable[[], Any], path: Path, nbytes: int, tmp: Optional[Path] = None) -> Any:
    """fn(); a storage fault inside becomes a CheckpointWriteError naming it (`tmp` removed first)."""
    try:
        return fn()
    except OSError as e:
        if tmp is not None:
            remove_temporary(tmp)
        if os_error(e) is None:
            raise
        raise write_error(e, path, nbytes) from None


def restore_scaler(scaler: torch.amp.GradScaler, saved: dict) -> Optional[str]:
    """Load a checkpoint's GradScaler state; one saved without a scaler (a bf16 or fp32 run) resumed in
    fp16 starts a fresh scaler at its initial scale instead. Returns what the header should say, if
    anything."""
    if scaler.is_enabled() and not saved:
        return f"a fresh GradScaler (scale {scaler.get_scale():g}): the checkpoint was saved without one (bf16 or fp32)"
    scaler.load_state_dict(saved)  # a no-op on a disabled scaler (fp16 -> bf16/fp32 drops the scale)
    return None


def progress_of(state: dict) -> Progress:
    """The progress of a checkpoint; older ones counted batches of their own layout: convert to samples."""
    p = dict(state["progress"])
    if "batches_consumed" in p:
        per_batch = state["layout"]["world"] * state["config"]["train"]["micro_batch"]
        p["samples"] = int(p.pop("batches_consumed")) * per_batch
        p["tokens"] = int(p.pop("tokens_seen"))
    return Progress(**{k: type(getattr(Progress, k))(v) for k, v in p.items()})


def schedule_of(state: Optional[dict], t) -> Schedule:
    """The schedule a checkpoint was following (older ones: planned for their own train.steps)."""
    if state is None:
        return Schedule(t)
    saved = state.get("schedule") or {"planned_steps": state["config"]["train"]["steps"], "replans": []}
    return Schedule(t, saved["replans"], int(saved["planned_steps"]))
