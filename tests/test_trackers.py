"""TensorBoard, W&B and MLflow trackers: what a run's metrics rows and samples become, read back."""

import sys
import types
from pathlib import Path

import pytest

from dsmoe.metrics.trackers import Trackers, row_scalars, scalar_tag

ROWS = [
    {"time": 1.0, "step": 1, "loss": 5.75, "lr": 1e-4, "grad_norm": 4.7, "samples": 16, "tokens": 2048,
     "tokens_per_s": 654.8, "mfu": None, "forward_ms": 17.5, "rss_gb": 0.48, "expert_imbalance": 2.64,
     "expert_imbalance_per_layer": [1.66, 2.64], "tokens_per_expert": [[850, 303, 564, 0], [700, 617, 382, 1352]]},
    {"time": 2.0, "step": 25, "loss": 2.91, "lr": 2.5e-3, "grad_norm": 0.89, "samples": 400, "tokens": 51200,
     "tokens_per_s": 734.7, "mfu": 0.12, "forward_ms": 10.1, "rss_gb": 0.50, "expert_imbalance": 3.32,
     "expert_imbalance_per_layer": [2.43, 3.32], "tokens_per_expert": [[8, 488, 234, 696], [456, 108, 526, 900]]},
    {"time": 3.0, "step": 25, "val_loss": 2.31, "val_ppl": 10.06},
]
SAMPLES = [{"step": 25, "prompt": "ROMEO:", "text": "\nThe the in not\nthat wrousfly"},
           {"step": 25, "prompt": "JULIET:", "text": " O <b>sweet</b>"}]


def test_scalar_names_and_lists():
    scalars = row_scalars(ROWS[0])
    assert scalars["train/loss"] == 5.75 and scalars["throughput/tokens_per_s"] == 654.8
    assert scalars["time/forward_ms"] == 17.5 and scalars["memory/rss_gb"] == 0.48
    assert scalars["moe/expert_imbalance_per_layer/1"] == 2.64
    assert "train/mfu" not in scalars and "throughput/mfu" not in scalars  # None: not measured
    assert not any(tag.startswith(("train/step", "train/time", "train/tokens_per_expert")) for tag in scalars)
    assert scalar_tag("val_loss") == "val/val_loss"


def test_tensorboard_events_read_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trackers = Trackers(tmp_path, tensorboard=True, config={"train": {"lr": 3e-3}, "data": {"source": "x"}})
    for row in ROWS:
        trackers.log_row(row)
    trackers.log_samples(25, SAMPLES)
    trackers.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0, "histograms": 0})
    events.Reload()
    for row in ROWS:
        for tag, value in row_scalars(row).items():
            assert [(e.step, pytest.approx(e.value)) for e in events.Scalars(tag) if e.step == row["step"]] == \
                [(row["step"], pytest.approx(value))]
    assert [e.step for e in events.Scalars("train/loss")] == [1, 25]
    layer1 = events.Histograms("experts/moe_layer_1")
    assert [h.step for h in layer1] == [1, 25]
    hist = layer1[1].histogram_value
    assert list(hist.bucket) == [456, 108, 526, 900] and hist.num == 1990
    assert list(hist.bucket_limit) == [0.5, 1.5, 2.5, 3.5]
    texts = {tag: events.Tensors(tag) for tag in events.Tags()["tensors"]}
    sample = [t for tag, t in texts.items() if tag.startswith("samples")][0]
    assert sample[0].step == 25
    text = sample[0].tensor_proto.string_val[0].decode()
    assert "**ROMEO:**" in text and "ROMEO:\nThe the in not\nthat wrousfly" in text and "JULIET: O <b>sweet</b>" in text
    config = [t for tag, t in texts.items() if tag.startswith("config")][0]
    assert "lr: 0.003" in config[0].tensor_proto.string_val[0].decode()


class _FakeWandb(types.ModuleType):
    """Records what Trackers hands to wandb (the real one is checked offline below when installed)."""

    def __init__(self):
        super().__init__("wandb")
        self.inits, self.logged, self.finished = [], [], 0

    def init(self, **kwargs):
        self.inits.append(kwargs)
        self.id = kwargs.get("id", f"run{len(self.inits)}")
        return self

    def log(self, data, step):
        self.logged.append((step, data))

    def finish(self):
        self.finished += 1

    class Histogram:
        def __init__(self, np_histogram):
            self.counts, self.edges = np_histogram

    class Table:
        def __init__(self, columns, data):
            self.columns, self.data = columns, data


def test_wandb_receives_scalars_histograms_and_samples(tmp_path, monkeypatch):
    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    trackers = Trackers(tmp_path, wandb="offline", project="proj", run_name="run-a", config={"seed": 3})
    for row in ROWS:
        trackers.log_row(row)
    trackers.log_samples(25, SAMPLES)
    trackers.close()
    assert fake.inits == [{"project": "proj", "name": "run-a", "dir": str(tmp_path), "config": {"seed": 3},
                           "mode": "offline"}]
    assert [step for step, _ in fake.logged] == [1, 25, 25, 25]
    step1 = fake.logged[0][1]
    assert {k: v for k, v in step1.items() if not k.startswith("experts/")} == row_scalars(ROWS[0])
    assert step1["experts/moe_layer_0"].counts == [850, 303, 564, 0]
    assert step1["experts/moe_layer_0"].edges == [-0.5, 0.5, 1.5, 2.5, 3.5]
    assert fake.logged[2][1] == {"val/val_loss": 2.31, "val/val_ppl": 10.06}
    table = fake.logged[3][1]["samples"]
    assert table.columns == ["step", "prompt", "text"] and table.data[1] == [25, "JULIET:", " O <b>sweet</b>"]
    assert fake.finished == 1


