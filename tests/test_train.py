"""The training loop: exact resume, schedules, checkpoint errors, the command line."""
import hashlib
import json
import math
import subprocess
import sys

import pytest
import torch

from conftest import REPO, small_config
from dsmoe.config import TrainConfig
from dsmoe.checkpoint.file import CheckpointError, latest_checkpoint, load_checkpoint
from dsmoe.train.optim import lr_at
from dsmoe.train.trainer import Trainer


def losses(result):
    return [row["loss"] for row in result["history"] if "loss" in row]


def test_resume_is_bit_exact(tmp_path, data_cache):
    """2N steps == N steps, stop, resume, N more: same loss every step, same final parameters."""
    full = Trainer(small_config(tmp_path / "full", data_cache))
    full_losses = losses(full.fit())
    first = Trainer(small_config(tmp_path / "split", data_cache, "--train.stop_after=3"))
    first_losses = losses(first.fit())
    assert first.progress.step == 3 and latest_checkpoint(tmp_path / "split").name == "step_0000003.pt"
    second = Trainer(small_config(tmp_path / "split", data_cache), resume="auto")
    assert second.progress.step == 3 and second.progress.samples == 3 * 2 * 4
    second_losses = losses(second.fit())
    assert first_losses + second_losses == full_losses
    for (name, a), b in zip(full.model.state_dict().items(), second.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert torch.equal(full.model.layers[1].ffn.router.expert_bias, second.model.layers[1].ffn.router.expert_bias)
    assert full_losses[-1] < full_losses[0]


def test_checkpoint_is_weights_only_and_complete(tmp_path, data_cache):
    t = Trainer(small_config(tmp_path, data_cache, "--train.steps=1"))
    t.fit()
    path = latest_checkpoint(tmp_path)
    state = torch.load(path, weights_only=True)
    for key in ("model", "optimizer", "scaler", "progress", "rng", "config", "layout", "data"):
        assert key in state
    assert state["progress"]["step"] == 1 and state["layout"] == {"world": 1, "ep": 1, "dp": "ddp"}


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_bad_checkpoints_get_clear_errors_and_nothing_is_overwritten(tmp_path, data_cache):
    Trainer(small_config(tmp_path, data_cache, "--train.steps=1")).fit()
    good = latest_checkpoint(tmp_path)
    before = digest(good)
    with pytest.raises(CheckpointError, match="does not exist"):
        Trainer(small_config(tmp_path, data_cache), resume=str(tmp_path / "nope.pt"))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        Trainer(small_config(tmp_path, data_cache), resume=str(truncated))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="is not a checkpoint"):
        Trainer(small_config(tmp_path, data_cache), resume=str(junk))
    with pytest.raises(CheckpointError) as e:
        Trainer(small_config(tmp_path, data_cache, "--model.d_model=96"), resume=str(good))
    msg = str(e.value)
    assert "belongs to another model" in msg and "model.d_model: checkpoint 64 vs config 96" in msg
    assert "tok_embeddings.weight: checkpoint (320, 64) vs model (320, 96)" in msg
    assert len(msg.splitlines()) <= 12  # a few lines, however many tensors differ
    with pytest.raises(CheckpointError, match="moe.n_routed_experts"):
        Trainer(small_config(tmp_path, data_cache, "--moe.n_routed_experts=8"), resume=str(good))
    assert digest(good) == before and latest_checkpoint(tmp_path) == good


def test_keep_last_k(tmp_path, data_cache):
    Trainer(small_config(tmp_path, data_cache, "--train.steps=5", "--checkpoint.every=1",
                         "--checkpoint.keep_last=2")).fit()
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step_0000004.pt", "step_0000005.pt"]


