"""Run directories: one run lineage per directory, never overwritten or pruned by another run.

A lineage is a run and every resume of it. `run.json` in the directory names it; every checkpoint
carries it too. A fresh run into a directory that holds another run is refused (or, with
`run.overwrite`, the old files are moved aside to `RUN_DIR.replaced-TIME`, never deleted); a resume
continues only in its own lineage's directory and only from its newest checkpoint there, so nothing
it writes replaces a later checkpoint. Rank 0 decides; the others follow what it broadcasts.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Callable, Optional

from dsmoe.config import ConfigError
from dsmoe.checkpoint.file import NAME, checkpoint_dir, list_checkpoints
from dsmoe.checkpoint.resolve import problem, set_aside

RUN_FILE = "run.json"
RUN_FILES = ("metrics.jsonl", "metrics.csv", "samples.jsonl", "config.yaml")  # what a run writes besides checkpoints
SUPERSEDED = "superseded"  # rows of steps lost to a crash, moved aside on resume (metrics.superseded.jsonl)


class RunDirError(ConfigError):
    """The run directory belongs to another run (or would lose work): the message names the ways out."""


def new_lineage() -> str:
    return time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:8]


def read_lineage(run_dir: Path) -> Optional[str]:
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())["lineage"]
    except (ValueError, KeyError) as e:
        raise RunDirError(f"{path} is unreadable ({e}); restore it or pick a new --run.dir") from None


def read_run_file(run_dir: Path) -> dict:
    """run.json's fields ({} when absent): lineage, created, started_from, trackers."""
    path = Path(run_dir) / RUN_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def update_run_file(run_dir: Path, **fields) -> None:
    """Add fields to run.json (e.g. trackers: the W&B / MLflow run ids a resume continues)."""
    path = Path(run_dir) / RUN_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({**read_run_file(run_dir), **fields}, indent=2) + "\n")
    tmp.replace(path)


def resume_hint() -> str:
    """How to continue a run: `add --resume auto`, or the command a wrapper set (`make resume`)."""
    return f"run {os.environ['DSMOE_RESUME_COMMAND']}" if os.environ.get("DSMOE_RESUME_COMMAND") else \
        "add --resume auto"


def holds_a_run(run_dir: Path) -> bool:
    run_dir = Path(run_dir)
    return (run_dir / RUN_FILE).exists() or bool(list_checkpoints(run_dir)) or \
        any((run_dir / f).exists() for f in RUN_FILES[:3])


def step_of(path: Path) -> int:
    return int(NAME.match(Path(path).name).group(1))


def claim(run_dir: Path, resume: Optional[Path], resume_lineage: Optional[str], overwrite: bool,
          write: bool = True, continue_without_checkpoint: bool = False,
          report: Callable[[str], None] = print) -> str:
    """Rank 0: make `run_dir` this run's, or refuse. Returns the lineage the run writes under. With
    write=False only the checks run (nothing is created or moved). `continue_without_checkpoint`
    (--resume auto): a lineage with no checkpoint yet is continued from step 0, not refused. A resume
    of an older checkpoint is accepted when every newer one fails verification; those are set aside
    (named to `report`).

    Raises RunDirError when a fresh run meets another run's files, when a resume meets another
    lineage's directory, or when newer checkpoints of the same lineage would be overwritten."""
    run_dir = Path(run_dir)
    owner = read_lineage(run_dir)
    if resume is None:
        if continue_without_checkpoint and owner is not None and not list_checkpoints(run_dir):
            return owner  # killed before its first checkpoint: the lineage starts again at step 0
        if holds_a_run(run_dir):
            if not overwrite:
                newest = list_checkpoints(run_dir)
                raise RunDirError(
                    f"{run_dir} holds another run" + (f" (newest checkpoint {newest[-1].name})" if newest else "")
                    + ". Nothing was written. Either\n"
                    f"  - continue it:            {resume_hint()}\n"
                    f"  - start a separate run:   pass a new --run.dir=DIR\n"
                    f"  - replace it:             add --run.overwrite=true (its files move to "
                    f"{run_dir.name}.replaced-TIME, nothing is deleted)")
            if write:
                moved = move_aside(run_dir)
                print(f"{run_dir} held another run (run {owner or 'unknown'}): moved to {moved} "
                      f"(run.overwrite=true; nothing deleted)", flush=True)
        lineage = new_lineage()
        if write:
            write_run_file(run_dir, lineage, started_from=None)
        return lineage
    lineage = resume_lineage or owner or new_lineage()  # checkpoints older than lineages adopt the directory
    inside = resume.resolve().parent == checkpoint_dir(run_dir).resolve()
    if owner is not None and owner != lineage or owner is None and holds_a_run(run_dir) and not inside:
        raise RunDirError(f"{run_dir} belongs to another run than checkpoint {resume} (lineage {owner or 'unknown'} "
                          f"vs {lineage}). Nothing was written. Continue this checkpoint in a new directory: "
                          f"--run.dir=DIR (or move {run_dir} away)")
    newer = [p for p in list_checkpoints(run_dir) if step_of(p) > step_of(resume)] if NAME.match(resume.name) else []
    damaged = {p: problem(p, digests=True) for p in newer}
    newer = [p for p in newer if damaged[p] is None]
    if newer:
        raise RunDirError(f"{run_dir} holds newer checkpoints of this run ({', '.join(p.name for p in newer)}) than "
                          f"{resume.name}: continuing here would overwrite them. Nothing was written. Use "
                          f"--resume auto to continue the newest, or branch from {resume.name} into a new "
                          f"--run.dir=DIR")
    if write:  # every newer one failed verification: set aside, so the resume continues past them
        for p, why in damaged.items():
            report(f"checkpoint {p.name} is newer than {resume.name} but unusable ({why}); moved to "
                   f"{set_aside(p).name}")
    if owner is None and write:
        write_run_file(run_dir, lineage, started_from=str(resume))
    return lineage