def test_wandb_offline_run(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb", reason="wandb is an optional extra (pip install 'dsmoe[wandb]')")
    monkeypatch.setenv("WANDB_SILENT", "true")
    trackers = Trackers(tmp_path, wandb="offline", project="dsmoe-test", run_name="offline-run", config={"seed": 3})
    run = trackers._wandb
    for row in ROWS:
        trackers.log_row(row)
    trackers.log_samples(25, SAMPLES)
    trackers.log_row({"step": 26, "loss": 2.5})  # W&B commits a step when the next one starts
    assert run.name == "offline-run" and run.project == "dsmoe-test" and run.config["seed"] == 3
    assert run.summary["train/loss"] == pytest.approx(2.91) and run.summary["val/val_loss"] == pytest.approx(2.31)
    trackers.close()
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb")), "no offline run file"
    assert wandb.run is None


def test_off_ranks_and_errors(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb fails
    monkeypatch.setitem(sys.modules, "mlflow", None)
    quiet = Trackers(tmp_path, tensorboard=True, wandb=True, mlflow="on", rank=1)
    assert not quiet.enabled
    quiet.log_row(ROWS[0])
    quiet.close()
    assert not (tmp_path / "tensorboard").exists()
    with pytest.raises(ImportError, match=r"pip install 'dsmoe\[wandb\]'"):
        Trackers(tmp_path, wandb=True)
    with pytest.raises(ImportError, match=r"pip install 'dsmoe\[mlflow\]'"):
        Trackers(tmp_path, mlflow="on")
    with pytest.raises(ValueError, match="log.wandb must be"):
        Trackers(tmp_path, wandb="sometimes")


def test_a_training_run_writes_its_rows_to_tensorboard(tmp_path, data_cache):
    """log.tensorboard=true in a run: the event file holds each logged step's loss, the validation loss
    and the samples, equal to metrics.jsonl's."""
    import json

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from conftest import small_config
    from dsmoe.train.trainer import Trainer

    Trainer(small_config(tmp_path, data_cache, "--train.steps=2", "--log.tensorboard=true", "--train.eval_every=2",
                         "--train.sample_every=2", "--train.sample_tokens=4")).fit()
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = {e.step: e.value for e in events.Scalars("train/loss")}
    assert logged == pytest.approx({r["step"]: r["loss"] for r in rows if "loss" in r})
    assert [e.step for e in events.Scalars("val/val_loss")] == [2]
    assert any("samples" in tag for tag in events.Tags()["tensors"])


def test_wandb_resume_continues_the_stored_run(tmp_path, monkeypatch):
    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    first = Trackers(tmp_path, wandb="offline", run_name="r")
    assert first.ids == {"wandb": "run1"} and "id" not in fake.inits[0]
    first.close()
    again = Trackers(tmp_path, wandb="offline", run_name="r", resume_ids=first.ids)
    assert fake.inits[1]["id"] == "run1" and fake.inits[1]["resume"] == "allow" and again.ids == {"wandb": "run1"}


def test_mlflow_run_continues_across_a_resume(tmp_path, data_cache, monkeypatch):
    """log.mlflow=on: a run stopped at step 2 and resumed to 4 is one MLflow run holding every row's
    numbers at their steps (equal to metrics.jsonl's), the config as params and artifact, the samples;
    the resume also continues its W&B run (log.wandb=offline, a recording stand-in for wandb)."""
    import json

    from mlflow.tracking import MlflowClient

    from conftest import small_config
    from dsmoe.checkpoint.run_dir import read_run_file
    from dsmoe.train.trainer import Trainer

    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    args = ["--train.steps=4", "--log.mlflow=on", "--log.wandb=offline", "--train.sample_every=2",
            "--train.sample_tokens=4", "--train.eval_every=2", "--train.eval_batches=1"]
    Trainer(small_config(tmp_path, data_cache, *args, "--train.stop_after=2")).fit()
    run_id = read_run_file(tmp_path)["trackers"]["mlflow"]
    Trainer(small_config(tmp_path, data_cache, *args), resume="auto").fit()
    assert read_run_file(tmp_path)["trackers"] == {"mlflow": run_id, "wandb": "run1"}
    assert "id" not in fake.inits[0] and (fake.inits[1]["id"], fake.inits[1]["resume"]) == ("run1", "allow")
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    runs = client.search_runs([client.get_experiment_by_name("dsmoe").experiment_id])
    assert [r.info.run_id for r in runs] == [run_id] and runs[0].info.status == "FINISHED"
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = {m.step: m.value for m in client.get_metric_history(run_id, "train/loss")}
    assert losses == pytest.approx({r["step"]: r["loss"] for r in rows if "loss" in r})
    assert sorted(losses) == [1, 2, 3, 4]
    assert [m.step for m in client.get_metric_history(run_id, "val/val_loss")] == [2, 4]
    assert runs[0].data.params["train.steps"] == "4" and runs[0].data.params["log.mlflow"] == "on"
    assert [a.path for a in client.list_artifacts(run_id, "samples")] == ["samples/step_0000002.md",
                                                                          "samples/step_0000004.md"]
    assert runs[0].data.params["train.stop_after"] == "2"  # params keep the first part's values
    config = Path(client.download_artifacts(run_id, "config.yaml", str(tmp_path))).read_text()
    assert "stop_after: null" in config  # the artifact is the resumed part's config
