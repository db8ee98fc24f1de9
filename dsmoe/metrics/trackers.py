"""Experiment trackers fed from the metrics rows: TensorBoard event files, Weights & Biases, MLflow.

`Trackers(run_dir, tensorboard=True, wandb="offline", mlflow="on", project=..., run_name=..., config=...)`
on rank 0; every other rank (and rank 0 with all off) gets an object that does nothing and imports
nothing. The libraries are optional extras (`pip install 'dsmoe[tensorboard]'`, `'dsmoe[wandb]'`,
`'dsmoe[mlflow]'`), imported only when enabled. What each receives from a row:

- every number as a scalar, named `section/key` (train/loss, val/val_loss, time/forward_ms,
  memory/rss_gb, moe/expert_imbalance, ...); a list of numbers as key/0, key/1, ... (per MoE layer);
- `tokens_per_expert` ([MoE layer][expert] token counts) as one histogram per MoE layer over the
  expert index (TensorBoard: bucket e holds expert e's tokens; W&B: the same counts and edges;
  MLflow has no histograms: its rows' numbers only);
- samples ({step, prompt, text}) as text (TensorBoard), a table (W&B) or an artifact
  `samples/step_N.md` (MLflow); MLflow also gets the config as params (`section.field`) and as the
  artifact `config.yaml`.

`ids` names the W&B and MLflow runs opened; passed back as `resume_ids` when the run resumes, they
continue the same runs (W&B resume="allow", MLflow the same run id) instead of opening new ones.
"""

from __future__ import annotations

import json
import numbers
import os
import time
from pathlib import Path
from typing import Any, Mapping

EXPERT_COUNTS = "tokens_per_expert"
TENSORBOARD_DIR = "tensorboard"
_NOT_SCALARS = ("step", "time", EXPERT_COUNTS)
_WANDB_MODES = ("online", "offline", "disabled")
MLFLOW_DIR = "mlruns"  # log.mlflow=on: a file store in the run directory


def scalar_tag(key: str) -> str:
    """A metrics key's tracker name: the section groups related curves in TensorBoard and W&B."""
    if key.startswith("val_"):
        section = "val"
    elif key.endswith("_ms") or key == "step_time_s":
        section = "time"
    elif key.startswith(("mem_", "rss_", "alloc_")) or key == "ooms":
        section = "memory"
    elif key.startswith(("expert_", "dropped_", "bias_", "a2a_", "moe_")):
        section = "moe"
    elif key.startswith(("tokens_per_s", "mfu")):
        section = "throughput"
    else:
        section = "train"
    return f"{section}/{key}"


def row_scalars(row: Mapping[str, Any]) -> dict[str, float]:
    """The row's numbers by tracker name; lists of numbers (one per MoE layer) become key/i."""
    out = {}
    for key, value in row.items():
        if key in _NOT_SCALARS or value is None:
            continue
        if isinstance(value, numbers.Real):
            out[scalar_tag(key)] = float(value)
        elif isinstance(value, (list, tuple)) and all(isinstance(v, numbers.Real) for v in value):
            out.update({f"{scalar_tag(key)}/{i}": float(v) for i, v in enumerate(value)})
    return out


def expert_histograms(row: Mapping[str, Any]) -> dict[str, list[float]]:
    """`experts/moe_layer_i` -> that MoE layer's token count per expert, from the row's tokens_per_expert."""
    return {f"experts/moe_layer_{i}": [float(c) for c in counts] for i, counts in enumerate(row.get(EXPERT_COUNTS) or [])}


def sample_markdown(samples: list[Mapping[str, Any]]) -> str:
    """Samples as markdown: the prompt in bold, then the completion in a block that keeps its lines."""
    return "\n\n".join(f"**{s['prompt']!s}**\n\n```\n{s['prompt']}{s['text']}\n```" for s in samples)


