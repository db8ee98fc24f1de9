"""Recovery: a run killed before its first checkpoint restarts with the same command, torchrun
--max-restarts recovers from a kill at step 1 (real processes); a storage fault at save (full disk,
read-only, forbidden, deleted directory) stops the run with one message, exit 3, and the previous
checkpoint intact (in process, through the launchers' run_training)."""
import errno
import os
import shutil
import signal
import subprocess

import pytest

from cli import launch_common, losses_by_step, rows, run, small_args, torchrun_cmd, train_cmd
from dsmoe.checkpoint.file import list_checkpoints
from dsmoe.checkpoint.resolve import problem


def test_killed_before_the_first_checkpoint_the_same_command_starts_again_at_step_0(tmp_path, data_cache):
    d = tmp_path / "run"
    cmd = train_cmd(d, data_cache, "--train.steps=3", "--checkpoint.every=5", "--resume", "auto")
    killed = run(cmd + ["--faults.kill_step=2"])  # SIGKILL at step 2: run.json and step 1's row, no checkpoint
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    lost = rows(d)
    assert [r["step"] for r in lost if "loss" in r] == [1] and not list(d.glob("checkpoints/step_*"))
    again = run(cmd + ["--faults.kill_step=2"])  # the same command: the kill happens once per run directory
    assert again.returncode == 0, again.stderr
    assert "starts again at step 0" in again.stdout
    resumed = losses_by_step(d)  # each step once
    assert list(resumed) == [1, 2, 3] and resumed[1] == lost[0]["loss"]  # step 1 again, from the same start
    assert rows(d, "metrics.superseded.jsonl") == lost  # the lost row moved aside, each step logged once


def test_torchrun_max_restarts_recovers_from_a_kill_at_step_1(tmp_path, data_cache):
    d = tmp_path / "run"
    cmd = torchrun_cmd(d, data_cache, "--train.steps=3", "--checkpoint.every=5", "--resume", "auto",
                       "--faults.kill_step=1", torchrun_flags=("--max-restarts", "2"))
    done = run(cmd)
    assert done.returncode == 0, done.stderr[-3000:]
    assert list(losses_by_step(d)) == [1, 2, 3]
    assert (d / "checkpoints" / "step_0000003").is_dir()


# ---------------------------------------------------------------- storage faults at save

FORMATS = {"file": ("--checkpoint.format=file",), "sharded": ("--checkpoint.format=sharded",),
           "async": ("--checkpoint.format=sharded", "--checkpoint.async_save=true")}


def train_in_process(run_dir, cache, *extra):
    """launch/train.py's run_training in this process: its exit status."""
    return launch_common().run_training(small_args(run_dir, cache, "--train.steps=4", "--checkpoint.every=2",
                                                   *extra), "test")


def assert_failed_save_kept_the_previous(run_dir, out, err, cause):
    ckpts = run_dir / "checkpoints"
    assert f"checkpoint {ckpts / 'step_0000004'}" in err and cause in err and "fix:" in err
    assert "the previous checkpoint" in err and "step_0000002" in err
    assert [p.name for p in list_checkpoints(run_dir)][-1].startswith("step_0000002")
    assert problem(list_checkpoints(run_dir)[-1], digests=True) is None  # intact, verified
    assert not [p for p in ckpts.iterdir() if "tmp" in p.name]  # temporaries removed
    assert "step_0000004 (" not in out and "step_0000004 written" not in out  # no success line


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs: room for one checkpoint of the test model (1.6 MiB), not two."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"a full disk needs a small tmpfs, and mounting one needs root: {mounted.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_full_disk_at_save_stops_with_one_message_and_keeps_the_previous_checkpoint(
        fmt, small_disk, data_cache, capsys):
    run_dir = small_disk / "run"
    assert train_in_process(run_dir, data_cache, *FORMATS[fmt]) == 3
    out, err = capsys.readouterr()
    assert_failed_save_kept_the_previous(run_dir, out, err, "No space left on device [ENOSPC]")
    assert "it needs about 1." in err and "MiB were free on" in err


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
@pytest.mark.parametrize("fmt", FORMATS)
def test_a_read_only_or_forbidden_directory_at_save_stops_with_one_message(
        fmt, code, tmp_path, data_cache, capsys, monkeypatch):
    import builtins

    from dsmoe.checkpoint import file, manifest

    def refusing_open(path, mode="r", *args, **kwargs):  # root ignores chmod: the OS's answer, injected
        if "w" in mode and "step_0000004" in str(path):
            raise OSError(code, os.strerror(code), str(path))
        return builtins.open(path, mode, *args, **kwargs)

    monkeypatch.setattr(file, "open", refusing_open, raising=False)
    monkeypatch.setattr(manifest, "open", refusing_open, raising=False)
    run_dir = tmp_path / "run"
    assert train_in_process(run_dir, data_cache, *FORMATS[fmt]) == 3
    out, err = capsys.readouterr()
    assert_failed_save_kept_the_previous(run_dir, out, err, f"[{errno.errorcode[code]}]")


def test_a_run_directory_deleted_mid_run_is_not_silently_recreated(tmp_path, data_cache, capsys, monkeypatch):
    from dsmoe.train.trainer import Trainer

    run_dir = tmp_path / "run"
    periodic = Trainer._periodic

    def delete_after_step_3(self, history, end):
        periodic(self, history, end)
        if self.progress.step == 3:
            shutil.rmtree(run_dir)

    monkeypatch.setattr(Trainer, "_periodic", delete_after_step_3)
    assert train_in_process(run_dir, data_cache) == 3
    err = capsys.readouterr().err
    assert f"checkpoint {run_dir / 'checkpoints' / 'step_0000004.pt'} could not be written" in err
    assert "[ENOENT]" in err and "deleted or moved" in err and not run_dir.exists()
