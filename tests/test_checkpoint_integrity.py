"""A checkpoint counts only when every file it needs is present and verifies: sharded directories
against their manifest (digests taken while writing, bound to the run's lineage), DCP's `.metadata`
read without running code, a damaged newest checkpoint set aside by --resume auto, a finished run
left untouched, a precision change on resume.

Sharded directories are written by one process (`--checkpoint.format=sharded`): the same DCP files,
manifest and reader as at world > 1, at a fraction of the cost.
"""
import hashlib
import json
import pickle
import shutil

import pytest
import torch

from conftest import small_config
from dsmoe.checkpoint.convert import main as convert_main
from dsmoe.checkpoint.file import CheckpointDamaged, list_checkpoints
from dsmoe.checkpoint.load import load_model
from dsmoe.train.state import RunFinished, restore_scaler
from dsmoe.train.trainer import Trainer

SHARDED = ("--checkpoint.format=sharded", "--checkpoint.every=2", "--train.steps=4")


def step_dir(run_dir, step):
    return run_dir / "checkpoints" / f"step_{step:07d}"


def digests(run_dir):
    return {p.relative_to(run_dir): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


def losses(result):
    return {r["step"]: r["loss"] for r in result["history"] if "loss" in r}


def reseal(directory, name):
    """What an attacker who edits a file also does: rewrite its manifest entry to match."""
    path = directory / "manifest.json"
    manifest = json.loads(path.read_text())
    data = (directory / name).read_bytes()
    manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    path.write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory, data_cache):
    """Steps 1-4 uninterrupted, sharded checkpoints at 2 and 4; its losses."""
    root = tmp_path_factory.mktemp("integrity")
    result = Trainer(small_config(root / "A", data_cache, *SHARDED)).fit()
    return root / "A", losses(result)


def test_a_flipped_byte_in_a_shard_is_set_aside_and_the_run_continues_from_the_previous_one(
        sharded_run, tmp_path, data_cache, capsys):
    src, uninterrupted = sharded_run
    run = tmp_path / "run"
    shutil.copytree(src, run)
    shard = step_dir(run, 4) / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointDamaged, match=r"__0_0\.distcp' does not match its sha256 digest"):
        Trainer(small_config(run, data_cache, *SHARDED), resume=str(step_dir(run, 4)))
    trainer = Trainer(small_config(run, data_cache, *SHARDED), resume="auto")
    err = capsys.readouterr().err
    assert "skipped checkpoint step_0000004" in err and "does not match its sha256 digest" in err
    assert trainer.progress.step == 2 and trainer.resumed_from == step_dir(run, 2)
    (aside,) = (run / "checkpoints").glob("step_0000004.damaged-*")
    assert (aside / "__0_0.distcp").read_bytes() == bytes(data)  # kept, not deleted
    assert losses(trainer.fit()) == {s: uninterrupted[s] for s in (3, 4)}


def test_another_runs_shards_under_this_runs_meta_are_refused(sharded_run, tmp_path, data_cache):
    src, _ = sharded_run
    other = tmp_path / "B"
    Trainer(small_config(other, data_cache, *SHARDED, "--train.seed=7")).fit()
    run = tmp_path / "run"
    shutil.copytree(src, run)
    for name in ("__0_0.distcp", ".metadata"):
        shutil.copy(step_dir(other, 4) / name, step_dir(run, 4) / name)
    with pytest.raises(CheckpointDamaged, match="does not match its sha256 digest|bytes where"):
        Trainer(small_config(run, data_cache, *SHARDED), resume=str(step_dir(run, 4)))
    shutil.copy(step_dir(other, 4) / "manifest.json", step_dir(run, 4) / "manifest.json")  # theirs, whole
    with pytest.raises(CheckpointDamaged, match="files of another run"):
        Trainer(small_config(run, data_cache, *SHARDED), resume=str(step_dir(run, 4)))


