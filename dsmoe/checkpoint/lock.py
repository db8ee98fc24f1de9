"""One writer per run directory: rank 0 holds an OS lock on RUN_DIR/.lock for the run's life.

A second process into the same directory (a second launch, a rank orphaned by a killed launcher, a
requeued job whose previous allocation still runs) is refused with the holder's pid and host, before
it writes anything. The lock is the kernel's (flock), so it ends with the holding process however
that dies: no stale lock to clean up. On file systems without flock (some NFS set-ups) and on Windows
the run goes on unlocked, with a warning.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

from dsmoe.checkpoint.run_dir import RunDirError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

LOCK_FILE = ".lock"
_HELD: dict[Path, "RunLock"] = {}  # this process's locks, by run directory


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir).resolve() / LOCK_FILE
        self.file = None
        self.recorded = False
        if fcntl is None:
            print(f"warning: no file locks on {sys.platform}: nothing stops a second run writing into "
                  f"{self.path.parent}", file=sys.stderr)

    def acquire(self, record: bool = True) -> None:
        """Take the lock (rank 0); with `record`, write this process's pid and host into the file. A run
        that moves its directory aside (run.overwrite) takes it without recording, so the old directory
        moves unchanged, then again in the new directory.

        Raises RunDirError naming the holder when another process holds it."""
        if fcntl is not None and (self.file is None or not self.path.exists()):
            self._lock()
        if record and self.file is not None and not self.recorded:
            self.file.seek(0)
            self.file.truncate()
            self.file.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                        "since": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
            self.file.flush()
            self.recorded = True

    def _lock(self) -> None:
        self.release()
        previous = _HELD.pop(self.path, None)
        if previous is not None:  # one process, trainers in turn (a notebook, tests): the newest writes
            previous.release()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read()
            f.close()
            raise RunDirError(f"{self.path.parent} is in use by {describe(holder)}: one run writes a directory at "
                              f"a time. Wait for it to end or stop it (Ctrl-C, or kill -TERM its pid: it saves a "
                              f"checkpoint), then resume with --resume auto; or train into another --run.dir") from None
        except OSError as e:  # no flock on this file system
            f.close()
            print(f"warning: cannot lock {self.path} ({e}): nothing stops a second run writing there",
                  file=sys.stderr)
            return
        self.file, self.recorded = f, False
        _HELD[self.path] = self

    def release(self) -> None:
        if self.file is not None:
            self.file.close()  # closing the descriptor drops the flock
            self.file = None
            if _HELD.get(self.path) is self:
                del _HELD[self.path]


def describe(holder: str) -> str:
    """'pid 1234 on host h1 (since ...)' from the lock file's contents."""
    try:
        info = json.loads(holder)
        return f"pid {info['pid']} on host {info['host']} (since {info['since']})"
    except (ValueError, KeyError, TypeError):
        return "another process (its pid is not recorded yet)"
