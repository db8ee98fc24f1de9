"""Single-file checkpoints: everything needed to continue, atomic writes, keep-last-K, strict loads.

A checkpoint holds only tensors and primitives, so `torch.load(path, weights_only=True)` reads it;
dsmoe reads it memory-mapped, so each rank of a resume reads only the parts it keeps. Its checksum is
taken while it is written and verified in parts (checksum.py). Run directories hold single files
`step_N.pt` and sharded directories `step_N/` (sharded.py) side by side; listing,
`--resume auto` and keep-last-K treat both as checkpoints.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Optional

import torch

from dsmoe.checkpoint import checksum

FORMAT = "dsmoe-checkpoint-v1"
NAME = re.compile(r"^step_(\d+)(\.pt)?$")
SHARDED_META = "meta.pt"  # written last into a sharded directory, before the rename that commits it


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says why and what to do."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint that could not be written (full disk, read-only or vanished directory); its
    temporaries are removed and the previous checkpoint is intact."""


class CheckpointDamaged(CheckpointError):
    """A checkpoint whose files are missing, altered, truncated or another run's: `--resume auto` moves
    it aside and takes an earlier one."""


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_path(run_dir: str | Path, step: int, sharded: bool = False) -> Path:
    return checkpoint_dir(run_dir) / (f"step_{step:07d}" if sharded else f"step_{step:07d}.pt")


def is_sharded(path: str | Path) -> bool:
    return Path(path).is_dir()


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Committed checkpoints, oldest first: files and directories named step_N (temporaries of
    interrupted writes are ignored). Whether each is whole is for verification to say."""
    d = checkpoint_dir(run_dir)
    found = [p for p in d.glob("step_*") if NAME.match(p.name)
             and (p.is_file() if p.suffix == ".pt" else p.is_dir())] if d.is_dir() else []
    return sorted(found, key=lambda p: (int(NAME.match(p.name).group(1)), p.is_file()))


def remove_checkpoint(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def remove_temporary(path: Path) -> None:
    """A failed save's temporary file or directory, removed as far as the disk lets it."""
    try:
        remove_checkpoint(path)
    except OSError:
        pass


def prune(run_dir: str | Path, keep_last: Optional[int], just_written: Path) -> None:
    """Keep the newest `keep_last` checkpoints of the run directory (one lineage: see run_dir.py), of
    either kind, and always the one just written."""
    if keep_last:
        for old in list_checkpoints(run_dir)[:-keep_last]:
            if old.resolve() != Path(just_written).resolve():
                remove_checkpoint(old)


def latest_checkpoint(run_dir: str | Path) -> Optional[Path]:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(state: dict, path: str | Path, keep_last: Optional[int] = None,
                    before_commit: Optional[Callable[[], None]] = None) -> Path:
    """Write to a temporary name, fsync, rename: a crash mid-save leaves the previous file intact.

    The file carries sha256 digests of its bytes, taken as they are written (checksum.py), checked on load."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    nbytes = checksum.tensor_bytes(state)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            writer = checksum.DigestWriter(f, checksum.chunk_size(nbytes))
            torch.save({"format": FORMAT, **state}, writer)
            writer.seal()
            f.flush()
            os.fsync(f.fileno())
        if before_commit is not None:
            before_commit()
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except Exception as e:
        remove_temporary(tmp)
        if os_error(e) is None:
            raise
        raise write_error(e, path, nbytes) from None
    prune(path.parent.parent, keep_last, path)
    return path


# why each storage fault stops a save, and what to do
_FIXES = {
    errno.ENOSPC: "the disk is full: free space there, or move the run directory to a disk with room and run the "
                  "same command with --resume auto (and --run.dir there)",
    errno.EROFS: "the file system is read-only: remount it writable, or copy the run directory to a writable disk "
                 "and run the same command with --resume auto and --run.dir there",
    errno.EACCES: "this user may not write there: fix the directory's permissions (chmod/chown) or its owner, then "
                  "run the same command with --resume auto",
    errno.ENOENT: "the run directory was deleted or moved while the run wrote to it: restore it (its checkpoints "
                  "with it) and run the same command with --resume auto",
}
_FIXES[errno.EDQUOT] = _FIXES[errno.ENOSPC]
_FIXES[errno.EPERM] = _FIXES[errno.EACCES]


def os_error(e: BaseException) -> Optional[OSError]:
    """The OSError behind `e`: itself, the error torch.save or DCP raised on top of it (RuntimeError,
    CheckpointException), or None."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno is not None:
            return e
        failures = getattr(e, "failures", None)  # DCP's CheckpointException: {rank: (error, traceback)}
        e = next(iter(failures.values()))[0] if failures else (e.__cause__ or e.__context__)
    return None


