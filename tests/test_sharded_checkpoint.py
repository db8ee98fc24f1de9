"""Sharded (DCP) checkpoints: exact resume, resharding across world sizes and ep, the converter to and
from single files, and the errors a broken directory gets.

Global batch 8 sequences x grad_accum 2 throughout (world 2 x 4, world 4 x 2). Three launches: world 2
writes, world 4 reads and writes, world 2 reads again.
"""
import shutil

import pytest
import torch

from conftest import small_config
from distributed import run_workers
from dsmoe.checkpoint import resolve
from dsmoe.checkpoint.file import CheckpointError, list_checkpoints, load_checkpoint
from dsmoe.checkpoint.convert import convert, main as convert_main
from dsmoe.checkpoint.convert import to_file_state
from dsmoe.checkpoint.sharded import load_meta
from dsmoe.train.trainer import Trainer

TOL = 1e-5


def step_dir(run_dir, step):
    return run_dir / "checkpoints" / f"step_{step:07d}"


def run_jobs(rank, world, cache, jobs):
    out = {}
    for name, job in jobs.items():
        trainer = Trainer(small_config(job["dir"], cache, f"--train.micro_batch={8 // world}", *job["overrides"]),
                          resume=job.get("resume"))
        start = None
        if job.get("resume"):  # collective: every rank calls it; cloned, as buffers share the live storage
            state = trainer.checkpoints.full_state()
            start = {"model": {k: v.clone() for k, v in state["model"].items()},
                     "optimizer": {i: {k: v.clone() for k, v in per.items()} for i, per in state["optimizer"]["state"].items()}}
        result = trainer.fit()
        out[name] = {"losses": [r["loss"] for r in result["history"] if "loss" in r],
                     "start": start if rank == 0 else None}
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_cache):
    root = tmp_path_factory.mktemp("sharded")
    fsdp, every3 = ["--parallel.dp=fsdp"], ["--checkpoint.every=3"]
    first = run_workers(run_jobs, 2, (data_cache, {
        "full": {"dir": root / "full", "overrides": fsdp + every3}}))[0]
    src = step_dir(root / "full", 3)
    second = run_workers(run_jobs, 4, (data_cache, {
        "w4": {"dir": root / "w4", "overrides": fsdp + ["--parallel.ep=2"], "resume": str(src)},
        "w4-src": {"dir": root / "w4-src", "overrides": fsdp + ["--parallel.ep=2"] + every3}}))[0]
    converted = convert(src, root / "converted.pt")
    third = run_workers(run_jobs, 2, (data_cache, {
        "same": {"dir": root / "same", "overrides": fsdp, "resume": str(src)},
        "from-w4": {"dir": root / "from-w4", "overrides": fsdp, "resume": str(step_dir(root / "w4-src", 3))},
        "ddp-from-file": {"dir": root / "ddp", "overrides": [], "resume": str(converted)},
        "ddp-ep2-from-dir": {"dir": root / "ddp-ep2", "overrides": ["--parallel.ep=2"], "resume": str(src)}}))[0]
    return root, {**first, **second, **third}


def assert_close(losses, ref, what):
    assert len(losses) == len(ref) == 3, what
    for a, b in zip(losses, ref):
        assert abs(a - b) <= TOL * abs(b), f"{what}: {losses} vs {ref}"


def assert_equal_state(got, ref_state):
    assert sorted(got["model"]) == sorted(ref_state["model"])
    for k, v in ref_state["model"].items():
        assert torch.equal(got["model"][k], v), k
    ref_opt = ref_state["optimizer"]["state"]
    assert sorted(got["optimizer"]) == sorted(ref_opt)
    for i, per_param in ref_opt.items():
        for key, v in per_param.items():
            assert torch.equal(got["optimizer"][i][key], v), (i, key)


def test_sharded_directories_are_written_by_every_rank_and_committed(runs):
    root, _ = runs
    saved = list_checkpoints(root / "full")
    assert [p.name for p in saved] == ["step_0000003", "step_0000006"]
    assert len(list(saved[0].glob("*.distcp"))) == 2  # one shard file per rank
    assert load_meta(saved[0])["layout"] == {"world": 2, "ep": 1, "dp": "fsdp"}


def test_resume_at_the_same_layout_is_exact(runs):
    _, got = runs
    assert got["same"]["losses"] == got["full"]["losses"][3:]


def test_resume_reshards_two_to_four_and_four_to_two_exactly(runs):
    root, got = runs
    assert_equal_state(got["w4"]["start"], to_file_state(step_dir(root / "full", 3)))
    assert_close(got["w4"]["losses"], got["full"]["losses"][3:], "world 2 -> world 4, ep 2")
    assert_equal_state(got["from-w4"]["start"], to_file_state(step_dir(root / "w4-src", 3)))
    assert_close(got["from-w4"]["losses"], got["w4-src"]["losses"][3:], "world 4, ep 2 -> world 2")


def test_ddp_continues_an_fsdp_run_from_the_converted_file_or_the_directory(runs):
    _, got = runs
    assert_close(got["ddp-from-file"]["losses"], got["full"]["losses"][3:], "FSDP -> file -> DDP")
    assert_close(got["ddp-ep2-from-dir"]["losses"], got["full"]["losses"][3:], "FSDP dir -> DDP, ep 2")


def test_converter_round_trip_is_lossless(runs, tmp_path):
    root, _ = runs
    src = step_dir(root / "full", 6)
    assert convert_main([str(src), str(tmp_path / "a.pt")]) == 0
    assert convert_main([str(tmp_path / "a.pt"), str(tmp_path / "b")]) == 0
    assert convert_main([str(tmp_path / "b"), str(tmp_path / "c.pt")]) == 0
    a, c = load_checkpoint(tmp_path / "a.pt"), load_checkpoint(tmp_path / "c.pt")
    assert a["progress"] == c["progress"] and a["progress"]["step"] == 6
    assert_equal_state({"model": c["model"], "optimizer": c["optimizer"]["state"]}, a)
    assert a["optimizer"]["param_groups"] == c["optimizer"]["param_groups"]
    with pytest.raises(CheckpointError, match="exists"):
        convert(src, tmp_path / "a.pt")  # nothing is overwritten


def test_broken_directories_get_errors_and_auto_skips_unfinished_ones(runs, tmp_path, data_cache):
    root, _ = runs
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(step_dir(root / "full", 3), step_dir(run, 3))
    (run / "checkpoints" / ".step_0000009.tmp").mkdir()  # an interrupted save
    incomplete = step_dir(run, 4)  # named like a checkpoint, but without its meta.pt
    incomplete.mkdir()
    (incomplete / ".metadata").write_bytes(b"")
    assert resolve("auto", run) == step_dir(run, 3)
    with pytest.raises(CheckpointError, match="not a complete sharded checkpoint"):
        Trainer(small_config(run, data_cache), resume=str(incomplete))
    (step_dir(run, 3) / "meta.pt").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        Trainer(small_config(run, data_cache), resume=str(step_dir(run, 3)))
    other = small_config(tmp_path / "other", data_cache, "--model.d_model=32", "--attention.kv_lora_rank=16")
    with pytest.raises(CheckpointError, match="belongs to another model"):
        Trainer(other, resume=str(step_dir(root / "full", 3)))