def write_run_file(run_dir: Path, lineage: str, started_from: Optional[str]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    info = {"lineage": lineage, "created": time.strftime("%Y-%m-%d %H:%M:%S"), "started_from": started_from}
    (run_dir / RUN_FILE).write_text(json.dumps(info, indent=2) + "\n")


def move_aside(run_dir: Path) -> Path:
    """`run.overwrite`: the old run's directory becomes RUN_DIR.replaced-TIME, whole."""
    target = run_dir.with_name(f"{run_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir.rename(target)
    return target


def remove_interrupted_saves(run_dir: Path) -> list[Path]:
    """Temporary files and directories of saves that were killed before their rename (this lineage's)."""
    d = checkpoint_dir(run_dir)
    leftovers = [p for p in d.glob(".step_*.tmp*")] if d.is_dir() else []
    for p in leftovers:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return leftovers


def supersede_rows(run_dir: Path, step: int) -> int:
    """On resume at `step`: rows logged for later steps (work lost with the process that logged them)
    move from metrics.jsonl / samples.jsonl / metrics.csv to their `.superseded` twins, so each step
    is logged once; so do torn or undecodable lines (a crash mid-write, a damaged disk), with a
    warning. Returns the number of rows moved."""
    moved = 0
    for name in ("metrics.jsonl", "samples.jsonl", "metrics.csv"):
        path = Path(run_dir) / name
        if not path.is_file():
            continue
        lines = path.read_bytes().splitlines(keepends=True)
        keep, gone = ([lines[0]], []) if name.endswith(".csv") and lines else ([], [])
        aside = path.with_name(f"{path.stem}.{SUPERSEDED}{path.suffix}")
        for number, line in enumerate(lines[len(keep):], start=len(keep) + 1):
            row_step = _row_step(line, name)
            if row_step is None:
                print(f"warning: {path}:{number} is a torn or undecodable row (a crash mid-write?): moved to "
                      f"{aside.name}", file=sys.stderr, flush=True)
                gone.append(line if line.endswith(b"\n") else line + b"\n")
            else:
                (gone if row_step > step else keep).append(line)
        if gone:
            with open(aside, "ab") as f:
                f.writelines(gone)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_bytes(b"".join(keep))
            tmp.replace(path)
            moved += len(gone)
    return moved


def _row_step(line: bytes, name: str) -> Optional[int]:
    """The row's step; None for a torn line (no newline, or not JSON) or one that is not UTF-8."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if not text.endswith("\n"):
        return None
    if not text.strip():
        return -1
    try:
        return int(json.loads(text)["step"]) if name.endswith(".jsonl") else int(text.split(",", 1)[0])
    except (ValueError, KeyError, IndexError, TypeError):
        return None if name.endswith(".jsonl") else -1  # a csv line of another shape: keep it
