"""Host memory of this process over a block of code (Linux, from /proc/self/status).

    with HostMemory() as mem:
        trainer.checkpoints.restore(path)
    mem.peak["rss"], mem.peak["anon"], mem.grew("anon")      # bytes

`rss` is the resident set; `anon` its private part (what the process allocated) and `file` its
file-backed part (mapped files such as a memory-mapped checkpoint: page cache, shared with every
process that maps the same file). On entry the allocator hands its free memory back to the system
(glibc's malloc_trim), so what the block allocates shows as growth even where freed memory is reused,
and the kernel's high-water mark is reset: the peak `rss` is exact; `anon` and `file` are sampled
every `interval_s`, so a spike shorter than that can be missed.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import threading
from pathlib import Path

STATUS = Path("/proc/self/status")
FIELDS = {"VmRSS": "rss", "RssAnon": "anon", "RssFile": "file", "VmHWM": "hwm"}


def host_memory() -> dict[str, int]:
    """This process's rss, anon, file and hwm (peak rss since start or the last reset) in bytes.
    Raises RuntimeError off Linux."""
    if not STATUS.exists():
        raise RuntimeError("host memory is read from /proc/self/status: Linux only")
    out = {}
    for line in STATUS.read_text().splitlines():
        key, _, value = line.partition(":")
        if key in FIELDS:
            out[FIELDS[key]] = int(value.split()[0]) * 1024  # kB
    return out


def reset_peak() -> bool:
    """Hand free heap memory back (glibc), then reset the kernel's high-water mark to the current rss
    (Linux >= 4.0); False where that is not allowed."""
    libc = ctypes.util.find_library("c")
    if libc and hasattr(ctypes.CDLL(libc), "malloc_trim"):
        ctypes.CDLL(libc).malloc_trim(0)
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class HostMemory:
    """Peak host memory over a `with` block: `peak` and `start` map rss, anon and file to bytes."""

    def __init__(self, interval_s: float = 0.002):
        self.interval_s = interval_s
        self.start: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            now = host_memory()
            for k in ("rss", "anon", "file"):
                self.peak[k] = max(self.peak.get(k, 0), now[k])
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "HostMemory":
        self.exact = reset_peak()
        self.start = host_memory()
        self.peak = {k: self.start[k] for k in ("rss", "anon", "file")}
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        end = host_memory()
        for k in ("rss", "anon", "file"):
            self.peak[k] = max(self.peak[k], end[k])
        if self.exact:
            self.peak["rss"] = max(self.peak["rss"], end["hwm"])

    def grew(self, kind: str = "anon") -> int:
        """Peak minus the value on entry, in bytes."""
        return self.peak[kind] - self.start[kind]
