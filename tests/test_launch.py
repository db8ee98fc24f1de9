"""Launching as a user does, through `python -m dsmoe.run` (torchrun with dsmoe's stop and exit rules):
Ctrl-C of the whole terminal group, errors, a killed launcher, a second writer, Slurm's stop signal."""
import importlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from cli import ENV, losses_by_step, run, small_args, torchrun_cmd
from conftest import REPO, small_config
from dsmoe.checkpoint.file import list_checkpoints
from dsmoe.checkpoint.run_dir import RunDirError
from dsmoe.train.signals import EXIT_STOPPED
from dsmoe.train.trainer import Trainer
from dsmoe.train.faults import pause_marker
from test_lifecycle import digests, read_until, signal_paused, wait_for_step, worker_pids


def dsmoe_run_cmd(run_dir, cache, *extra: str, world: int = 2, torchrun_flags: tuple = ()) -> list[str]:
    return [sys.executable, "-m", "dsmoe.run", "--standalone", "--nproc_per_node", str(world), *torchrun_flags,
            str(REPO / "launch" / "train_ddp.py"), *small_args(run_dir, cache, *extra)]


def output_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_ctrl_c_of_the_terminal_group_stops_with_75_and_ends_with_the_resume_line(tmp_path, data_cache):
    """SIGINT to the whole process group (what a terminal's Ctrl-C does) of a world-2 run paused at step 2:
    a checkpoint at that step, exit 75, the resume command as the last line, no traceback, no restart
    (a restarted attempt would be refused: the directory holds a run); running that command gives the
    uninterrupted run's losses."""
    d, ref = tmp_path / "run", tmp_path / "ref"
    args = ("--train.steps=6", "--checkpoint.every=0")
    proc = subprocess.Popen(dsmoe_run_cmd(d, data_cache, *args, "--faults.pause_step=2",
                                          torchrun_flags=("--max-restarts", "2")),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV,
                            start_new_session=True)  # its own group, as a terminal's job
    seen: list = []  # the launcher forwards the signal to the ranks: go on once rank 0 has it
    signal_paused(proc, [pause_marker(d, 2, r) for r in (0, 1)],
                  lambda: (os.killpg(proc.pid, signal.SIGINT), read_until(proc, "stopping after this step", seen)))
    out = "".join(seen) + proc.communicate(timeout=300)[0]
    assert proc.returncode == EXIT_STOPPED, out
    assert "Traceback" not in out and "SignalException" not in out
    (ckpt,) = list_checkpoints(d)
    assert ckpt.name == "step_0000002" and "stopped at step 2" in out
    last = output_lines(out)[-1]
    assert last.startswith("stopped with a checkpoint (SIGINT): exit 75; resume: python -m dsmoe.run --standalone "
                           "--nproc_per_node 2 --max-restarts 2 ")
    assert last.endswith("--resume auto") and "--checkpoint.every=0" in last
    resumed = run(dsmoe_run_cmd(d, data_cache, *args, "--resume", "auto"))
    assert resumed.returncode == 0, resumed.stderr
    assert run(dsmoe_run_cmd(ref, data_cache, *args)).returncode == 0
    assert losses_by_step(d) == losses_by_step(ref)


def test_a_config_error_under_dsmoe_run_is_one_message_and_exit_2(tmp_path, data_cache):
    out = subprocess.run(dsmoe_run_cmd(tmp_path / "r", data_cache, "--train.stepz=3"), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, env=ENV, timeout=300)
    assert out.returncode == 2, out.stdout
    lines = output_lines(out.stdout)
    assert lines == [lines[0]] and lines[0].startswith("error: config: unknown key 'train.stepz'")
    assert "Did you mean 'steps'" in lines[0] and "Traceback" not in out.stdout
    assert not (tmp_path / "r").exists()


def test_sigkill_of_the_launcher_stops_its_ranks_with_a_checkpoint(tmp_path, data_cache):
    """torchrun killed with SIGKILL: its ranks get SIGTERM (parent-death signal), agree to stop, write a
    checkpoint and exit, instead of training on re-parented to PID 1."""
    d = tmp_path / "run"
    with open(tmp_path / "out.txt", "w") as log:
        proc = subprocess.Popen(torchrun_cmd(d, data_cache, "--train.steps=200"), stdout=log, stderr=log, env=ENV,
                                start_new_session=True)
    wait_for_step(d, 1, proc)
    ranks = worker_pids(proc.pid)
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 120  # a bound on correctness (the ranks end), not a timing
    while any(alive(pid) for pid in ranks) and time.monotonic() < deadline:
        time.sleep(0.2)
    alive_ranks = [pid for pid in ranks if alive(pid)]
    for pid in alive_ranks:
        os.kill(pid, signal.SIGKILL)
    assert not alive_ranks, "ranks kept running after their launcher was killed"
    (ckpt,) = list_checkpoints(d)
    assert 1 <= int(ckpt.name[5:]) < 200


def alive(pid: int) -> bool:
    """Running (a zombie re-parented to an init that has not reaped it yet counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


HOLD = """
import sys
from dsmoe.checkpoint.lock import RunLock
lock = RunLock(sys.argv[1])
lock.acquire()
print("held", flush=True)
sys.stdin.read()
"""


def test_a_second_writer_is_refused_naming_the_holder(tmp_path, data_cache):
    d = tmp_path / "run"
    Trainer(small_config(d, data_cache, "--train.steps=2")).fit()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(d)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env={**ENV, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline() == "held\n"
        before = digests(d)
        with pytest.raises(RunDirError) as e:
            Trainer(small_config(d, data_cache, "--train.steps=4"), resume="auto")
        message = str(e.value)
        assert f"pid {holder.pid} on host {os.uname().nodename}" in message and "another --run.dir" in message
        assert digests(d) == before  # nothing written
    finally:
        holder.communicate("")
    resumed = Trainer(small_config(d, data_cache, "--train.steps=4"), resume="auto")  # the holder is gone
    assert json.loads((d / ".lock").read_text())["pid"] == os.getpid()
    resumed.fit()


def test_stop_signals_are_optional_where_the_platform_lacks_them(monkeypatch):
    """Windows has no SIGUSR1: the trainer's signal module and the launcher still import and work."""
    import dsmoe.run
    import dsmoe.train.signals as signals

    monkeypatch.delattr(signal, "SIGUSR1")
    try:
        importlib.reload(signals)
        assert signals.STOP_SIGNALS == (signal.SIGINT, signal.SIGTERM)
        with signals.StopRequest() as stop:
            assert not stop.requested
        importlib.reload(dsmoe.run)
    finally:
        monkeypatch.undo()
        importlib.reload(signals)
        importlib.reload(dsmoe.run)


def test_slurm_script_signals_the_launchers_and_requeues_on_75():
    sbatch = (REPO / "launch" / "slurm_h100_multinode.sbatch").read_text()
    code = [line.split("#")[0] for line in sbatch.splitlines() if not line.lstrip().startswith("#")]
    assert not any("pkill" in line or "killall" in line for line in code)
    assert "srun python -m dsmoe.run " in sbatch and 'if [ "$status" -eq 75 ]; then' in sbatch
    for script in ("h100_node.sh", "g4dn_12xlarge.sh"):
        assert "exec python -m dsmoe.run --standalone" in (REPO / "launch" / script).read_text()
