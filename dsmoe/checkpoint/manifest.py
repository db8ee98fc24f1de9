"""Integrity of sharded (DCP) directories: a manifest of sha256 digests taken while writing, bound to
the run's lineage, verified in shares on load; and DCP's `.metadata` read without running code.

    step_N/__R_0.distcp   rank R's shards; R digests the bytes as it writes them (`ManifestWriter`)
    step_N/__R_sha256.json   what rank R wrote: {file: {sha256, bytes}} (merged, then removed, at commit)
    step_N/manifest.json  written last by rank 0: every file's digest and size, the lineage and the step

A directory counts as a checkpoint only when meta.pt, .metadata and manifest.json are present and every
file matches its digest: another run's shards or index under this run's meta.pt, a truncated or
altered shard, a missing file, are each refused with the file named (`problem`).

DCP's FileSystemReader unpickles `.metadata` with `pickle.load`, which runs whatever the file says.
`SafeReader` reads it with an unpickler that admits only the classes DCP's index is made of
(torch.distributed.checkpoint.metadata, the filesystem's _StorageInfo, dtypes, torch.Size, paths), and
refuses entries DCP would read with `torch.load(weights_only=False)` (BytesStorageMetadata: dsmoe
saves tensors only).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
from pathlib import Path
from typing import Optional

import torch
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "dsmoe-manifest-v1"
RANK_DIGESTS = "sha256.json"  # __R_sha256.json: one rank's digests until the commit merges them
READ_BYTES = 4 << 20

_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "TensorStorageMetadata", "TensorProperties",
                                              "ChunkStorageMetadata", "MetadataIndex", "StorageMeta",
                                              "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},  # a layout by its name, e.g. "torch.strided"
    "torch": {"Size"},
    "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class _Digesting(io.RawIOBase):
    """A file DCP writes through (sequentially): the sha256 and size of every byte written."""

    def __init__(self, f):
        self.f, self.hash, self.size = f, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self.hash.update(view)
        self.size += len(view)
        return self.f.write(view)

    def tell(self) -> int:
        return self.size

    def fileno(self) -> int:
        return self.f.fileno()

    def flush(self) -> None:
        self.f.flush()


class _DigestingFileSystem(FileSystem):
    def __init__(self):
        self.digests: dict[str, dict] = {}

    @contextlib.contextmanager
    def create_stream(self, path, mode: str):
        if mode != "wb":
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        name = Path(path).name
        with open(path, "wb") as f:
            stream = _Digesting(f)
            yield stream
            self.digests[name] = {"sha256": stream.hash.hexdigest(), "bytes": stream.size}

    def rename(self, path, new_path) -> None:
        super().rename(path, new_path)
        if Path(path).name in self.digests:
            self.digests[Path(new_path).name] = self.digests.pop(Path(path).name)


class ManifestWriter(FileSystemWriter):
    """DCP's file writer, digesting each file as it is written (no second read); once this rank's
    files are written it leaves their digests in `__R_sha256.json` for rank 0's commit."""

    def __init__(self, path: str | os.PathLike):
        super().__init__(path)
        self.fs = _DigestingFileSystem()

    def write_data(self, plan, planner):
        future = super().write_data(plan, planner)
        future.wait()  # FileSystemWriter writes before it returns: this only surfaces its error
        prefix = plan.storage_data.prefix
        mine = {k: v for k, v in self.fs.digests.items() if k.startswith(prefix)}
        _write_json(Path(self.path) / f"{prefix}{RANK_DIGESTS}", mine)
        return future


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if name in _METADATA_CLASSES.get(module, ()) or \
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name}")


