"""NaN guards and faults end to end: skip on every rank, rollback, abort, localisation, killed ranks."""
import json
import re
import subprocess
import sys

import pytest
import torch

from cli import losses_by_step, run, small_args, torchrun, torchrun_cmd
from conftest import REPO, small_config
from distributed import run_workers
from dsmoe.checkpoint.file import latest_checkpoint, list_checkpoints, load_checkpoint
from dsmoe.train.guard import TrainingAborted
from dsmoe.train.trainer import Trainer


def skip_worker(rank, world, run_dir, cache):
    """NaN on rank 1 only at step 3: every rank drops the same step and keeps its parameters."""
    t = Trainer(small_config(run_dir, cache, "--faults.nan_step=3", "--faults.nan_rank=1",
                             "--faults.nan_module=layers.1.ffn"))
    t.train_step()
    t.train_step()
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    sched, consumed = t.progress.sched_step, t.progress.samples
    t.train_step()
    unchanged = all(torch.equal(before[k], v) for k, v in t.model.state_dict().items())
    skipped = {"unchanged": unchanged, "sched_step": (sched, t.progress.sched_step),
               "consumed": t.progress.samples - consumed,
               "events": [{k: e[k] for k in ("step", "what", "ranks")} for e in t.policy.events]}
    t.train_step()
    skipped["moved_after"] = not all(torch.equal(before[k], v) for k, v in t.model.state_dict().items())
    return skipped


def test_nan_on_one_rank_skips_the_same_step_everywhere(tmp_path, data_cache):
    results = run_workers(skip_worker, 2, (tmp_path, data_cache))
    for r in results:
        assert r["unchanged"] and r["moved_after"]
        assert r["sched_step"] == (2, 2) and r["consumed"] == 2 * 2 * 4  # the samples are consumed, the schedule waits
        assert r["events"] == [{"step": 3, "what": ["loss", "grad_norm"], "ranks": [1]}]
    report = json.loads((tmp_path / "nan_report_rank1.json").read_text())
    assert report["module"] == "layers.1.ffn" and report["phase"] == "forward" and report["step"] == 3
    assert not (tmp_path / "nan_report_rank0.json").exists()


def test_rollback_restores_lowers_lr_and_moves_past_the_bad_data(tmp_path, data_cache):
    cfg = small_config(tmp_path, data_cache, "--guard.policy=rollback", "--guard.rollback_after=1",
                       "--faults.nan_step=4", "--checkpoint.every=2", "--train.steps=6")
    t = Trainer(cfg)
    t.fit()
    assert [e["step"] for e in t.policy.events] == [4]
    assert t.guard.rollbacks == 1 and t.progress.lr_scale == 0.5
    assert t.progress.step == 6 and t.progress.samples == 4 * 2 * (6 + 2)  # steps 3-4 ran twice, on new data the second time
    for p in t.model.parameters():
        assert torch.isfinite(p).all()
    state = load_checkpoint(latest_checkpoint(tmp_path))
    assert state["progress"]["lr_scale"] == 0.5 and state["guard"]["rollbacks"] == 1


def test_abort_writes_nothing_from_the_bad_state(tmp_path, data_cache):
    cfg = small_config(tmp_path, data_cache, "--guard.policy=abort", "--faults.nan_step=3",
                       "--checkpoint.every=2")
    t = Trainer(cfg)
    with pytest.raises(TrainingAborted, match="step 3: loss, grad_norm"):
        t.fit()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000002.pt"]


def test_loss_spike_is_caught_and_skipped(tmp_path, data_cache):
    cfg = small_config(tmp_path, data_cache, "--guard.spike_zscore=6", "--guard.spike_window=3",
                       "--faults.spike_step=5", "--train.steps=6", "--train.lr=0.0003")
    t = Trainer(cfg)
    t.fit()
    assert [(e["step"], e["what"]) for e in t.policy.events] == [(5, ["spike"])]
    assert t.progress.sched_step == 5


@pytest.mark.parametrize("fault", ["--faults.kill_step=4", "--faults.kill_in_save=4"])
def test_torchrun_restarts_in_place_and_continues_with_the_same_losses(tmp_path, data_cache, fault):
    """SIGKILL of a rank at step 4 (or of rank 0 while it writes step 4's checkpoint): torchrun's
    --max-restarts starts every rank again, they resume from step 2's checkpoint, and the per-step
    losses equal an uninterrupted run's (each step logged once)."""
    ref = torchrun(tmp_path / "ref", data_cache, "--checkpoint.every=2")
    assert ref.returncode == 0, ref.stdout + ref.stderr
    kill = [fault, "--faults.kill_rank=1"] if "kill_step" in fault else [fault]
    restarted = run(torchrun_cmd(tmp_path / "run", data_cache, "--resume", "auto", "--checkpoint.every=2", *kill,
                                 torchrun_flags=("--max-restarts", "2")))
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr
    assert list((tmp_path / "run").glob(".injected-*"))  # the kill did happen
    assert re.search(r"step_0000002(\.pt)? \(step 2", restarted.stdout)  # the second attempt resumed from step 2
    assert losses_by_step(tmp_path / "run") == losses_by_step(tmp_path / "ref")


def test_kill_during_checkpoint_write_loses_nothing(tmp_path, data_cache):
    run = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "launch" / "train.py"), *small_args(run, data_cache), "--checkpoint.every=2"]
    died = subprocess.run(cmd + ["--faults.kill_in_save=4"], capture_output=True, text=True, timeout=300)
    assert died.returncode != 0
    assert [p.name for p in list_checkpoints(run)] == ["step_0000002.pt"]
    assert any(p.name.startswith(".step_0000004.pt.tmp") for p in (run / "checkpoints").iterdir())
    resumed = subprocess.run(cmd + ["--resume", "auto"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    ref = Trainer(small_config(tmp_path / "ref", data_cache, "--checkpoint.every=2"))
    ref.fit()
    assert losses_by_step(run) == losses_by_step(tmp_path / "ref")


def hang_worker(rank, world, run_dir, cache):
    Trainer(small_config(run_dir, cache, "--parallel.step_timeout_s=4", "--faults.hang_step=3",
                         "--faults.hang_rank=1", "--train.steps=4")).fit()


def test_a_hung_rank_gets_an_error_naming_the_step_and_the_rank(tmp_path, data_cache):
    with pytest.raises(RuntimeError) as e:
        run_workers(hang_worker, 2, (tmp_path, data_cache), timeout=45)
    msg = str(e.value)
    assert "rank 0: a collective of step 3" in msg and "timed out" in msg
    assert "1" in msg.split("timed out;")[1].splitlines()[0]  # the monitored barrier names rank 1
