"""Recovery with real processes: a run killed before its first checkpoint restarts with the same
command, and torchrun --max-restarts recovers from a kill at step 1."""
import signal

from cli import losses_by_step, rows, run, torchrun_cmd, train_cmd


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
