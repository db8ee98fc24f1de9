"""A run's life: run-directory ownership, stops that save, continuation in samples, longer schedules,
leftovers of killed saves, clean errors."""
import hashlib
import os
import shutil
import signal
import subprocess
import time

import pytest

from cli import ENV, launch_common, losses_by_step, rows, run, small_args, torchrun_cmd, train_cmd
from conftest import REPO, small_config
from dsmoe.checkpoint.file import CheckpointError, list_checkpoints
from dsmoe.checkpoint.run_dir import RunDirError
from dsmoe.train.faults import pause_marker
from dsmoe.train.signals import EXIT_STOPPED
from dsmoe.train.trainer import Trainer


def digests(run_dir):
    return {p.relative_to(run_dir): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_a_fresh_run_never_touches_another_runs_directory(tmp_path, data_cache):
    """Fault 1: 4 steps, resume to 8 (checkpoints 4, 6, 8), then a fresh run with another seed."""
    d = tmp_path / "D"
    Trainer(small_config(d, data_cache, "--train.steps=4", "--checkpoint.every=2")).fit()
    Trainer(small_config(d, data_cache, "--train.steps=8", "--checkpoint.every=2"), resume="auto").fit()
    before = digests(d)
    with pytest.raises(RunDirError, match="holds another run") as e:
        Trainer(small_config(d, data_cache, "--train.steps=4", "--train.seed=7"))
    assert "--resume auto" in str(e.value) and "--run.dir" in str(e.value) and "--run.overwrite" in str(e.value)
    assert digests(d) == before  # nothing written, nothing pruned
    # the explicit way: the old run moves aside whole, and the new one starts in an empty directory
    new = Trainer(small_config(d, data_cache, "--train.steps=4", "--train.seed=7", "--run.overwrite=true"))
    new.fit()
    (aside,) = tmp_path.glob("D.replaced-*")
    assert digests(aside) == before
    assert [p.name for p in list_checkpoints(d)] == ["step_0000004.pt"]
    again = Trainer(small_config(d, data_cache, "--train.steps=6", "--train.seed=7"), resume="auto")
    assert again.progress.step == 4 and again.lineage == new.lineage != Trainer(
        small_config(aside, data_cache, "--train.steps=10"), resume="auto").lineage


def test_resume_never_writes_into_an_unrelated_run_nor_over_newer_checkpoints(tmp_path, data_cache):
    """Fault 2: a loose checkpoint of run A resumed into run B's directory is refused; an older
    checkpoint resumed where newer ones of its own run exist is refused too."""
    a, b = tmp_path / "A", tmp_path / "B"
    Trainer(small_config(a, data_cache, "--train.steps=4", "--checkpoint.every=2")).fit()
    Trainer(small_config(b, data_cache, "--train.steps=2")).fit()
    loose = tmp_path / "ckpt.pt"
    shutil.copy(a / "checkpoints" / "step_0000002.pt", loose)
    before = digests(b)
    with pytest.raises(RunDirError, match="belongs to another run"):
        Trainer(small_config(b, data_cache, "--train.steps=6"), resume=str(loose))
    assert digests(b) == before
    with pytest.raises(RunDirError, match="newer checkpoints of this run"):
        Trainer(small_config(a, data_cache, "--train.steps=6"), resume=str(a / "checkpoints" / "step_0000002.pt"))
    # the branch goes to a directory of its own, and continues exactly where the file left off
    branch = Trainer(small_config(tmp_path / "branch", data_cache, "--train.steps=4"), resume=str(loose))
    assert branch.progress.step == 2 and branch.lineage == Trainer(
        small_config(a, data_cache, "--train.steps=6"), resume="auto").lineage


def test_resume_without_config_takes_the_checkpoints_own(tmp_path, data_cache):
    """`launch/train_ddp.py --resume ckpt.pt` (no --config): the checkpoint's config, not the default run's."""
    a = tmp_path / "A"
    Trainer(small_config(a, data_cache, "--train.steps=2")).fit()
    loose = tmp_path / "ckpt.pt"
    shutil.copy(list_checkpoints(a)[-1], loose)
    other = tmp_path / "other"
    out = run([str(x) for x in [*train_cmd(tmp_path / "unused", data_cache)[:2], "--resume", loose,
                                 "--train.steps=3", f"--run.dir={other}", "--log.rich=off"]])
    assert out.returncode == 0, out.stderr
    assert "belongs to another model" not in out.stderr and (other / "checkpoints" / "step_0000003.pt").exists()
    assert [r["step"] for r in rows(other) if "loss" in r] == [3]


def test_sigint_stops_after_the_step_with_a_checkpoint_and_a_resume_line(tmp_path, data_cache):
    """Fault 3, one process: Ctrl-C -> checkpoint at the step reached, one line to resume, exit 75,
    no traceback; the resumed run's losses equal the uninterrupted run's."""
    d = tmp_path / "run"
    cmd = train_cmd(d, data_cache, "--train.steps=8", "--checkpoint.every=0")
    proc = subprocess.Popen(cmd + ["--faults.pause_step=3"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV)
    signal_paused(proc, [pause_marker(d, 3, 0)], lambda: proc.send_signal(signal.SIGINT))
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_STOPPED, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    (ckpt,) = list_checkpoints(d)
    assert ckpt.name == "step_0000003.pt" and "stopped at step 3" in out and "--resume auto" in out
    resumed = run(cmd + ["--resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr
    ref = tmp_path / "ref"
    Trainer(small_config(ref, data_cache, "--train.steps=8")).fit()
    assert losses_by_step(d) == losses_by_step(ref)


def wait_until(done, proc, limit=240):
    """Poll `done()` while the run lives (a handshake through its files, not a guess at its speed)."""
    deadline = time.monotonic() + limit
    while not done():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("the run ended before the signal:\n" + "".join(o or "" for o in proc.communicate()))
        time.sleep(0.05)


def wait_for_step(run_dir, step, proc, limit=240):
    wait_until(lambda: any(r.get("step", 0) >= step for r in rows(run_dir)), proc, limit)


def read_until(proc, text: str, seen: list) -> None:
    """Read the run's output line by line into `seen` until a line holds `text` (what a rank prints when
    it handles the signal)."""
    for line in proc.stdout:
        seen.append(line)
        if text in line:
            return
    raise AssertionError(f"the run ended without saying '{text}':\n" + "".join(seen))


def signal_paused(proc, markers, send) -> None:
    """Ranks paused at a step's start by faults.pause_step: signal them, then let them go on. The signal is
    queued before they resume, so it lands in that step's agreement: the run stops after exactly that step."""
    wait_until(lambda: all(m.exists() for m in markers), proc)
    send()
    for m in markers:
        m.unlink()


def test_sigterm_under_torchrun_is_agreed_and_resumes_bit_for_bit(tmp_path, data_cache):
    """SIGTERM to rank 1 only: both ranks stop after the same step, one checkpoint at that step, and
    the resumed run's per-step losses equal an uninterrupted world-2 run's exactly."""
    d, ref = tmp_path / "run", tmp_path / "ref"
    args = ("--train.steps=8", "--checkpoint.every=0", "--train.micro_batch=2")
    proc = subprocess.Popen(torchrun_cmd(d, data_cache, *args, "--faults.pause_step=2"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    signal_paused(proc, [pause_marker(d, 2, r) for r in (0, 1)],
                  lambda: os.kill(worker_pids(proc.pid)[1], signal.SIGTERM))
    out, err = proc.communicate(timeout=300)
    assert proc.returncode != 0 and f"exitcode  : {EXIT_STOPPED}" in err
    assert f'File "{REPO}' not in err  # no traceback from dsmoe's workers (torchrun prints its own epilogue)
    (ckpt,) = list_checkpoints(d)
    assert ckpt.name == "step_0000002" and "stopped at step 2" in out
    resumed = run(torchrun_cmd(d, data_cache, *args, "--resume", "auto"))
    assert resumed.returncode == 0, resumed.stderr
    assert run(torchrun_cmd(ref, data_cache, *args)).returncode == 0
    assert losses_by_step(d) == losses_by_step(ref)


def worker_pids(agent_pid: int) -> list[int]:
    """torchrun's workers, in rank order (each is started with its RANK in the environment)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        children = subprocess.run(["pgrep", "-P", str(agent_pid)], capture_output=True, text=True).stdout.split()
        ranks = {}
        for pid in map(int, children):
            try:
                env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
            except OSError:
                continue
            rank = [e[5:] for e in env if e.startswith(b"RANK=")]
            if rank:
                ranks[int(rank[0])] = pid
        if len(ranks) == 2:
            return [ranks[0], ranks[1]]
        time.sleep(0.2)
    raise AssertionError("torchrun's workers not found")


def sample_spy(monkeypatch):
    """Every window position a single-process trainer trains on, in order."""
    seen, original = [], Trainer.batch_at

    def batch_at_spy(self, first, prefetch_next=False):
        seen.extend(range(first, first + self.cfg.train.micro_batch))
        return original(self, first, prefetch_next)

    monkeypatch.setattr(Trainer, "batch_at", batch_at_spy)
    return seen


@pytest.mark.parametrize("change", [["--train.micro_batch=2"], ["--train.grad_accum=1", "--train.micro_batch=8"],
                                    ["--train.grad_accum=4", "--train.micro_batch=1"]])
def test_resume_with_another_batch_layout_continues_at_the_next_sample(tmp_path, data_cache, monkeypatch, change):
    """Fault 4's kind at one process (world changes are the same arithmetic, see test_ddp): after 3 steps
    of 4 x 2 samples, the resume reads sample 24 next, whatever its micro-batch and accumulation."""
    seen = sample_spy(monkeypatch)
    Trainer(small_config(tmp_path, data_cache, "--train.steps=3")).fit()
    assert seen == list(range(24))
    seen.clear()
    resumed = Trainer(small_config(tmp_path, data_cache, "--train.steps=5", *change), resume="auto")
    assert resumed.progress.samples == 24
    resumed.fit()
    per_step = resumed.cfg.train.micro_batch * resumed.cfg.train.grad_accum
    assert seen == list(range(24, 24 + 2 * per_step))


def test_a_resume_that_changes_what_the_position_means_is_refused(tmp_path, data_cache):
    Trainer(small_config(tmp_path, data_cache, "--train.steps=2")).fit()
    for change, field in (("--train.seq_len=16", "train.seq_len"), ("--train.seed=5", "seed")):
        with pytest.raises(CheckpointError, match="data position") as e:
            Trainer(small_config(tmp_path, data_cache, "--train.steps=4", change), resume="auto")
        assert field in str(e.value) and "--run.allow_data_change=true" in str(e.value)
    allowed = Trainer(small_config(tmp_path, data_cache, "--train.steps=4", "--train.seq_len=16",
                                   "--run.allow_data_change=true"), resume="auto")
    assert allowed.progress.step == 2


@pytest.mark.parametrize("stop_after", [None, 6])
def test_train_longer_keeps_the_learning_rate_continuous(tmp_path, data_cache, stop_after):
    """Fault 5: steps 12 (finished, or stopped at 6), then --train.steps=24: no jump at the resume."""
    first = ["--train.steps=12", "--train.warmup_steps=2"] + ([f"--train.stop_after={stop_after}"] if stop_after else [])
    lrs = [r["lr"] for r in Trainer(small_config(tmp_path, data_cache, *first)).fit()["history"]]
    longer = Trainer(small_config(tmp_path, data_cache, "--train.steps=24", "--train.warmup_steps=2"), resume="auto")
    assert "12 -> 24 steps" in longer.header()["schedule"]
    after = [r["lr"] for r in longer.fit()["history"]]
    biggest_change = max(abs(a - b) for a, b in zip(lrs, lrs[1:]))
    assert abs(after[0] - lrs[-1]) <= biggest_change + 1e-12
    assert all(a >= b - 1e-12 for a, b in zip(after, after[1:]))  # and it keeps decaying, no re-warmup


def test_a_killed_save_leaves_nothing_behind_and_rows_of_lost_steps_move_aside(tmp_path, data_cache):
    """Fault 6 and the metrics half of fault 3: a checkpoint write killed mid-way leaves its temporary
    file until the next start removes it; rows logged for steps lost with a killed process move to
    metrics.superseded.jsonl, so metrics.jsonl holds each step once."""
    d = tmp_path / "run"
    cmd = train_cmd(d, data_cache, "--train.steps=6", "--checkpoint.every=2")
    died = run(cmd + ["--faults.kill_in_save=4"])
    assert died.returncode != 0 and any(p.name.startswith(".step_0000004.pt.tmp") for p in (d / "checkpoints").iterdir())
    assert 4 in {r["step"] for r in rows(d)}  # logged, then lost with the process
    resumed = run(cmd + ["--resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr
    assert not any(p.name.startswith(".") for p in (d / "checkpoints").iterdir())
    assert sorted(losses_by_step(d)) == [1, 2, 3, 4, 5, 6]
    assert {r["step"] for r in rows(d, "metrics.superseded.jsonl")} == {3, 4}


def test_errors_under_torchrun_are_one_clean_message_with_exit_2(tmp_path, data_cache):
    out = run(torchrun_cmd(tmp_path, data_cache, "--train.stepz=3"))
    assert out.returncode != 0 and "exitcode  : 2" in out.stderr
    ours = [line for line in out.stderr.splitlines() if line.startswith(("error:", "[rank"))]
    assert len(ours) == 1 and "Did you mean 'steps'" in ours[0]  # one message, rank 0's
    assert f'File "{REPO}' not in out.stderr  # no traceback from dsmoe's workers
    assert "error_file" in out.stderr and "unknown key 'train.stepz'" in out.stderr.split("Root Cause")[-1]
    single = run(train_cmd(tmp_path, data_cache, "--train.stepz=3"))
    assert single.returncode == 2 and "config: unknown key 'train.stepz'" in single.stderr
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    bad = run(train_cmd(tmp_path / "r", data_cache, "--resume", str(text)))
    assert bad.returncode == 2 and "is not a checkpoint" in bad.stderr and "KeyError" not in bad.stderr


def test_help_keeps_the_pasted_commands_and_help_config_marks_the_run_files_values():
    ddp = run(["python", str(REPO / "launch" / "train_ddp.py"), "--help"])
    assert ("    torchrun --standalone --nproc_per_node 2 launch/train_ddp.py --config configs/hardware/cpu.yaml\n"
            in ddp.stdout)
    listing = run(["python", str(REPO / "launch" / "train.py"), "--config",
                   str(REPO / "configs" / "runs" / "tiny-shakespeare.yaml"), "--help-config"]).stdout
    line = next(x for x in listing.splitlines() if x.strip().startswith("--train.steps "))
    assert "300 *" in line and "[default 200]" in line
    assert any(x.strip().startswith("--model.vocab_size") and " null " in x for x in listing.splitlines())


def test_threads_share_the_cores_between_local_processes(monkeypatch):
    import torch

    set_cpu_threads = launch_common().set_cpu_threads
    before = torch.get_num_threads()
    try:
        cores = len(os.sched_getaffinity(0))
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        assert set_cpu_threads() == max(1, cores // 2)
        assert set_cpu_threads(3) == 3  # train.threads wins
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        assert set_cpu_threads() == 1  # OMP_NUM_THREADS is left alone
    finally:
        torch.set_num_threads(before)


def test_small_args_round_trip(tmp_path, data_cache):
    """The flags the command-line tests use give the in-process tests' config (guards the helper)."""
    from dsmoe.config import CONFIG_ROOT, load_config

    assert load_config(CONFIG_ROOT / "models" / "tiny.yaml", small_args(tmp_path, data_cache)) == \
        small_config(tmp_path, data_cache)


def positions_worker(rank, world, run_dir, cache, overrides):
    """The window positions this rank trains on while resuming run_dir at `world`."""
    seen, original = [], Trainer.batch_at

    def spy(self, first, prefetch_next=False):
        start = first + rank * self.cfg.train.micro_batch
        seen.extend(range(start, start + self.cfg.train.micro_batch))
        return original(self, first, prefetch_next)

    Trainer.batch_at = spy
    try:
        Trainer(small_config(run_dir, cache, *overrides), resume="auto").fit()
    finally:
        Trainer.batch_at = original
    return seen


def test_world_size_changes_continue_at_the_next_sample(tmp_path, data_cache):
    """Fault 4 as reported: 1 process for 2 steps, then 2 ranks with the same micro-batch (the global
    batch doubles), then 1 again: every window is read once, in order, none skipped."""
    from distributed import run_workers

    run_dir = tmp_path / "run"
    first = positions_worker(0, 1, run_dir, data_cache, ["--train.steps=2"])
    assert sorted(first) == list(range(16))
    at_two = run_workers(positions_worker, 2, (run_dir, data_cache, ["--train.steps=4"]))
    assert sorted(at_two[0] + at_two[1]) == list(range(16, 16 + 2 * 16))  # 2 steps of 2 ranks x 4 x 2
    back = positions_worker(0, 1, run_dir, data_cache, ["--train.steps=5"])
    assert sorted(back) == list(range(48, 56))
