"""What a run tells its user: the whole run's totals after a resume, a changed global batch, where
run.overwrite moved the old run, and `make train`'s stop and resume."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from cli import ENV, launch_common, rows, small_args
from conftest import REPO, small_config
from dsmoe.checkpoint.file import load_checkpoint
from dsmoe.checkpoint.run_dir import read_lineage
from dsmoe.train.trainer import Trainer


def test_resumed_summary_shows_the_whole_runs_totals(tmp_path, data_cache):
    first = Trainer(small_config(tmp_path, data_cache, "--train.stop_after=2"))
    part1 = first.fit()
    saved = load_checkpoint(part1["checkpoint"])["progress"]["seconds"]
    assert 0 < saved <= part1["seconds"] + 1e-6
    second = Trainer(small_config(tmp_path, data_cache, "--train.steps=4"), resume="auto")
    part2 = second.fit()
    assert part2["tokens"] == 2 * second.tokens_per_step and part2["run_tokens"] == 4 * second.tokens_per_step
    assert part2["run_seconds"] == pytest.approx(saved + part2["seconds"], abs=0.05)
    assert load_checkpoint(part2["checkpoint"])["progress"]["seconds"] == pytest.approx(part2["run_seconds"], abs=0.05)
    lines = launch_common().summary(second, part2, [])
    assert lines[0].startswith("done at step 4: this part (from step 2): ")
    assert lines[1] == f"whole run (steps 0-4): {part2['run_seconds']:.0f} s, 1.0k tokens"
    assert "whole run" not in " ".join(launch_common().summary(first, part1, []))


def test_a_resume_that_changes_the_global_batch_says_so(tmp_path, data_cache, capsys):
    Trainer(small_config(tmp_path, data_cache, "--train.steps=1")).fit()
    capsys.readouterr()
    same = Trainer(small_config(tmp_path, data_cache, "--train.steps=2"), resume="auto")
    assert same.batch_change is None
    same.fit()
    assert "global batch" not in capsys.readouterr().err
    bigger = Trainer(small_config(tmp_path, data_cache, "--train.steps=3", "--train.grad_accum=8"), resume="auto")
    bigger.fit()
    err = capsys.readouterr().err
    assert "warning: the global batch changes on this resume: 256 -> 1.0k tokens per step" in err
    assert "1 x 4 x 2 x 32 -> 1 x 4 x 8 x 32" in err and "--train.grad_accum" in err


def test_overwrite_says_where_the_old_run_went(tmp_path, data_cache, capsys):
    run_dir = tmp_path / "run"
    Trainer(small_config(run_dir, data_cache, "--train.steps=1")).fit()
    old = read_lineage(run_dir)
    capsys.readouterr()
    Trainer(small_config(run_dir, data_cache, "--train.steps=1", "--run.overwrite=true"))
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]
    assert len(moved) == 1 and read_lineage(moved[0]) == old
    out = capsys.readouterr().out
    assert f"{run_dir} held another run (run {old}): moved to {moved[0]}" in out
    assert list((moved[0] / "checkpoints").iterdir())


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
def test_make_train_after_ctrl_c_points_to_make_resume(tmp_path, data_cache):
    """Ctrl-C under `make train` (SIGINT to make's whole process group, once the first metrics row is
    written): the run stops with a checkpoint and make ends with `make resume`, not `Error 75`; a
    second `make train` is told to run `make resume`, which make can take."""
    args = " ".join(small_args(tmp_path, data_cache, "--train.steps=100000"))
    make = ["make", "-s", "-C", str(REPO), f"PY={sys.executable}", f"ARGS={args}"]
    proc = subprocess.Popen([*make, "train"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not rows(tmp_path) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    hint = f"make resume ARGS='{args}'"
    # GNU make, itself interrupted, re-raises SIGINT once its recipe is done: silently, the recipe succeeded
    assert proc.returncode in (0, -signal.SIGINT), out
    assert "make: ***" not in out and f"resume:   {hint}" in out
    assert f"stopped with a checkpoint: {hint} continues the run" in out
    again = subprocess.run([*make, "train"], capture_output=True, text=True, env=ENV, timeout=300)
    assert again.returncode == 2 and f"continue it:            run {hint}" in again.stderr, again.stderr
    planned = subprocess.run([*make, "-n", "resume"], capture_output=True, text=True, env=ENV, timeout=60)
    assert f"launch/train.py --config configs/runs/tiny-shakespeare.yaml {args} --resume auto" in planned.stdout