class _Payload:
    """Unpickling it calls open(marker, 'w'): a file appears if the pickle ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_a_pickle_in_metadata_runs_no_code(sharded_run, tmp_path, data_cache, capsys):
    src, _ = sharded_run
    run = tmp_path / "run"
    shutil.copytree(src, run)
    marker = tmp_path / "ran"
    newest = step_dir(run, 4)
    (newest / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    reseal(newest, ".metadata")  # so that only the unpickler stands in the way
    with pytest.raises(CheckpointDamaged, match=r"\.metadata' calls io\.open.*not read"):
        Trainer(small_config(run, data_cache, *SHARDED), resume=str(newest))
    with pytest.raises(CheckpointDamaged, match=r"io\.open"):
        load_model(str(newest), device="cpu")  # generate, eval, export and the server load through it
    assert convert_main([str(newest), str(tmp_path / "out.pt")]) == 2
    assert "io.open" in capsys.readouterr().err and not (tmp_path / "out.pt").exists()
    assert Trainer(small_config(run, data_cache, *SHARDED), resume="auto").progress.step == 2
    assert not marker.exists()


def test_a_truncated_shard_is_named(sharded_run, tmp_path, data_cache):
    src, _ = sharded_run
    run = tmp_path / "run"
    shutil.copytree(src, run)
    shard = step_dir(run, 4) / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(CheckpointDamaged, match=r"__0_0\.distcp' holds 1000 bytes where \d+ were written"):
        Trainer(small_config(run, data_cache, *SHARDED), resume=str(step_dir(run, 4)))
    reseal(step_dir(run, 4), "__0_0.distcp")  # the manifest agrees: DCP's own read fails, named
    with pytest.raises(CheckpointDamaged, match=r"the shards of '.*step_0000004' are unreadable"):
        Trainer(small_config(run, data_cache, *SHARDED), resume=str(step_dir(run, 4)))


def test_a_directory_without_its_manifest_or_index_is_incomplete(sharded_run, tmp_path, data_cache, capsys):
    src, _ = sharded_run
    run = tmp_path / "run"
    shutil.copytree(src, run)
    (step_dir(run, 4) / "manifest.json").unlink()
    (step_dir(run, 2) / ".metadata").unlink()
    with pytest.raises(CheckpointDamaged, match="not a complete sharded checkpoint .no manifest.json"):
        Trainer(small_config(run, data_cache, *SHARDED), resume=str(step_dir(run, 4)))
    fresh = Trainer(small_config(run, data_cache, *SHARDED), resume="auto")  # neither counts: step 0 again
    err = capsys.readouterr().err
    assert "step_0000004" in err and "step_0000002" in err and "no .metadata" in err
    assert fresh.progress.step == 0 and not list_checkpoints(run)
    assert len(list((run / "checkpoints").glob("step_*.damaged-*"))) == 2


def test_resuming_a_finished_run_writes_nothing(sharded_run, tmp_path, data_cache):
    src, _ = sharded_run
    run = tmp_path / "run"
    shutil.copytree(src, run)
    before = digests(run)
    for resume in ("auto", str(step_dir(run, 4))):
        with pytest.raises(RunFinished, match=r"at step 4, this run's last .*--train\.steps=N \(N > 4\)"):
            Trainer(small_config(run, data_cache, *SHARDED), resume=resume)
    assert digests(run) == before
    longer = Trainer(small_config(run, data_cache, *SHARDED[:2], "--train.steps=5"), resume="auto")
    assert longer.progress.step == 4 and list(losses(longer.fit())) == [5]


def test_an_fp32_checkpoint_resumes_in_fp16_with_a_fresh_grad_scaler(tmp_path, data_cache):
    run = tmp_path / "run"
    Trainer(small_config(run, data_cache, "--train.steps=2")).fit()
    trainer = Trainer(small_config(run, data_cache, "--train.steps=3", "--train.precision=fp16"), resume="auto")
    assert trainer.scaler.is_enabled() and trainer.scaler.get_scale() == 2.0 ** 16
    assert "a fresh GradScaler" in trainer.header()["note"]
    assert list(losses(trainer.fit())) == [3]
    # the decision alone: a saved scale is taken; none saved starts fresh; a disabled scaler ignores both
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    saved = torch.amp.GradScaler("cpu", init_scale=32.0).state_dict()
    assert restore_scaler(scaler, saved) is None and scaler.get_scale() == 32.0
    assert "fresh" in restore_scaler(torch.amp.GradScaler("cpu"), {})
    assert restore_scaler(torch.amp.GradScaler("cpu", enabled=False), saved) is None


def test_an_older_checkpoint_is_taken_when_every_newer_one_fails(tmp_path, data_cache, capsys):
    run = tmp_path / "run"
    files = ("--checkpoint.every=2", "--train.steps=6")
    Trainer(small_config(run, data_cache, *files)).fit()  # step_2.pt, step_4.pt, step_6.pt
    ckpts = run / "checkpoints"
    for name in ("step_0000004.pt", "step_0000006.pt"):
        data = bytearray((ckpts / name).read_bytes())
        data[len(data) // 2] ^= 0x01
        (ckpts / name).write_bytes(bytes(data))
    older = Trainer(small_config(run, data_cache, *files), resume=str(ckpts / "step_0000002.pt"))
    assert older.progress.step == 2 and [p.name for p in list_checkpoints(run)] == ["step_0000002.pt"]
    assert "step_0000006.pt is newer than step_0000002.pt but unusable" in capsys.readouterr().err
    assert len(list(ckpts.glob("step_*.pt.damaged-*"))) == 2
