"""Expert-parallel training on gloo: equal to one process with the whole batch; layout-free checkpoints.

Global batch 8 sequences x grad_accum 2 throughout: world 1 x 8, world 2 x 4, world 4 x 2. Process
launches cost seconds each, so one module fixture runs every training once (two launches: world 2
and world 4, several runs each) and the tests below check its results.
"""
import json

import pytest
import torch

from conftest import rel_err, small_config
from distributed import run_workers
from dsmoe.config import ConfigError
from dsmoe.parallel.expert_state import is_expert_param
from dsmoe.checkpoint.file import load_checkpoint
from dsmoe.train.trainer import Trainer

TOL = 1e-5
E = 4  # small_config's routed experts
EVAL_SAMPLE = ["--train.eval_every=3", "--train.eval_batches=3", "--train.sample_every=3",
               "--train.sample_tokens=4"]


def ckpt(run_dir, step):
    return str(run_dir / "checkpoints" / f"step_{step:07d}.pt")


def run_job(rank, world, cache, job):
    """One training run; returns what every rank saw (losses, per-step routing bias, expert slices)."""
    if job.get("expect_error"):
        try:
            Trainer(small_config(job["dir"], cache, *job["overrides"]))
        except ConfigError as e:
            return {"error": str(e)}
        return {"error": None}
    trainer = Trainer(small_config(job["dir"], cache, *job["overrides"]), resume=job.get("resume"))

    def experts():
        return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if is_expert_param(n)}

    init = experts()
    biases, train_step = [], trainer.train_step

    def recording_step():  # the routing bias of every MoE layer after every step
        stats = train_step()
        biases.append(torch.stack([m.router.expert_bias.clone() for m in trainer.model.moe_modules()]))
        return stats

    trainer.train_step = recording_step
    result = trainer.fit()
    rows = trainer.experts.rows if trainer.experts else slice(0, E)
    return {"losses": [r["loss"] for r in result["history"] if "loss" in r],
            "val": [r["val_loss"] for r in result["history"] if "val_loss" in r],
            "biases": torch.stack(biases), "init": init, "final": experts(), "rows": (rows.start, rows.stop)}


def jobs_worker(rank, world, cache, jobs):
    return [run_job(rank, world, cache, job) for job in jobs]


def single(cache, job):
    return run_job(0, 1, cache, job)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_cache):
    d = tmp_path_factory.mktemp("ep-train")
    r = {"dirs": {}}

    def job(name, overrides, resume=None, expect_error=False):
        r["dirs"][name] = d / name  # single files, whatever the world size: the layout-free file is the point
        return {"name": name, "dir": d / name, "overrides": overrides + ["--checkpoint.format=file"], "resume": resume,
                "expect_error": expect_error}

    b8, b4, b2 = ["--train.micro_batch=8"], ["--train.micro_batch=4"], ["--train.micro_batch=2"]
    ep1, ep2, ep4 = ["--parallel.ep=1"], ["--parallel.ep=2"], ["--parallel.ep=4"]
    stop3 = ["--train.stop_after=3"]
    for j in (job("single", b8), job("single_split", b8 + stop3)):
        r[j["name"]] = single(data_cache, j)

    world2 = [job("w2_ep2", b4 + ep2), job("w2_ep2_split", b4 + ep2 + stop3),
              job("w2_ep2_resume", b4 + ep2, resume=ckpt(d / "w2_ep2_split", 3)),
              job("w2_ep2_from_single", b4 + ep2, resume=ckpt(d / "single_split", 3)),
              job("w2_ep4_error", b4 + ep4, expect_error=True),
              job("w2_ep2_ac", b4 + ep2 + ["--parallel.activation_checkpointing=full"])]
    for j, per_rank in zip(world2, zip(*run_workers(jobs_worker, 2, (data_cache, world2)))):
        r[j["name"]] = list(per_rank)

    world4 = [job("w4_ep4", b2 + ep4 + EVAL_SAMPLE), job("w4_edp2_ep2", b2 + ep2),
              job("w4_ep4_from_ep2", b2 + ep4, resume=ckpt(d / "w2_ep2_split", 3))]
    for j, per_rank in zip(world4, zip(*run_workers(jobs_worker, 4, (data_cache, world4)))):
        r[j["name"]] = list(per_rank)

    r["w1_from_ep2"] = single(data_cache, job("w1_from_ep2", b8 + ep1, resume=ckpt(d / "w2_ep2_split", 3)))
    return r


def final_model(run_dir, step=6):
    return load_checkpoint(ckpt(run_dir, step))["model"]


def assert_losses(got, ref, tol=TOL):
    assert len(got) == len(ref) and len(got) > 0
    for step, (a, b) in enumerate(zip(got, ref)):
        assert abs(a - b) <= tol * abs(b), f"step {step + 1}: {a} vs {b}"


