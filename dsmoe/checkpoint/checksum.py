"""Checksums of single-file checkpoints: computed while the file is written, verified in parts.

`torch.save` streams the archive through `DigestWriter`, which hashes every `chunk` bytes of the file
(sha256) as they pass on their way to disk, so the checksum adds no pass over the data. `seal` puts
the digests into the zip archive comment, the zip format's free text after the central directory
(`unzip -z FILE` prints it; torch.load and zipfile read the archive as before). `problem(path, part,
parts)` re-hashes chunks part, part + parts, ...: the ranks of a resume verify one file together,
each reading 1/world of it. A file that anything else rewrote (torch.save of an edited state) has no
digests and fails.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Optional

import torch

MAGIC = b"dsmoe-sha256"
EOCD = b"PK\x05\x06"  # zip end-of-central-directory record: 22 bytes, its last 2 the comment's length
EOCD_BYTES = 22
MAX_COMMENT = 0xFFFF
READ_BYTES = 4 << 20  # verification reads this much at a time (its only buffer)


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor in a nested dict / list."""
    if isinstance(obj, torch.Tensor):
        return obj.untyped_storage().nbytes()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def chunk_size(nbytes: int) -> int:
    """64 MiB, or the power of two that keeps a file of about `nbytes` within 512 digests (the comment
    holds 1000 of them)."""
    size = 64 << 20
    while nbytes > 512 * size:
        size *= 2
    return size


class DigestWriter:
    """A binary file for torch.save that hashes what passes through it, `chunk` bytes per digest."""

    def __init__(self, f, chunk: int):
        self.f, self.chunk = f, chunk
        self.digests: list[bytes] = []
        self.hash, self.filled = hashlib.sha256(), 0
        self.tail = b""  # the last EOCD_BYTES written

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        pos = 0
        while pos < len(view):
            take = min(len(view) - pos, self.chunk - self.filled)
            self.hash.update(view[pos:pos + take])
            self.filled += take
            pos += take
            if self.filled == self.chunk:
                self.digests.append(self.hash.digest())
                self.hash, self.filled = hashlib.sha256(), 0
        self.tail = (self.tail + bytes(view[-EOCD_BYTES:]))[-EOCD_BYTES:]
        return self.f.write(view)

    def flush(self) -> None:
        self.f.flush()

    def seal(self) -> None:
        """After torch.save: the digests into the archive comment (torch writes none)."""
        if self.filled:
            self.digests.append(self.hash.digest())
        comment = b" ".join([MAGIC, b"chunk=%d" % self.chunk] + [d.hex().encode() for d in self.digests])
        if not self.tail.startswith(EOCD) or self.tail[-2:] != b"\0\0" or len(comment) > MAX_COMMENT:
            raise RuntimeError("torch.save did not end the archive with a bare end-of-central-directory record "
                               f"(or {len(self.digests)} digests do not fit its comment)")
        self.f.seek(-2, os.SEEK_END)
        self.f.write(len(comment).to_bytes(2, "little") + comment)


def _read_digests(tail: bytes) -> Optional[tuple[int, list[bytes], int]]:
    """(chunk, digests, comment length) from the end of a file, or None without them. The comment is
    ASCII, so the last EOCD signature is the record's own."""
    at = tail.rfind(EOCD)
    if at < 0 or len(tail) - at < EOCD_BYTES:
        return None
    length = int.from_bytes(tail[at + EOCD_BYTES - 2:at + EOCD_BYTES], "little")
    words = tail[at + EOCD_BYTES:].split(b" ")
    if at + EOCD_BYTES + length != len(tail) or len(words) < 2 or words[0] != MAGIC or \
            not words[1].startswith(b"chunk="):
        return None
    try:
        return int(words[1][6:]), [bytes.fromhex(w.decode()) for w in words[2:]], length
    except ValueError:
        return None


def _digests_of(f, size: int):
    """(chunk, digests, comment length) of an open file of `size` bytes, or what is wrong."""
    f.seek(max(0, size - EOCD_BYTES - MAX_COMMENT))
    found = _read_digests(f.read())
    if found is None:
        return "it carries no checksum: it was cut, or rewritten after dsmoe wrote it"
    chunk, digests, comment = found
    if len(digests) != -(-(size - comment) // chunk):
        return f"{len(digests)} digests for {size - comment} bytes in chunks of {chunk}: the file was cut or extended"
    return found


def layout_problem(path: str | Path) -> Optional[str]:
    """Whether the file's digests are there and cover its length (its tail is read, nothing hashed)."""
    size = Path(path).stat().st_size
    with open(path, "rb") as f:
        found = _digests_of(f, size)
    return found if isinstance(found, str) else None


def problem(path: str | Path, part: int = 0, parts: int = 1) -> Optional[str]:
    """None when chunks part, part + parts, ... of the file match their digests; else what is wrong.
    The digests were taken before `seal` wrote the comment's length (the archive's last 2 bytes, zero
    then): verification hashes zeros there."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        found = _digests_of(f, size)
        if isinstance(found, str):
            return found
        chunk, digests, comment = found
        end = size - comment  # the archive as torch.save wrote it
        for i in range(part, len(digests), parts):
            start, stop = i * chunk, min((i + 1) * chunk, end)
            h, pos = hashlib.sha256(), start
            f.seek(start)
            while pos < stop:
                block = f.read(min(READ_BYTES, stop - pos))
                if not block:
                    return f"it ends at byte {pos}, before its checksummed bytes"
                if pos + len(block) > end - 2:  # the comment's length: zero when it was hashed
                    keep = max(0, end - 2 - pos)
                    block = block[:keep] + bytes(len(block) - keep)
                h.update(block)
                pos += len(block)
            if h.digest() != digests[i]:
                return f"bytes {start}-{stop} do not match their digest"
    return None


def content_digest(state: dict) -> str:
    """sha256 over every tensor's bytes and every primitive, in key order: the checksum of files written
    before the streamed digests, kept to verify those."""
    h = hashlib.sha256()

    def feed(obj, key: str) -> None:
        h.update(key.encode())
        if isinstance(obj, torch.Tensor):
            t = obj.detach().cpu().contiguous()
            h.update(str((t.dtype, tuple(t.shape))).encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(obj, dict):
            for k in sorted(obj, key=str):
                feed(obj[k], f"{key}.{k}")
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                feed(v, f"{key}[{i}]")
        else:
            h.update(repr(obj).encode())

    feed(state, "")
    return h.hexdigest()
