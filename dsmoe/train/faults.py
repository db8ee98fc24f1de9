"""Fault injection for rehearsals and tests: a NaN in a module, a loss spike, a killed rank.

Set through the `faults` config section (so `--faults.nan_step=40` works on any launcher).
A kill happens once per run directory (a marker file), so a restarted run goes on.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Callable

import torch

from dsmoe.config import FaultConfig


class FaultInjector:
    def __init__(self, cfg: FaultConfig, rank: int, run_dir: Path):
        self.cfg, self.rank, self.run_dir = cfg, rank, run_dir
        self.step = 0  # the optimizer step being computed (1-based once training starts)
        self.spent: set = set()  # injections already delivered: a rollback replays the step number, not the fault

    def attach(self, model: torch.nn.Module) -> None:
        """A forward hook that turns the chosen module's output into NaN at the chosen step."""
        if self.cfg.nan_step is None or self.rank != self.cfg.nan_rank:
            return
        modules = dict(model.named_modules())
        if self.cfg.nan_module not in modules:
            raise ValueError(f"faults.nan_module '{self.cfg.nan_module}' is not a module path of the "
                             f"model; e.g. {', '.join(list(modules)[1:6])}")

        def hook(module, inputs, output):
            if self.step == self.cfg.nan_step and "nan" not in self.spent:
                first = output[0] if isinstance(output, tuple) else output
                poisoned = first * float("nan")
                return (poisoned, *output[1:]) if isinstance(output, tuple) else poisoned
            return output

        modules[self.cfg.nan_module].register_forward_hook(hook)

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * 100.0 if self.step == self.cfg.spike_step and "spike" not in self.spent else loss

    def step_done(self) -> None:
        """Called when the step (and any replay of it) is over."""
        if self.step == self.cfg.nan_step:
            self.spent.add("nan")
        if self.step == self.cfg.spike_step:
            self.spent.add("spike")

    def _kill_once(self, tag: str) -> None:
        marker = self.run_dir / f".injected-{tag}-rank{self.rank}"
        if marker.exists():
            return
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        os.kill(os.getpid(), signal.SIGKILL)

    def maybe_kill(self) -> None:
        if self.step == self.cfg.kill_step and self.rank == self.cfg.kill_rank:
            self._kill_once(f"kill-step{self.step}")

    def maybe_hang(self) -> None:
        """At the step's start: hang (faults.hang_step), or pause (faults.pause_step) while the marker
        `RUN_DIR/.paused-step-K-rankR` exists: a test signals the paused rank, then deletes the marker,
        so the signal lands at a known step instead of racing the run."""
        import time

        if self.step == self.cfg.hang_step and self.rank == self.cfg.hang_rank:
            time.sleep(3600)
        if self.step == self.cfg.pause_step and "pause" not in self.spent:
            self.spent.add("pause")
            marker = pause_marker(self.run_dir, self.step, self.rank)
            marker.touch()
            while marker.exists():
                time.sleep(0.02)

    def save_hook(self) -> Callable[[], None] | None:
        """Called between writing a checkpoint's temporary file and renaming it."""
        if self.cfg.kill_in_save is None or self.step != self.cfg.kill_in_save:
            return None
        return lambda: self._kill_once("kill-in-save")


def pause_marker(run_dir: Path, step: int, rank: int) -> Path:
    """The file a rank paused by faults.pause_step waits on (it goes on once the file is deleted)."""
    return Path(run_dir) / f".paused-step-{step}-rank{rank}"
