"""Which files a run reads: the resolved list with each file's size and a cheap fingerprint, kept in
every checkpoint so that a resume over changed files (a shard added under the same glob, a parquet
file replaced under its name, a file removed) is refused by name instead of silently reading other
data, or spinning on a position that no longer exists.

The fingerprint is the size and the sha256 of the first and last 64 KiB: it reads 128 KiB per file
whatever its size, and catches a replaced file (a parquet file's footer, with its row counts and
statistics, is in its last bytes) or a file grown or cut. An edit inside a large file's middle that
keeps its size goes unseen.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Optional

BLOCK = 64 * 1024


def fingerprint(path: str) -> dict:
    """{"size": bytes, "sha256": hex digest of the first and last BLOCK bytes}."""
    size = os.path.getsize(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(BLOCK))
        if size > BLOCK:
            f.seek(max(BLOCK, size - BLOCK))
            digest.update(f.read(BLOCK))
    return {"size": size, "sha256": digest.hexdigest()}


def files_identity(files: Optional[list]) -> Optional[dict]:
    """{path: fingerprint} of the resolved files, in reading order; None when the source is not local
    files (the checksummed bundled corpus, a Hub dataset fixed by name and revision)."""
    return None if files is None else {str(f): fingerprint(str(f)) for f in files}


def local_source_files(source: str) -> Optional[list[Path]]:
    """The document files a prepared (non-streaming) local source reads; None for other sources."""
    from dsmoe.data.sources import SHAKESPEARE, local_files

    path = Path(source)
    if source == SHAKESPEARE or source.startswith("hf:") or (path / "meta.json").is_file():
        return None
    return local_files(path)


def file_changes(saved: Optional[dict], now: Optional[dict], limit: int = 8) -> list[str]:
    """What differs between two files_identity() results, in words: added, removed, changed files
    (nothing when either is None: an older checkpoint, or a source that is not local files)."""
    if saved is None or now is None:
        return []
    def names(paths: list[str]) -> str:
        return ", ".join(paths[:limit]) + (f" and {len(paths) - limit} more" if len(paths) > limit else "")

    added = [p for p in now if p not in saved]
    removed = [p for p in saved if p not in now]
    changed = [f"{p} ({saved[p]['size']} -> {now[p]['size']} bytes)" if saved[p]["size"] != now[p]["size"]
               else f"{p} (same size, other contents)" for p in now if p in saved and saved[p] != now[p]]
    out = [f"{what}: {names(paths)}" for what, paths in (("added", added), ("removed", removed),
                                                          ("changed", changed)) if paths]
    if not out and list(saved) != list(now):
        out.append("the same files in another order")
    return out
