"""Checkpoints at scale, on gloo at world 2: sharded by default, asynchronous saves equal synchronous ones,
one file resumed memory-mapped (each rank reads its part), a single-file FSDP2 save gathered on rank 0
only, and saves that outlast the step timeout.

One launch runs every job (process start-up costs seconds); the tests check what it returned.
"""
import os
import time

import pytest
import torch

from conftest import host_copies_of_two_async_saves, small_config
from distributed import run_workers
from dsmoe.config import ConfigError
from dsmoe.metrics.host_memory import HostMemory
from dsmoe.checkpoint.file import list_checkpoints, load_checkpoint
from dsmoe.checkpoint.convert import read_all
from dsmoe.train.trainer import Trainer

# 6.3M parameters (76 MB of weights and AdamW moments), none over 2.1 MB: memory shows above the noise
WIDE = ["--model.d_model=256", "--model.ffn_hidden=1024", "--moe.expert_hidden=256", "--moe.n_routed_experts=8",
        "--model.n_layers=4", "--parallel.dp=fsdp", "--train.steps=1"]
SLOW_COMMIT_S = 4  # rank 0 sleeps this long before committing step 3's checkpoint ...
STEP_TIMEOUT = ["--parallel.step_timeout_s=2"]  # ... while the world's collectives time out after 2 s


def losses(result):
    return [r["loss"] for r in result["history"] if "loss" in r]


def fit(run_dir, cache, *overrides):
    return losses(Trainer(small_config(run_dir, cache, *overrides)).fit())


def slow_fit(rank, run_dir, cache, *overrides):
    t = Trainer(small_config(run_dir, cache, "--train.steps=4", "--checkpoint.every=3", *STEP_TIMEOUT, *overrides))
    t.faults.save_hook = lambda: (lambda: time.sleep(SLOW_COMMIT_S)) if t.progress.step == 3 else None
    return losses(t.fit())


def jobs(rank, world, root, cache):
    out = {}
    every2 = ["--parallel.ep=2", "--checkpoint.every=2", "--checkpoint.keep_last=5"]
    out["sync"] = fit(root / "sync", cache, *every2)
    out["async"] = fit(root / "async", cache, *every2, "--checkpoint.async_save=true")

    # FSDP2 writing one file: rank 0 gathers, the others hold one whole tensor at a time
    t = Trainer(small_config(root / "wide", cache, *WIDE, "--checkpoint.format=file"))
    t.train_step()
    with HostMemory() as saving:
        path = t.checkpoints.save()
    out["save_grew"] = saving.grew("anon")
    del t

    # ... and resuming it at world 2: memory-mapped, each rank copies its rows
    t = Trainer(small_config(root / "wide-resume", cache, *WIDE))
    t.sharded.init_optimizer_state()  # as the model, allocated before the resume reads into it
    with HostMemory() as resuming:
        t.checkpoints.restore(path)
    out["resume_grew"] = {"anon": resuming.grew("anon")}
    state = t.checkpoints.full_state()
    out["restored"] = {"model": state["model"], "optimizer": state["optimizer"]["state"]} if rank == 0 else None
    out["file"] = str(path)
    del t, state

    out["slow_file"] = slow_fit(rank, root / "slow-file", cache, "--checkpoint.format=file")
    out["slow_async"] = slow_fit(rank, root / "slow-async", cache, "--checkpoint.async_save=true")
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_cache):
    root = tmp_path_factory.mktemp("ckpt-scale")
    return root, run_workers(jobs, 2, (root, data_cache))


def test_world_2_writes_sharded_directories_by_default(runs):
    root, _ = runs
    saved = list_checkpoints(root / "sync")
    assert [p.name for p in saved] == ["step_0000002", "step_0000004", "step_0000006"]
    assert all(p.is_dir() and len(list(p.glob("*.distcp"))) == 2 for p in saved)


def test_async_save_equals_sync_save_bit_for_bit(runs):
    root, ranks = runs
    assert ranks[0]["async"] == ranks[0]["sync"]
    sync, async_ = list_checkpoints(root / "sync"), list_checkpoints(root / "async")
    assert [p.name for p in async_] == [p.name for p in sync]
    for a, s in zip(async_, sync):  # written while training went on: the staged copy, not the live tensors
        got, ref = read_all(a), read_all(s)
        assert sorted(got) == sorted(ref) and any(k.startswith("optimizer.") for k in ref)
        for k, v in ref.items():
            assert torch.equal(got[k], v), (a.name, k)


def test_fsdp_single_file_is_gathered_on_rank_0_only(runs):
    root, ranks = runs
    state = load_checkpoint(ranks[0]["file"])
    whole = sum(v.nbytes for v in state["model"].values()) + \
        sum(v.nbytes for per in state["optimizer"]["state"].values() for v in per.values())
    assert ranks[0]["save_grew"] >= 0.7 * whole, (ranks[0]["save_grew"], whole)  # rank 0 holds it all ...
    assert ranks[1]["save_grew"] < 0.25 * whole, (ranks[1]["save_grew"], whole)  # ... and rank 1 never does


def test_resume_from_one_file_at_world_2_is_memory_mapped_and_exact(runs):
    root, ranks = runs
    path = ranks[0]["file"]
    size = os.path.getsize(path)
    for r in ranks:  # no private copy of the file: its pages stay in the page cache, shared
        assert r["resume_grew"]["anon"] < 0.25 * size, (r["resume_grew"], size)
    state, got = load_checkpoint(path), ranks[0]["restored"]
    assert sorted(got["model"]) == sorted(state["model"])
    for k, v in state["model"].items():
        assert torch.equal(got["model"][k], v), k
    for i, per in state["optimizer"]["state"].items():
        for k, v in per.items():
            assert torch.equal(got["optimizer"][i][k], v), (i, k)


@pytest.mark.parametrize("kind", ["slow_file", "slow_async"])
def test_a_save_outlasting_the_step_timeout_does_not_fail_the_waiting_ranks(runs, kind):
    root, ranks = runs
    assert len(ranks[1][kind]) == 4 and ranks[1][kind] == ranks[0][kind]
    names = [p.name for p in list_checkpoints(root / kind.replace("_", "-"))]
    assert names == (["step_0000003.pt", "step_0000004.pt"] if kind == "slow_file" else ["step_0000003", "step_0000004"])


def test_async_save_of_one_file_is_refused(tmp_path, data_cache):
    with pytest.raises(ConfigError, match="checkpoint.format=sharded"):
        Trainer(small_config(tmp_path, data_cache, "--checkpoint.async_save=true", "--checkpoint.format=file"))


def test_async_saves_reuse_one_host_copy(tmp_path, data_cache):
    """The second asynchronous save copies into the first one's host buffers (pinned on CUDA): dcp.async_save
    leaves a stager it did not create open, and the stager keeps a buffer per source storage."""
    t = Trainer(small_config(tmp_path, data_cache, "--checkpoint.async_save=true", "--train.steps=1"))
    t.fit()
    buffers = host_copies_of_two_async_saves(t)
    assert buffers[0] and buffers[1].keys() == buffers[0].keys()
