"""What a run tells its user: the whole run's totals after a resume, a changed global batch, where
run.overwrite moved the old run."""
from __future__ import annotations

import pytest

from cli import launch_common
from conftest import small_config
from dsmoe.train.checkpoint import load_checkpoint
from dsmoe.train.run_dir import read_lineage
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
