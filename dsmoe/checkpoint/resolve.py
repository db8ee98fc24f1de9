"""The one `auto|PATH` resolver: which checkpoint training (--resume), generation, evaluation, export,
serving (--ckpt) and the converter read, and reading it whole whatever its format.

`auto` takes the newest checkpoint that is whole: every file present at the size written (files are
re-hashed when they are read, in shares: see Checkpoints.verify). Each one passed over is named with
the reason; training moves it aside (`step_N.pt.damaged-TIME`, never deleted) so the run continues
from the one before and nothing it writes collides with it.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable, Optional

from dsmoe.checkpoint import checksum
from dsmoe.checkpoint.file import (CheckpointDamaged, CheckpointError, checkpoint_dir, is_sharded, list_checkpoints,
                                   load_checkpoint, peek)

NONE = (None, "", "none")


def _warn(text: str) -> None:
    print(f"warning: {text}", file=sys.stderr, flush=True)


def problem(path: Path, digests: bool = False) -> Optional[str]:
    """What makes checkpoint `path` unusable (None: nothing found). Without `digests`, only what needs no
    pass over its bytes: files present, sizes, a file's digests covering it, the lineage of a directory."""
    from dsmoe.checkpoint.sharded import load_meta, sharded_problem

    try:
        if is_sharded(path):
            return sharded_problem(path, load_meta(path), digests=digests)
        if digests:
            load_checkpoint(path)
            return None
        found = checksum.layout_problem(path)
        if found and "checksum" in peek(path):  # written before the streamed digests: one digest inside
            return None
        return found
    except CheckpointDamaged as e:
        return str(e)
    except OSError as e:
        return f"{type(e).__name__}: {e}"


def set_aside(path: Path) -> Path:
    """`step_N[.pt]` -> `step_N[.pt].damaged-TIME` beside it (never deleted: it may be repaired)."""
    target = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
    path.rename(target)
    return target


def newest_whole(run_dir: str | Path, move: bool = False, report: Callable[[str], None] = _warn,
                 digests: bool = False) -> Optional[Path]:
    """The newest checkpoint of `run_dir` without a `problem`; each newer one is named to `report`
    with its reason and, with `move`, set aside."""
    for path in reversed(list_checkpoints(run_dir)):
        found = problem(path, digests)
        if found is None:
            return path
        report(f"skipped checkpoint {path.name}: {found}"
               + (f"; moved to {set_aside(path).name}" if move else ""))
    return None


def resolve(spec: Optional[str], run_dir: str | Path = ".", flag: str = "--ckpt", required: bool = True,
            move: bool = False, report: Callable[[str], None] = _warn) -> Optional[Path]:
    """`auto` -> the newest whole checkpoint in `run_dir`/checkpoints (see `newest_whole`; `move` sets
    the others aside); a path -> that path; None, "" or "none" -> None. `flag` names the option in
    messages.

    Raises CheckpointError for a path that does not exist (naming the run's newest checkpoint, if any),
    and, when `required`, for `auto` or none in a run directory without a usable checkpoint (a resume is
    not required: it starts fresh)."""
    if spec in NONE or spec == "auto":
        path = newest_whole(run_dir, move, report) if spec == "auto" else None
        if path is None and required:
            raise CheckpointError(f"no usable checkpoint in {checkpoint_dir(run_dir)}: train first (make train), "
                                  f"point --run-dir at a run directory, or pass {flag} PATH")
        return path
    path = Path(spec)
    if not path.exists():
        found = list_checkpoints(run_dir)
        raise CheckpointError(f"checkpoint '{path}' does not exist"
                              + (f"; the newest in {run_dir} is {found[-1]} ({flag} auto takes it)" if found
                                 else f"; pass {flag} auto with the run's directory to take its newest"))
    return path


def read_state(path: str | Path, optimizer: bool = True) -> dict:
    """A checkpoint of either format as a single file's state, verified; without `optimizer`, its
    model tensors only (a sharded directory's optimizer shards are then not read)."""
    from dsmoe.checkpoint.convert import to_file_state

    path = Path(path)
    if is_sharded(path):
        return to_file_state(path, optimizer)
    state = load_checkpoint(path)
    if not optimizer:
        state.pop("optimizer", None)
    return state