@pytest.mark.parametrize("name,ep", [("w2_ep2", 2), ("w4_ep4", 4), ("w4_edp2_ep2", 2), ("w2_ep2_ac", 2)])
def test_ep_training_equals_single_process_with_the_whole_batch(runs, name, ep):
    """ep = world at 2 and 4, edp x ep = 2 x 2, and ep = 2 with full activation checkpointing (backward
    recomputes each MoE forward: its host sync and all-to-alls run again, in the same order everywhere)."""
    ref, ranks = runs["single"], runs[name]
    # initialisation: each rank's expert slice is its rows of the single-process experts
    for rank, got in enumerate(ranks):
        r0, r1 = got["rows"]
        assert (r0, r1) == ((rank % ep) * E // ep, (rank % ep + 1) * E // ep)
        for n, v in got["init"].items():
            assert torch.equal(v, ref["init"][n][r0:r1]), f"rank {rank}: init of {n}"
    # every rank logs the same (all-reduced) losses, equal to the single-process ones
    for got in ranks:
        assert got["losses"] == ranks[0]["losses"]
    assert_losses(ranks[0]["losses"], ref["losses"])
    # the routing bias is identical on every rank after every step (and follows the reference)
    for rank, got in enumerate(ranks):
        assert torch.equal(got["biases"], ranks[0]["biases"]), f"rank {rank}: routing bias differs"
    torch.testing.assert_close(ranks[0]["biases"], ref["biases"], rtol=0, atol=1e-6)
    # final parameters: the rank-0 checkpoint holds every expert, and equals the single-process model
    state, ref_state = final_model(runs["dirs"][name]), final_model(runs["dirs"]["single"])
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in ref_state.items()}
    assert rel_err(state, ref_state) < TOL
    # ... and the live shards are the checkpoint's rows (replicas over edp agree)
    for rank, got in enumerate(ranks):
        r0, r1 = got["rows"]
        for n, v in got["final"].items():
            assert torch.equal(v, state[n][r0:r1]), f"rank {rank}: {n} differs from the gathered checkpoint"


def test_eval_and_samples_run_on_every_rank(runs):
    """3 eval batches over 4 ranks (one rank pads); sampling runs everywhere, rank 0 writes."""
    ranks = runs["w4_ep4"]
    assert len(ranks[0]["val"]) == 2 and all(v > 0 for v in ranks[0]["val"])
    assert all(got["val"] == ranks[0]["val"] for got in ranks)
    lines = (runs["dirs"]["w4_ep4"] / "samples.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [3, 6]


def test_ep_checkpoint_is_a_single_process_checkpoint(runs):
    got = load_checkpoint(ckpt(runs["dirs"]["w2_ep2_split"], 3))
    ref = load_checkpoint(ckpt(runs["dirs"]["single_split"], 3))
    assert {k: v.shape for k, v in got["model"].items()} == {k: v.shape for k, v in ref["model"].items()}
    assert got["model"]["layers.1.ffn.experts.w_gate"].shape[0] == E
    assert rel_err(got["model"], ref["model"]) < TOL
    assert got["optimizer"]["param_groups"] == ref["optimizer"]["param_groups"]
    for i, per_param in ref["optimizer"]["state"].items():
        for key, v in per_param.items():
            assert got["optimizer"]["state"][i][key].shape == v.shape, f"optimizer {i} {key}"
        assert rel_err({k: got["optimizer"]["state"][i][k] for k in ("exp_avg", "exp_avg_sq")},
                       {k: per_param[k] for k in ("exp_avg", "exp_avg_sq")}) < 1e-4
    assert got["layout"] == {"world": 2, "ep": 2, "dp": "ddp"}


def test_ep_resume_is_exact_and_moves_between_layouts(runs):
    full = runs["w2_ep2"][0]
    # same layout: bit-exact
    same = runs["w2_ep2_resume"][0]
    assert same["losses"] == full["losses"][3:]
    assert torch.equal(same["biases"], full["biases"][3:])
    state, full_state = final_model(runs["dirs"]["w2_ep2_resume"]), final_model(runs["dirs"]["w2_ep2"])
    assert all(torch.equal(state[k], full_state[k]) for k in full_state)
    # the ep=2 checkpoint at ep=4 (world 4) and at ep=1 (one process); a single-process one at ep=2
    for name in ("w4_ep4_from_ep2", "w1_from_ep2", "w2_ep2_from_single"):
        got = runs[name][0] if isinstance(runs[name], list) else runs[name]
        assert_losses(got["losses"], full["losses"][3:])
        assert rel_err(final_model(runs["dirs"][name]), full_state) < TOL
    for got in runs["w4_ep4_from_ep2"]:
        assert torch.equal(got["biases"], runs["w4_ep4_from_ep2"][0]["biases"])


def test_world_not_divisible_by_ep_is_a_clear_error(runs):
    for got in runs["w2_ep4_error"]:
        assert got["error"] is not None
        assert "world size 2" in got["error"] and "parallel.ep=4" in got["error"]


def test_experts_not_divisible_by_ep_is_a_config_error(tmp_path, data_cache):
    with pytest.raises(ConfigError) as e:
        small_config(tmp_path, data_cache, "--parallel.ep=3")
    assert "n_routed_experts=4" in str(e.value) and "parallel.ep=3" in str(e.value)


def test_ep_runs_log_their_communication(runs):
    """Every logged step of an expert-parallel run carries the all-to-all bytes and time; ep=1 has neither."""
    def rows(name):
        return [json.loads(line) for line in (runs["dirs"][name] / "metrics.jsonl").read_text().splitlines()
                if '"loss"' in line]

    ep_rows = rows("w2_ep2")
    assert len(ep_rows) == 6
    assert all(r["a2a_mb_per_step"] > 0 and r["moe_comm_ms"] > 0 for r in ep_rows)
    assert all(r["moe_comm_ms"] < r["forward_ms"] + r["backward_ms"] for r in ep_rows)  # a part of them
    assert not any("moe_comm_ms" in r or "a2a_mb_per_step" in r for r in rows("single"))
