"""What a checkpoint holds and how a run continues from it: progress, RNG, data position, schedule.

The data position is `samples` consumed (global training windows), a layout-free unit: at world W,
micro-batch m and accumulation A a step reads samples [p, p + W*m*A), micro-step i on rank r the m
samples from p + (i*W + r)*m. A resume at another world size, micro-batch or accumulation therefore
continues at the next unread sample. A resume that changes what a position means (sequence length,
source, tokenizer, data seed) is refused unless `run.allow_data_change` is set.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from dsmoe.config import ConfigError
from dsmoe.parallel.fsdp import full, shard_like
from dsmoe.train.checkpoint import (CheckpointError, check_compatible, checkpoint_path, is_sharded, list_checkpoints,
                                    load_checkpoint, peek, save_checkpoint)
from dsmoe.train.optim import Schedule
from dsmoe.train.sharded_checkpoint import load_meta, model_shapes, save_sharded

DATA_MEANING = ("source", "tokenizer", "seq_len", "seed")  # fields whose change moves what a sample position means


@dataclass
class Progress:
    step: int = 0  # optimizer steps taken (skipped ones included)
    sched_step: int = 0  # steps that advanced the LR schedule (fp16 overflow skips do not)
    samples: int = 0  # training windows consumed, every rank's: the data position
    tokens: int = 0  # tokens trained on (samples x seq_len)
    skipped_overflow: int = 0
    lr_scale: float = 1.0  # lowered by each guard rollback


def broadcast(obj: Any, mesh) -> Any:
    """Rank 0's value on every rank: one decider for what the file system says."""
    if not mesh.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def decide(mesh, fn: Callable[[], Any]) -> Any:
    """Rank 0 runs `fn` (reads the file system, decides) and every rank gets its result, or raises its
    error (a ConfigError or CheckpointError) alike, so no rank acts on a different view of the disk."""
    outcome = None
    if mesh.is_main:
        try:
            outcome = ("ok", fn())
        except (ConfigError, CheckpointError) as e:
            outcome = ("error", (type(e), str(e)))
    status, value = broadcast(outcome, mesh)
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
    """The trainer's checkpoints: contents, save (one file or a sharded directory), restore."""

    def __init__(self, trainer):
        self.t = trainer

    def newest(self) -> Optional[Path]:
        return newest_checkpoint(self.t.run_dir, self.t.mesh)

    # ---------------------------------------------------------------- contents

    def gather_rng(self) -> dict:
        """Every rank's RNG states as [world, n] uint8 tensors (all ranks take part)."""
        t = self.t
        out = {}
        states = {"cpu": torch.get_rng_state()}
        if t.device.type == "cuda":
            states["cuda"] = torch.cuda.get_rng_state(t.device)
        for name, s in states.items():
            if t.mesh.distributed:
                comm = s.to(t.device) if t.device.type == "cuda" else s
                parts = [torch.empty_like(comm) for _ in range(t.mesh.world)]
                dist.all_gather(parts, comm)
                out[name] = torch.stack([p.cpu() for p in parts])
            else:
                out[name] = s[None]
        return out

    def meta_state(self) -> dict:
        """Everything but the model and optimizer tensors; every rank must call it (RNG states are gathered)."""
        t = self.t
        return {
            "scaler": t.scaler.state_dict(),
            "progress": asdict(t.progress),
            "schedule": t.schedule.state_dict(),
            "guard": t.guard.state_dict(),
            "rng": self.gather_rng(),
            "config": t.cfg.to_dict(),
            "layout": {"world": t.mesh.world, "ep": t.mesh.ep, "dp": "fsdp" if t.fsdp else "ddp"},
            "data": {**data_identity(t.cfg), "vocab_size": t.vocab_size},
            "run": {"lineage": t.lineage},
        }

    def full_state(self) -> dict:
        """The whole state as one single-process checkpoint; every rank must call it.

        Under expert parallelism rank 0's copy holds every expert (gathered from its EP group), so
        the file is exactly a single-process checkpoint and resumes at any ep."""
        t = self.t
        state = self.meta_state()
        model_state, optim_state = t.model.state_dict(), t.optimizer.state_dict()
        if t.fsdp:  # whole tensors (expert ones whole over edp; gathered over ep below)
            model_state = {k: full(v) for k, v in model_state.items()}
            optim_state["state"] = {i: {k: full(v) for k, v in per.items()} for i, per in optim_state["state"].items()}
        if t.experts is not None:
            t.experts.gather_state(model_state, optim_state, t.optimizer)
        return {"model": model_state, "optimizer": optim_state, **state}

    # ---------------------------------------------------------------- save

    def save(self) -> Optional[Path]:
        """Every rank calls it; never writes from non-finite parameters. The path on every rank."""
        t = self.t
        if not t.params_finite_everywhere():
            t.log.warn(f"step {t.progress.step}: parameters are not finite: checkpoint not written")
            return None
        keep = t.cfg.checkpoint.keep_last
        hook = t.faults.save_hook()
        if t.save_sharded:  # every rank writes its shards; no rank holds the whole model
            path = save_sharded(t.sharded.tensors(), self.meta_state(),
                                checkpoint_path(t.run_dir, t.progress.step, True), keep, t.mesh, before_commit=hook)
        else:
            state = self.full_state()
            path = None
            if t.mesh.is_main:
                path = save_checkpoint(state, checkpoint_path(t.run_dir, t.progress.step), keep, before_commit=hook)
        path = broadcast(path, t.mesh)  # also: nobody races ahead of a checkpoint still being written
        t.log.print(f"checkpoint: {path}")
        return path

    # ---------------------------------------------------------------- restore

    def restore(self, path: Path) -> dict:
        """From a single file or a sharded directory, whatever layout wrote it. Returns the meta state."""
        t = self.t
        # checkpoints hold tensors at their single-process shapes (every expert): compare with those
        model_state = t.model.state_dict()
        if t.experts is not None:
            model_state = t.experts.full_shapes(model_state)
        if is_sharded(path):
            state = load_meta(path)
            check_compatible({**state, "model": model_shapes(path)}, t.cfg.model_dict(), model_state, path)
            self.check_data(state, path)
            t.sharded.load(path)  # each rank reads its own shards
        else:
            state = load_checkpoint(path)
            check_compatible(state, t.cfg.model_dict(), model_state, path)
            self.check_data(state, path)
            if t.experts is not None:  # keep this rank's experts
                t.experts.take_slice(state, t.optimizer)
            if t.fsdp:
                self._shard_like_live(state)
            t.model.load_state_dict(state["model"])
            t.optimizer.load_state_dict(state["optimizer"])
        t.scaler.load_state_dict(state["scaler"])
        vars(t.progress).update(asdict(progress_of(state)))  # in place: the loop holds this object
        t.guard.load_state_dict(state.get("guard") or t.guard.state_dict())
        rng = state["rng"]
        if t.mesh.rank < rng["cpu"].shape[0]:  # a rank beyond the saved world keeps its seeded state
            # clone: set_rng_state reads a row view from its storage's start (and can crash)
            torch.set_rng_state(rng["cpu"][t.mesh.rank].clone())
            if t.device.type == "cuda" and "cuda" in rng and t.mesh.rank < rng["cuda"].shape[0]:
                torch.cuda.set_rng_state(rng["cuda"][t.mesh.rank].clone(), t.device)
        return state

    def check_data(self, state: dict, path: Path) -> None:
        """Refuse a resume whose sample positions would mean other data (unless run.allow_data_change)."""
        saved = state.get("data", {})
        if "seq_len" not in saved:  # older checkpoints: from their config
            cfg = state["config"]
            saved = {**saved, "seq_len": cfg["train"]["seq_len"], "seed": cfg["train"]["seed"]}
        now = data_identity(self.t.cfg)
        changed = [f"{k}: checkpoint {saved.get(k)!r} vs now {now[k]!r}" for k in DATA_MEANING if saved.get(k) != now[k]]
        if changed and not self.t.cfg.run.allow_data_change:
            field = {"seq_len": "train.seq_len", "seed": "train.seed"}
            raise CheckpointError(f"resuming {path} would change what its data position means ("
                                  + "; ".join(changed) + "): samples would be skipped or repeated. Resume with the "
                                  f"checkpoint's values ({', '.join(field.get(k, 'data.' + k) for k in DATA_MEANING)}),"
                                  f" or accept it with --run.allow_data_change=true")

    def _shard_like_live(self, state: dict) -> None:
        """Whole tensors of a single-file checkpoint -> this rank's FSDP shards, in place on `state`."""
        t = self.t
        live = t.model.state_dict()
        for name, value in state["model"].items():
            state["model"][name] = shard_like(value, live[name])
        params = [p for g in t.optimizer.param_groups for p in g["params"]]
        for i, per_param in state["optimizer"]["state"].items():
            p = params[i]
            for key, v in per_param.items():
                if torch.is_tensor(v) and v.shape == p.shape:
                    per_param[key] = shard_like(v, p)


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