class SafeReader(FileSystemReader):
    """DCP's file reader with `.metadata` read by the restricted unpickler (see the module docstring)."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        path = Path(self.path) / ".metadata"
        return read_metadata_file(path, getattr(self, "load_id", None))


def read_metadata_file(path: Path, load_id=None) -> Metadata:
    """DCP's index at `path`, admitting only its own classes. Raises CheckpointDamaged naming the file."""
    from dsmoe.checkpoint.file import CheckpointDamaged

    fix = f"move {path.parent} away and resume from an earlier checkpoint (--resume auto does)"
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except pickle.UnpicklingError as e:
        raise CheckpointDamaged(f"'{path}' calls {e}, which DCP's index never does: a pickle that could run code, "
                                f"so it was not read; {fix}") from None
    except FileNotFoundError:
        raise CheckpointDamaged(f"'{path}' is missing: the checkpoint is incomplete; {fix}") from None
    except Exception as e:  # truncated, or not a pickle
        raise CheckpointDamaged(f"'{path}' is unreadable ({type(e).__name__}: {e}); {fix}") from None
    if not isinstance(metadata, Metadata):
        raise CheckpointDamaged(f"'{path}' holds a {type(metadata).__name__}, not DCP's Metadata; {fix}")
    odd = [k for k, v in metadata.state_dict_metadata.items() if not isinstance(v, TensorStorageMetadata)]
    if odd:
        raise CheckpointDamaged(f"'{path}' lists {odd[0]!r} as pickled bytes (DCP loads those with "
                                f"weights_only=False; dsmoe saves tensors only); {fix}")
    if getattr(metadata, "storage_meta", None) is None:
        metadata.storage_meta = StorageMeta()
    metadata.storage_meta.load_id = load_id
    return metadata


def _write_json(path: Path, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def digest_file(path: Path) -> dict:
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(READ_BYTES):
            h.update(block)
            size += len(block)
    return {"sha256": h.hexdigest(), "bytes": size}


def write_manifest(directory: Path, lineage: Optional[str], step: int, meta_digest: dict) -> None:
    """Rank 0, every rank's shards written: merge their digests, add the index's (re-read: it is small)
    and meta.pt's, write manifest.json last."""
    files: dict[str, dict] = {}
    for part in sorted(directory.glob(f"*{RANK_DIGESTS}")):
        files.update(json.loads(part.read_text()))
    files[".metadata"] = digest_file(directory / ".metadata")
    from dsmoe.checkpoint.file import SHARDED_META

    files[SHARDED_META] = meta_digest
    _write_json(directory / MANIFEST, {"format": MANIFEST_FORMAT, "lineage": lineage, "step": step, "files": files})
    for part in directory.glob(f"*{RANK_DIGESTS}"):
        part.unlink()


def read_manifest(directory: Path) -> dict:
    """manifest.json of a committed directory. Raises CheckpointDamaged naming what is missing."""
    from dsmoe.checkpoint.file import CheckpointDamaged

    path = directory / MANIFEST
    try:
        manifest = json.loads(path.read_text())
        assert manifest["format"] == MANIFEST_FORMAT and isinstance(manifest["files"], dict)
        return manifest
    except FileNotFoundError:
        why = "is missing: the checkpoint is incomplete (or written before manifests)"
    except (ValueError, KeyError, TypeError, AssertionError) as e:
        why = f"is unreadable ({type(e).__name__})"
    raise CheckpointDamaged(f"'{path}' {why}; move {directory} away and resume from an earlier checkpoint "
                            f"(--resume auto does)")


def problem(directory: Path, manifest: dict, lineage: Optional[str], part: int = 0, parts: int = 1,
            digests: bool = True) -> Optional[str]:
    """What is wrong with a sharded directory's files part, part + parts, ... (sorted by name) against its
    manifest, or with the set of files and the lineage (part 0); None when nothing is. Without `digests`
    only presence and sizes are checked (no file is read)."""
    files = manifest["files"]
    if part == 0:
        if manifest.get("lineage") != lineage:
            return (f"its manifest belongs to run {manifest.get('lineage')}, its meta.pt to run {lineage}: files of "
                    f"another run were put in it")
        present = {p.name for p in directory.iterdir() if p.name != MANIFEST}
        if sorted(present - set(files)):
            return f"'{directory / sorted(present - set(files))[0]}' is not in its manifest"
    for name in sorted(files)[part::parts]:
        path = directory / name
        if not path.is_file():
            return f"'{path}' is missing"
        size = path.stat().st_size
        if size != files[name]["bytes"]:
            return f"'{path}' holds {size} bytes where {files[name]['bytes']} were written (truncated or extended)"
        if digests and digest_file(path)["sha256"] != files[name]["sha256"]:
            return f"'{path}' does not match its sha256 digest (altered, or another run's)"
    return None