def write_error(e: BaseException, path: Path, nbytes: Optional[int] = None) -> CheckpointWriteError:
    """One message for a save that a storage fault stopped: the path, the cause, the fix, the bytes
    needed (full disk), and the previous checkpoint (intact: saves commit by rename)."""
    err = os_error(e)
    cause = f"{err.strerror} [{errno.errorcode.get(err.errno, err.errno)}]" + (f" at {err.filename}" if err.filename else "")
    lines = [f"checkpoint {path} could not be written: {cause}.",
             "  fix: " + _FIXES.get(err.errno, "make the run directory writable, then run the same command with "
                                                "--resume auto")]
    if err.errno in (errno.ENOSPC, errno.EDQUOT) and nbytes:
        existing = next((p for p in [Path(path), *Path(path).parents] if p.exists()), Path("/"))
        lines.append(f"  it needs about {nbytes / 2**20:.1f} MiB; {shutil.disk_usage(existing).free / 2**20:.1f} MiB "
                     f"were free on {existing} when the write failed")
    previous = [p for p in list_checkpoints(Path(path).parent.parent) if p.name != Path(path).name]
    lines.append("  its temporary files were removed; "
                 + (f"the previous checkpoint {previous[-1]} is intact" if previous else "there is no earlier checkpoint"))
    return CheckpointWriteError("\n".join(lines))


def _open(path: Path) -> dict:
    """torch.load with mmap (tensors stay in the page cache, shared by a node's ranks, until copied)."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # truncated zip, bad pickle, wrong file: all unusable
        if not _is_zip(path):
            raise CheckpointDamaged(f"'{path}' is not a checkpoint (not a torch.save archive): pass a step_N.pt file "
                                  f"or a step_N/ directory, or --resume auto") from None
        raise CheckpointDamaged(f"checkpoint '{path}' is truncated or corrupt ({type(e).__name__}); "
                              f"resume from an earlier checkpoint in {path.parent}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"'{path}' is not a dsmoe checkpoint (format {found})")
    return state


def peek(path: str | Path) -> dict:
    """A checkpoint's progress, config, layout and run lineage, without reading its tensors."""
    return {k: v for k, v in _open(Path(path)).items() if k not in ("model", "optimizer")}


def load_checkpoint(path: str | Path, verify: bool = True) -> dict:
    """The whole checkpoint, memory-mapped (tensors are read where they are used); with `verify`, its
    checksum checked first (a caller that verifies in parts, `checksum_problem`, passes False)."""
    path = Path(path)
    state = _open(path)
    if verify:
        raise_if_corrupt(path, [checksum_problem(path, state)])
    state.pop("checksum", None)
    return state


def checksum_problem(path: Path, state: dict, part: int = 0, parts: int = 1) -> Optional[str]:
    """What is wrong with chunks part, part + parts, ... of the file (None: nothing). Files written
    before the streamed digests carry one digest of their contents instead: part 0 checks it."""
    if "checksum" not in state:
        return checksum.problem(path, part, parts)
    payload = {k: v for k, v in state.items() if k not in ("format", "checksum")}
    if part == 0 and checksum.content_digest(payload) != state["checksum"]:
        return "its contents changed after it was written"
    return None


def raise_if_corrupt(path: Path, problems: list[Optional[str]]) -> None:
    found = [p for p in problems if p]
    if found:
        raise CheckpointDamaged(f"checkpoint '{path}' fails verification ({found[0]}); move it away and resume "
                                f"from an earlier checkpoint (--resume auto does)")


def _is_zip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_compatible(state: dict, model_sections: dict, model_state: dict, path: str | Path) -> None:
    """Refuse a checkpoint of another model, naming the changed config fields and mismatched tensors."""
    saved = _flatten({k: state["config"][k] for k in model_sections if k in state["config"]})
    now = _flatten(model_sections)
    changed = [f"{k}: checkpoint {saved.get(k)!r} vs config {now.get(k)!r}"
               for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k) and k != "model.name"]
    ckpt_tensors = state["model"]
    mismatched = [f"{k}: checkpoint {tuple(ckpt_tensors[k].shape)} vs model {tuple(v.shape)}"
                  for k, v in model_state.items() if k in ckpt_tensors and ckpt_tensors[k].shape != v.shape]
    missing = sorted(set(model_state) - set(ckpt_tensors))
    unexpected = sorted(set(ckpt_tensors) - set(model_state))
    if changed or mismatched or missing or unexpected:
        lines = [f"checkpoint '{path}' belongs to another model:"]
        lines += [f"  config changed  {c}" for c in changed[:8]] + (["  ..."] if len(changed) > 8 else [])
        tensors = [(mismatched, "with another shape"), (missing, "missing"), (unexpected, "not in this model")]
        lines += [f"  {len(items)} tensors {what}, e.g. {items[0]}" for items, what in tensors if items]
        lines.append("  fix: resume with the config the checkpoint was trained with (omit --config: it is stored "
                     "in the checkpoint), or start a fresh run in another run.dir")
        raise CheckpointError("\n".join(lines))