@pytest.mark.parametrize("schedule", ["cosine", "linear", "onecycle", "constant"])
def test_schedules(schedule):
    t = TrainConfig(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1, schedule=schedule)
    lrs = [lr_at(s, t) for s in range(100)]
    assert max(lrs) == pytest.approx(1.0, rel=1e-6)
    if schedule == "constant":
        assert lrs[-1] == 1.0
    elif schedule == "onecycle":
        assert lrs[0] == pytest.approx(1 / 25) and lrs[-1] < 1e-3
    else:
        assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
        assert lrs[-1] == pytest.approx(0.1, abs=0.02) and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_weight_decay_skips_norms_and_biases(tmp_path, data_cache):
    t = Trainer(small_config(tmp_path, data_cache))
    decay, no_decay = t.optimizer.param_groups
    assert decay["weight_decay"] > 0 and no_decay["weight_decay"] == 0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert not any(p is t.model.layers[1].ffn.router.expert_bias for p in t.model.parameters())


def test_fp16_overflow_skips_step_without_advancing_schedule(tmp_path, data_cache):
    t = Trainer(small_config(tmp_path, data_cache, "--train.precision=fp16"))
    w = t.model.layers[0].attn.wo.weight
    before = w.detach().clone()
    hook = w.register_hook(lambda g: torch.full_like(g, float("inf")))
    t.train_step()
    hook.remove()
    assert t.progress.step == 1 and t.progress.sched_step == 0 and t.progress.skipped_overflow == 1
    assert torch.equal(w.detach(), before)
    t.train_step()
    assert t.progress.sched_step == 1


def test_command_line_train_then_generate(tmp_path, data_cache):
    run = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "launch" / "train.py"), "--train.steps=4", "--train.log_every=2",
           "--train.eval_every=4", "--train.sample_every=4", "--train.sample_tokens=8", "--train.micro_batch=2",
           "--train.seq_len=32", f"--run.dir={run}", f"--data.cache_dir={data_cache}", "--log.rich=off"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "step      4 | loss" in out.stdout and "val " in out.stdout and "sample @ 4" in out.stdout
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(header)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 4]  # the first step logs at once
    assert math.isfinite(rows[0]["loss"]) and rows[1]["samples"] == 2 * 2 and rows[1]["tokens"] == 2 * 2 * 32
    assert (run / "samples.jsonl").exists() and (run / "config.yaml").exists()
    ckpt = latest_checkpoint(run)
    assert load_checkpoint(ckpt)["progress"]["step"] == 4
    gen = subprocess.run([sys.executable, str(REPO / "launch" / "generate.py"), "--ckpt", str(ckpt),
                          "--prompt", "ROMEO:", "--tokens", "10"], capture_output=True, text=True, timeout=120)
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout.startswith("ROMEO:"), gen.stdout
    bad = subprocess.run(cmd[:2] + ["--train.stepz=3"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "Did you mean 'steps'" in bad.stderr
    missing = subprocess.run(cmd + ["--resume", str(tmp_path / "missing.pt")], capture_output=True, text=True,
                             timeout=120)
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_a_step_that_does_not_log_syncs_the_host_once(tmp_path, data_cache, monkeypatch):
    """The guard's verdict is the one device-to-host copy of a step: no .item(), .tolist() or tensor
    bool() elsewhere (fp16 overflow, the stop request and the expert counts ride in the same collective)."""
    for precision in ("fp32", "fp16"):
        t = Trainer(small_config(tmp_path / precision, data_cache, f"--train.precision={precision}",
                                 "--guard.spike_zscore=4"))
        t.train_step()  # warm-up: lazy initialisation may sync
        calls = []
        for name in ("item", "tolist", "__bool__"):
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _o=original, _n=name, **k: (calls.append(_n),
                                                                                                   _o(self, *a, **k))[1])
        for _ in range(2):
            calls.clear()
            t.train_step()
            assert calls == ["tolist"], (precision, calls)
        monkeypatch.undo()


def test_fp8_off_its_hardware_is_refused_with_the_fix(tmp_path, data_cache):
    """train.fp8 needs a CUDA GPU of compute capability 8.9+ and torchao: on the CPU, a ConfigError naming both."""
    from dsmoe.config import ConfigError

    with pytest.raises(ConfigError, match="train.fp8 needs a CUDA GPU.*8.9"):
        Trainer(small_config(tmp_path, data_cache, "--train.fp8=true"))
