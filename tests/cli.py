"""Running the launchers as a user does: `python launch/train.py ...` and torchrun, with the small test
model's flags, and reading back what a run directory logged."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO, small_config

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def small_args(run_dir, cache, *extra: str) -> list[str]:
    """small_config's values as command-line flags (then `extra`)."""
    cfg = small_config(run_dir, cache)
    flat = []
    for section in ("model", "attention", "moe", "train", "checkpoint", "run", "data", "log"):
        for k, v in getattr(cfg, section).__dict__.items():
            if v is not None and not isinstance(v, list):
                flat.append(f"--{section}.{k}={v}")
    return flat + list(extra)


def train_cmd(run_dir, cache, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "launch" / "train.py"), *small_args(run_dir, cache, *extra)]


def torchrun_cmd(run_dir, cache, *extra: str, world: int = 2, torchrun_flags: tuple = ()) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
            *torchrun_flags, str(REPO / "launch" / "train_ddp.py"), *small_args(run_dir, cache, *extra)]


def run(cmd: list[str], timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV)


def torchrun(run_dir, cache, *extra: str) -> subprocess.CompletedProcess:
    """World 2 under torchrun, resuming the newest checkpoint of run_dir if there is one."""
    return run(torchrun_cmd(run_dir, cache, "--resume", "auto", *extra))


def rows(run_dir, name: str = "metrics.jsonl") -> list[dict]:
    path = run_dir / name
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def losses_by_step(run_dir) -> dict:
    """Each logged step's loss; a step logged twice fails (metrics hold each step once)."""
    steps = [r["step"] for r in rows(run_dir) if "loss" in r]
    assert len(steps) == len(set(steps)), f"steps logged more than once: {steps}"
    return {r["step"]: r["loss"] for r in rows(run_dir) if "loss" in r}


def launch_common():
    """launch/common.py as a module (the launchers import it by file location)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("launch_common", REPO / "launch" / "common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
