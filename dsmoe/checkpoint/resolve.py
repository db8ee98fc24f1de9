"""The one `auto|PATH` resolver: which checkpoint training (--resume), generation, evaluation, export,
serving (--ckpt) and the converter read, and reading it whole whatever its format."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from dsmoe.checkpoint.file import CheckpointError, checkpoint_dir, is_sharded, latest_checkpoint, load_checkpoint

NONE = (None, "", "none")


def resolve(spec: Optional[str], run_dir: str | Path = ".", flag: str = "--ckpt", required: bool = True) -> Optional[Path]:
    """`auto` -> the newest complete checkpoint in `run_dir`/checkpoints; a path -> that path; None,
    "" or "none" -> None. `flag` names the option in messages.

    Raises CheckpointError for a path that does not exist (naming the run's newest checkpoint, if any),
    and, when `required`, for `auto` or none in a run directory without a checkpoint (a resume is not
    required: it starts fresh)."""
    if spec in NONE or spec == "auto":
        path = latest_checkpoint(run_dir) if spec == "auto" else None
        if path is None and required:
            raise CheckpointError(f"no checkpoint in {checkpoint_dir(run_dir)}: train first (make train), point "
                                  f"--run-dir at a run directory, or pass {flag} PATH")
        return path
    path = Path(spec)
    if not path.exists():
        newest = latest_checkpoint(run_dir)
        raise CheckpointError(f"checkpoint '{path}' does not exist"
                              + (f"; the newest in {run_dir} is {newest} ({flag} auto takes it)" if newest
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
