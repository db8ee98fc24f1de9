"""Preemption-safe stops: SIGINT, SIGTERM and SIGUSR1 (Slurm's `--signal`; absent on Windows) ask every
rank to stop after the current optimizer step and write a checkpoint; a second Ctrl-C exits at once.
A rank whose launcher (torchrun, python -m dsmoe.run) dies is sent SIGTERM, so it stops the same way.

The request travels in the guard's per-step all-reduce, so every rank stops after the same step.
"""
from __future__ import annotations

import os
import signal
import sys
import threading

STOP_SIGNALS = tuple(s for s in (getattr(signal, n, None) for n in ("SIGINT", "SIGTERM", "SIGUSR1")) if s)
EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped on request with a checkpoint; rerun with --resume auto to continue
EXIT_INTERRUPTED = 130  # a second Ctrl-C: out at once, nothing saved since the last checkpoint


class StopRequest:
    """Installed for the length of a run; `requested` turns true on the first signal."""

    def __init__(self, rank: int = 0):
        self.rank = rank
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # handlers live on the main thread only
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            # torchrun follows Ctrl-C with SIGTERM: only a second SIGINT means "now"
            print(f"[rank {self.rank}] second Ctrl-C: exiting without a checkpoint", file=sys.stderr, flush=True)
            os._exit(EXIT_INTERRUPTED)
        if not self.requested and self.rank == 0:
            print(f"{signal.Signals(signum).name}: stopping after this step with a checkpoint "
                  f"(Ctrl-C again to exit at once)", file=sys.stderr, flush=True)
        self.requested = True
        self.signal_name = self.signal_name or signal.Signals(signum).name


def stop_with_launcher() -> None:
    """Under torchrun (LOCAL_RANK set): when the launcher dies (SIGKILL, a lost node's agent), this rank is
    sent SIGTERM and stops like a requested stop (a checkpoint if the ranks can still agree, else at once),
    instead of training on re-parented to PID 1. Linux only (prctl PR_SET_PDEATHSIG); elsewhere a no-op."""
    if "LOCAL_RANK" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes

    launcher = os.getppid()
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    if launcher == 1 or os.getppid() != launcher:  # it died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)