class Trackers:
    """TensorBoard and/or W&B for one run, fed from metrics rows (see the module docstring).

    Args:
        run_dir: TensorBoard writes RUN_DIR/tensorboard/, W&B RUN_DIR/wandb/.
        tensorboard: write TensorBoard event files.
        wandb: False (off), True (W&B's own choice of mode: online once logged in, or WANDB_MODE),
            or a mode: "online", "offline" (no network; `wandb sync` uploads later), "disabled".
        mlflow: None (off), "on" (a file store in RUN_DIR/mlruns) or a tracking URI (sqlite:///x.db,
            http://host:5000, file:/path).
        project, experiment: the W&B project, the MLflow experiment.
        run_name: the run's name in W&B and MLflow.
        config: the run's configuration as plain data (recorded by W&B and MLflow, and as text in TensorBoard).
        rank: only rank 0 tracks.
        resume_ids: a previous `ids` of this run ({"wandb": id, "mlflow": id}): continue those runs.

    Raises:
        ImportError: an enabled tracker's package is not installed (names the pip command).
        ValueError: an unknown W&B mode.
    """

    def __init__(self, run_dir: str | Path, *, tensorboard: bool = False, wandb: bool | str = False,
                 mlflow: str | None = None, project: str = "dsmoe", experiment: str = "dsmoe",
                 run_name: str | None = None,
                 config: Mapping[str, Any] | None = None, rank: int = 0,
                 resume_ids: Mapping[str, str] | None = None) -> None:
        self.run_dir = Path(run_dir)
        self._tb = self._wandb = self._mlflow = None
        self.ids: dict[str, str] = {}
        if rank != 0:
            return
        if wandb not in (False, True) and wandb not in _WANDB_MODES:
            raise ValueError(f"log.wandb must be true, false or one of {_WANDB_MODES}, got {wandb!r}")
        resume_ids = resume_ids or {}
        if tensorboard:
            self._tb = _tensorboard_writer(self.run_dir / TENSORBOARD_DIR)
            if config:
                self._tb.add_text("config", f"```\n{_as_yaml(config)}\n```", 0)
        if wandb:
            self._wandb = _wandb_run(self.run_dir, project, run_name, config, None if wandb is True else wandb,
                                     resume_ids.get("wandb"))
            self.ids["wandb"] = self._wandb.id
        if mlflow:
            self._mlflow = MlflowRun(self.run_dir, mlflow, experiment, run_name, config, resume_ids.get("mlflow"))
            self.ids["mlflow"] = self._mlflow.run_id

    @property
    def enabled(self) -> bool:
        return self._tb is not None or self._wandb is not None or self._mlflow is not None

    def log_row(self, row: Mapping[str, Any]) -> None:
        """One metrics row (it must hold `step`)."""
        if not self.enabled:
            return
        step = int(row["step"])
        scalars, histograms = row_scalars(row), expert_histograms(row)
        if self._tb is not None:
            for tag, value in scalars.items():
                self._tb.add_scalar(tag, value, step)
            for tag, counts in histograms.items():
                _add_expert_histogram(self._tb, tag, counts, step)
            self._tb.flush()
        if self._wandb is not None:
            import wandb

            data: dict[str, Any] = dict(scalars)
            for tag, counts in histograms.items():
                data[tag] = wandb.Histogram(np_histogram=(counts, [e - 0.5 for e in range(len(counts) + 1)]))
            self._wandb.log(data, step=step)
        if self._mlflow is not None:
            self._mlflow.log_metrics(scalars, step)

    def log_samples(self, step: int, samples: list[Mapping[str, Any]]) -> None:
        """Generated samples: dicts with `prompt` and `text`."""
        if not self.enabled or not samples:
            return
        if self._tb is not None:
            self._tb.add_text("samples", sample_markdown(samples), step)
            self._tb.flush()
        if self._wandb is not None:
            import wandb

            table = wandb.Table(columns=["step", "prompt", "text"],
                                data=[[step, str(s["prompt"]), str(s["text"])] for s in samples])
            self._wandb.log({"samples": table}, step=step)
        if self._mlflow is not None:
            self._mlflow.log_text(sample_markdown(samples), f"samples/step_{step:07d}.md")

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if self._mlflow is not None:
            self._mlflow.finish()
            self._mlflow = None


def _tensorboard_writer(log_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ImportError("log.tensorboard needs the tensorboard package: pip install 'dsmoe[tensorboard]' "
                          "(or pip install tensorboard)") from e
    return SummaryWriter(log_dir=str(log_dir))


def _add_expert_histogram(writer, tag: str, counts: list[float], step: int) -> None:
    """Tokens per expert as a histogram over the expert index: bucket e is (e - 0.5, e + 0.5]."""
    experts = range(len(counts))
    writer.add_histogram_raw(tag, min=-0.5, max=len(counts) - 0.5, num=sum(counts),
                             sum=sum(e * c for e, c in zip(experts, counts)),
                             sum_squares=sum(e * e * c for e, c in zip(experts, counts)),
                             bucket_limits=[e + 0.5 for e in experts], bucket_counts=counts, global_step=step)


def _wandb_run(run_dir: Path, project: str, run_name: str | None, config, mode: str | None,
               run_id: str | None = None):
    try:
        import wandb
    except ImportError as e:
        raise ImportError("log.wandb needs the wandb package: pip install 'dsmoe[wandb]' (or pip install wandb)") from e
    run_dir.mkdir(parents=True, exist_ok=True)
    resume = {"id": run_id, "resume": "allow"} if run_id else {}  # "allow": an offline run is not on the server
    return wandb.init(project=project, name=run_name, dir=str(run_dir), config=dict(config or {}), mode=mode,
                      **resume)


def flat_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {"section.field": "value"} (MLflow params are flat strings)."""
    out = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            out.update(flat_params(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return out


class MlflowRun:
    """One MLflow run through `MlflowClient` (no process-global active run), continued by id on resume.

    Params are immutable in MLflow: a resume adds the fields it lacks and keeps the first values; the
    resumed config is the `config.yaml` artifact (rewritten at each start)."""

    def __init__(self, run_dir: Path, uri: str, experiment: str, run_name: str | None, config, run_id: str | None):
        try:
            from mlflow.entities import Param
            from mlflow.tracking import MlflowClient
        except ImportError as e:
            raise ImportError("log.mlflow needs the mlflow package: pip install 'dsmoe[mlflow]' "
                              "(or pip install mlflow-skinny)") from e
        if uri == "on":
            # a local file store needs no server and no database driver (mlflow-skinny has none);
            # MLflow keeps it in maintenance mode behind this switch
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (run_dir / MLFLOW_DIR).resolve().as_uri()
        self.client = client = MlflowClient(tracking_uri=uri)
        if run_id is None:
            found = client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found is not None else client.create_experiment(experiment)
            run_id = client.create_run(experiment_id, run_name=run_name).info.run_id
        else:
            client.update_run(run_id, status="RUNNING")
        self.run_id = run_id
        if config:
            have = client.get_run(run_id).data.params
            params = [Param(k, v[:6000]) for k, v in flat_params(config).items() if k not in have]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                client.log_batch(run_id, params=params[i:i + 100])
            self.log_text(_as_yaml(config), "config.yaml")

    def log_metrics(self, scalars: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in scalars.items()])

    def log_text(self, text: str, path: str) -> None:
        self.client.log_text(self.run_id, text, path)

    def finish(self) -> None:
        self.client.set_terminated(self.run_id)


def _as_yaml(config: Mapping[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(json.loads(json.dumps(dict(config), default=str)), sort_keys=False)
