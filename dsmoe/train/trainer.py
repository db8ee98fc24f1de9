"""The training loop: set-up, one step at a time, and `fit` (logs, evaluation, samples, checkpoints,
stops, the out-of-memory message). The model is built and wrapped in build.py, the step is step.py's
(read it whole), checkpoint contents live in state.py, the guard's policies in guard.py, the run
directory's ownership in dsmoe/checkpoint/run_dir.py and the metrics row in metrics/row.py.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from dsmoe.config import Config, ConfigError, dump_yaml, validate_training
from dsmoe.data import get_tokenizer, padded_vocab_size
from dsmoe.tools.fit import device_margin_warning
from dsmoe.infer import generate_ids
from dsmoe.metrics.logger import LineFile, RunLogger, fmt_tokens
from dsmoe.metrics.row import log_row
from dsmoe.metrics.trackers import Trackers
from dsmoe.metrics.throughput import StepTimer, device_label, peak_tflops
from dsmoe.model import flops_per_token, param_breakdown
from dsmoe.tools.model import fmt_count
from dsmoe.parallel.mesh import Mesh, init_mesh, missing_ranks, set_timeout
from dsmoe.checkpoint import run_dir as rundir
from dsmoe.checkpoint import resolve
from dsmoe.checkpoint.file import is_sharded, peek
from dsmoe.train.faults import FaultInjector
from dsmoe.train.init_from import load_weights
from dsmoe.train.guard import Guard, GuardPolicy
from dsmoe.train.data import TrainData
from dsmoe.checkpoint.lock import RunLock
from dsmoe.train import step
from dsmoe.train.build import TrainState, build, wrap
from dsmoe.train.precision import autocast, resolve_precision
from dsmoe.checkpoint.sharded import load_meta
from dsmoe.train.step import StepResult
from dsmoe.train.signals import StopRequest
from dsmoe.train.state import Checkpoints, Progress, RunFinished, decide, schedule_of


def batch_change(saved: dict, cfg: Config, world: int, tokens_per_step: int) -> Optional[str]:
    """The line that calls out a resume whose global batch (tokens per optimizer step) differs from
    the checkpoint's; None when it is the same."""
    t, was = cfg.train, saved["config"]["train"]
    saved_world = saved["layout"]["world"]
    before = saved_world * was["micro_batch"] * was["grad_accum"] * was["seq_len"]
    if before == tokens_per_step:
        return None
    return (f"the global batch changes on this resume: {fmt_tokens(before)} -> {fmt_tokens(tokens_per_step)} "
            f"tokens per step (ranks x micro_batch x grad_accum x seq_len: {saved_world} x {was['micro_batch']} x "
            f"{was['grad_accum']} x {was['seq_len']} -> {world} x {t.micro_batch} x {t.grad_accum} x "
            f"{t.seq_len}); the learning rate is not rescaled. Keep the tokens per step with --train.grad_accum or "
            f"--train.micro_batch")


class Trainer:
    def __init__(self, cfg: Config, resume: Optional[str] = None, mesh: Optional[Mesh] = None,
                 init_from: Optional[str] = None):
        """`resume`: a checkpoint path or 'auto'; `init_from`: weights to start a fresh run from (a
        transformers directory or a dsmoe checkpoint; ignored when a resume finds a checkpoint)."""
        validate_training(cfg)
        self.cfg = cfg
        t = cfg.train
        self.mesh = mesh or init_mesh(t.device, cfg.parallel.ep, cfg.parallel.timeout_s, cfg.parallel.connect_timeout_s)
        self.device = self.mesh.device
        self.run_dir = Path(cfg.run.dir)
        self.log = RunLogger(None, self.mesh.rank, 0, "off")  # until fit() opens the run's files
        self.resume = resume
        self.notes: list[str] = []  # what the header says about the resume (a fresh GradScaler, ...)
        self.resumed_from = decide(self.mesh, lambda: resolve(resume, self.run_dir, "--resume", required=False,
                                                              move=True, report=self.log.warn))  # one decider
        self.lineage = self._claim(write=False)  # refuse before any work: nothing written yet
        precision = resolve_precision(t.precision, self.device, t.tf32)
        self.tokenizer = get_tokenizer(cfg.data.tokenizer)
        self.vocab_size = cfg.model.vocab_size or padded_vocab_size(self.tokenizer.vocab_size)
        if self.vocab_size < self.tokenizer.vocab_size:
            raise ConfigError(f"model.vocab_size={self.vocab_size} is smaller than the tokenizer's "
                              f"{self.tokenizer.vocab_size} ({cfg.data.tokenizer}): raise it or set it to null")
        self.data = TrainData(cfg, self.mesh, self.device)

        self.state = build(cfg, self.mesh, self.vocab_size, precision)
        self.progress = Progress()
        self.guard = Guard(cfg.guard, self.mesh.rank, self.mesh.world)
        self.faults = FaultInjector(cfg.faults, self.mesh.rank, self.run_dir)
        self.faults.attach(self.state.model)
        self.checkpoints = Checkpoints(cfg, self.state, self.progress, self.guard, self.data, self.mesh, self.faults,
                                       self.vocab_size, self.log, self.notes)
        self.policy = GuardPolicy(cfg, self.state, self.progress, self.guard, self.mesh, self.checkpoints, self.faults,
                                  self.batch_at, warn=lambda text: self.log.warn(text))  # fit() opens another log
        self.stop = StopRequest(self.mesh.rank)  # installed by fit()
        self.timer = StepTimer(self.device)
        for moe in self.state.model.moe_modules():
            if hasattr(moe.dispatcher, "timer"):  # expert parallelism: time the all-to-alls
                moe.dispatcher.timer = self.timer
        if init_from is not None and self.resumed_from is None:
            load_weights(self.state, cfg, self.vocab_size, init_from)
            self.log.print(f"initialised from {init_from}")
        self.resumed_from, saved = self.checkpoints.restore_verified(self.resumed_from, self.resume == "auto")
        if saved is not None and self.progress.step >= t.steps:
            raise RunFinished(f"{self.resumed_from} is at step {self.progress.step}, this run's last (train.steps="
                              f"{t.steps}): nothing to train, nothing written. To train longer, run the same command "
                              f"with --train.steps=N (N > {self.progress.step}); the schedule is extended from here")
        self.schedule = schedule_of(saved, t)
        self.schedule_change = self.schedule.extend(self.progress.sched_step)
        self.checkpoints.schedule = self.schedule
        self.run_lock = RunLock(self.run_dir)
        decide(self.mesh, lambda: self.run_lock.acquire(record=False))  # rank 0; refusals raised on every rank
        self.lineage = self.checkpoints.lineage = self._claim(write=True)
        decide(self.mesh, self.run_lock.acquire)  # pid and host; anew if run.overwrite moved the directory aside
        wrap(self.state, cfg, self.mesh)
        self.batch_change = (batch_change(saved, cfg, self.mesh.world, self.state.tokens_per_step)
                             if saved is not None else None)
        self.flops_per_token = flops_per_token(self.state.model, t.seq_len)
        self.peak_tflops = peak_tflops(device_label(self.device), self.state.precision, cfg.log.peak_tflops)

    # ------------------------------------------------------------------------- set-up

    def _claim(self, write: bool) -> str:
        """The run directory's lineage, decided by rank 0 (refusals are raised on every rank alike)."""
        def on_rank0():
            resume, lineage = self.resumed_from, None
            if resume is not None:
                lineage = ((load_meta(resume) if is_sharded(resume) else peek(resume)).get("run") or {}).get("lineage")
            restart = resume is None and self.resume == "auto" and rundir.read_lineage(self.run_dir) is not None
            lineage = rundir.claim(self.run_dir, resume, lineage, self.cfg.run.overwrite, write,
                                   continue_without_checkpoint=self.resume == "auto", report=self.log.warn)
            if write:
                rundir.remove_interrupted_saves(self.run_dir)
                if resume is not None or restart:
                    rundir.supersede_rows(self.run_dir, self.progress.step)
                if restart:
                    self.notes.append("no checkpoint of this run yet: it starts again at step 0 (rows it logged "
                                      "before are moved to metrics.superseded.jsonl)")
            return lineage

        return decide(self.mesh, on_rank0)

    def __getattr__(self, name: str):
        """The built state's parts read as the trainer's (trainer.model, trainer.optimizer, ...), for the
        scripts and tests that hold a trainer."""
        state = self.__dict__.get("state")
        if state is None or name not in TrainState.__dataclass_fields__:
            raise AttributeError(f"'Trainer' object has no attribute '{name}'")
        return getattr(state, name)

    def autocast(self):
        return autocast(self.state.precision, self.device)

    def batch_at(self, first_sample: int, prefetch_next: bool = False):
        """This rank's micro-batch of the global micro-step that starts at sample `first_sample` (on the
        device); with prefetch_next, the following micro-step's is built meanwhile."""
        return self.data.batch(first_sample, prefetch_next)

    # ------------------------------------------------------------------------- the step

    def train_step(self) -> StepResult:
        """One step of the loop: the shared step (dsmoe/train/step.py) on this rank's batches, then the
        rollback the guard decided, if any."""
        p = self.progress
        result = step.train_step(self.state, p, self._batches(), self.guard, self.cfg, policy=self.policy,
                                 lr=self.schedule(p.sched_step) * p.lr_scale, stop=self.stop,
                                 faults=self.faults, timer=self.timer)
        if result.rollback:
            self.policy.rollback()
        return result

    def _batches(self):
        """This rank's micro-batches from the data position on, each built when the step asks for it
        (and the next one prefetched meanwhile)."""
        while True:
            yield self.batch_at(self.progress.samples, prefetch_next=True)

    # ------------------------------------------------------------------------- evaluation and samples

    @torch.no_grad()
    def evaluate(self) -> Optional[dict]:
        if not self.data.val:
            return None
        self.state.model.eval()
        total = torch.zeros(2, device=self.device)
        for i, (x, y) in enumerate(self.data.val):
            with self.autocast():
                out = self.state.model(x.to(self.device), y.to(self.device))
            if i < self.data.val_counted:  # the rest are padding (see TrainData)
                total += torch.stack([out.ce_loss.float(), torch.ones((), device=self.device)])
        if self.mesh.distributed:
            dist.all_reduce(total)
        loss = (total[0] / total[1]).item()
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50))}

    @torch.no_grad()
    def sample(self, prompts: Optional[list[str]] = None) -> list[dict]:
        t = self.cfg.train
        self.state.model.eval()
        gen = torch.Generator(device=self.device).manual_seed(t.seed + self.progress.step)  # not the global RNG
        results = []
        for prompt in prompts or t.sample_prompts:
            ids = self.tokenizer.encode(prompt) or [self.tokenizer.eot_id]
            idx = torch.tensor([ids], device=self.device)
            with self.autocast():
                out = generate_ids(self.state.model, idx, t.sample_tokens, t.temperature, t.sample_top_k, generator=gen,
                                   vocab_limit=self.tokenizer.vocab_size)
            results.append({"step": self.progress.step, "prompt": prompt,
                            "text": self.tokenizer.decode(out[0, len(ids):].tolist())})
        return results

    # ------------------------------------------------------------------------- the run

    def header(self) -> dict:
        t, m, p, s = self.cfg.train, self.mesh, self.progress, self.state
        b = param_breakdown(s.model)
        rows = {
            "model": f"{self.cfg.model.name} ({self.cfg.attention.kind}, {self.cfg.moe.n_routed_experts} routed "
                     f"+ {self.cfg.moe.n_shared_experts} shared, top-{self.cfg.moe.top_k})",
            "parameters": f"{fmt_count(b['total'])} total, {fmt_count(b['active'])} active per token",
            "layout": f"world {m.world} (edp {m.edp} x ep {m.ep}, {'FSDP2' if s.fsdp else 'DDP'}) on {self.device}, "
                      f"{torch.get_num_threads()} CPU threads per process"
                      + (f", {s.experts.n_local} of {s.experts.n_experts} routed experts per rank"
                         if s.experts else ""),
            "precision": s.precision,
            "tokens / step": f"{fmt_tokens(s.tokens_per_step)} = {m.world} ranks x {t.micro_batch} x "
                             f"{t.grad_accum} accum x {t.seq_len}",
            "data": f"{self.cfg.data.source} ({self.cfg.data.tokenizer}, vocab {self.vocab_size}, "
                    + (f"{fmt_tokens(self.data.train_tokens)} train tokens)" if self.data.train_tokens is not None
                       else f"streamed, {self.data.stream.num_streams} streams)"),
            "schedule": f"{t.schedule}, peak {t.lr:g}, warmup {t.warmup_steps}, {t.steps} steps"
                        + (f"; {self.schedule_change}" if self.schedule_change else ""),
            "run dir": f"{self.run_dir} (run {self.lineage})",
        }
        if self.resumed_from is not None:
            rows["resumed from"] = f"{self.resumed_from} (step {p.step}, sample {p.samples})"
        if self.notes:
            rows["note"] = "; ".join(self.notes)
        return rows

    def fit(self) -> dict:
        cfg, t, p = self.cfg, self.cfg.train, self.progress
        end = min(t.steps, t.stop_after) if t.stop_after is not None else t.steps
        log = self.log = self.checkpoints.log = RunLogger(self.run_dir, self.mesh.rank, t.steps, cfg.log.rich, start_step=p.step)
        self.trackers = self._open_trackers()
        if self.mesh.is_main:
            (self.run_dir / "config.yaml").write_text(dump_yaml(cfg))
        log.header(self.header())
        if self.batch_change:
            log.warn(self.batch_change)
        margin = device_margin_warning(cfg, self.mesh.world, self.mesh.ep, self.device)
        if margin:
            log.warn(margin)
        history, saved, stopped = [], None, None
        started, began, earlier = p.step, time.perf_counter(), p.seconds
        interval = {"steps": 0, "seconds": 0.0}
        try:
            with self.stop:
                while p.step < end:
                    if p.step == started + 2:  # start-up is over: a hang from here on is an error, soon
                        set_timeout(self.mesh, cfg.parallel.step_timeout_s)
                    tick = time.perf_counter()
                    stats = self._guarded_step()
                    interval["steps"] += 1
                    interval["seconds"] += time.perf_counter() - tick
                    log.advance(p.step)
                    if p.step % t.log_every == 0 or p.step in (end, started + 1) or stats.stop:
                        row = log_row(stats, self.state, p, cfg, self.mesh, timer=self.timer, log=log,
                                      guard_events=len(self.policy.events), flops_per_token=self.flops_per_token,
                                      peak_tflops=self.peak_tflops, steps=interval["steps"],
                                      train_seconds=interval["seconds"])
                        history.append(row)
                        log.log(row)
                        self.trackers.log_row(row)
                        interval = {"steps": 0, "seconds": 0.0}
                    if stats.stop:
                        stopped = self.stop.signal_name or "a stop request on another rank"
                        break
                    self._periodic(history, end)
                    p.seconds = earlier + time.perf_counter() - began  # saved with the progress
                    self.checkpoints.poll()  # a failed background save stops the run here
                    if cfg.checkpoint.every and p.step % cfg.checkpoint.every == 0 and p.step != end:
                        saved = self.checkpoints.save()
            p.seconds = earlier + time.perf_counter() - began
            if (stopped or cfg.checkpoint.save_final) and not (saved and rundir.step_of(saved) == p.step):
                saved = self.checkpoints.save()
            self.checkpoints.wait()  # an asynchronous save is committed before the run ends
        except torch.OutOfMemoryError as e:
            raise MemoryError(f"out of memory at step {p.step + 1}: see `python -m dsmoe.estimate CONFIG --world "
                              f"{self.mesh.world}` for what fits: lower train.micro_batch (raise train.grad_accum to "
                              f"keep the batch), set parallel.activation_checkpointing=full, split the experts "
                              f"with --parallel.ep, or shard with launch/train_fsdp.py\n{e}") from e
        finally:
            log.close()
            self.trackers.close()
            self.run_lock.release()
        result = {"history": history, "step": p.step, "stopped": stopped, "checkpoint": saved,
                  "seconds": time.perf_counter() - began, "tokens": (p.step - started) * self.state.tokens_per_step,
                  "resumed_at": started, "run_seconds": earlier + time.perf_counter() - began,
                  "run_tokens": p.tokens}
        self.log = self.checkpoints.log = RunLogger(None, self.mesh.rank, 0, "off")
        return result

    def _open_trackers(self) -> Trackers:
        """TensorBoard / W&B / MLflow on rank 0; a resume of this lineage continues the W&B and MLflow
        runs it opened (their ids are kept in run.json)."""
        cfg = self.cfg
        stored = rundir.read_run_file(self.run_dir) if self.mesh.is_main else {}
        resume_ids = stored.get("trackers") if stored.get("lineage") == self.lineage else None
        trackers = Trackers(self.run_dir, tensorboard=cfg.log.tensorboard,
                            wandb={"off": False, "on": True}.get(cfg.log.wandb, cfg.log.wandb),
                            mlflow=None if cfg.log.mlflow == "off" else cfg.log.mlflow,
                            project=cfg.log.wandb_project, experiment=cfg.log.mlflow_experiment,
                            run_name=self.run_dir.name, config=cfg.to_dict(), rank=self.mesh.rank,
                            resume_ids=resume_ids)
        if trackers.ids and trackers.ids != resume_ids:
            rundir.update_run_file(self.run_dir, trackers={**(resume_ids or {}), **trackers.ids})
        return trackers

    def _periodic(self, history: list, end: int) -> None:
        """Validation and samples at their intervals."""
        t, p = self.cfg.train, self.progress
        if t.eval_every and (p.step % t.eval_every == 0 or p.step == end):
            val = self.evaluate()
            if val:
                self.log.log({"step": p.step, **val})
                self.trackers.log_row({"step": p.step, **val})
                history.append({"step": p.step, **val})
        # under expert parallelism or FSDP every rank samples (same generator seed, same lengths), since
        # each forward is a collective; rank 0 writes
        if t.sample_every and (p.step % t.sample_every == 0 or p.step == end) and \
                (self.mesh.is_main or self.mesh.ep > 1 or self.state.fsdp):
            samples = self.sample()
            if self.mesh.is_main:
                self._write_samples(samples)
                self.trackers.log_samples(p.step, samples)

    def _guarded_step(self) -> dict:
        """A train step whose collective timeouts name the step and the ranks that stopped answering."""
        try:
            return self.train_step()
        except RuntimeError as e:
            text = str(e).lower()
            if not self.mesh.distributed or ("timeout" not in text and "timed out" not in text):
                raise
            silent = missing_ranks(self.mesh, self.cfg.parallel.step_timeout_s)
            raise RuntimeError(f"rank {self.mesh.rank}: a collective of step {self.progress.step + 1} (gradient "
                               f"all-reduce, expert all-to-all or guard flag) timed out; {silent}. "
                               f"Check those ranks' logs; parallel.step_timeout_s sets the limit.\n{e}") from e

    def _write_samples(self, samples: list[dict]) -> None:
        f = LineFile(self.run_dir / "samples.jsonl")
        try:
            for s in samples:
                f.write(json.dumps(s) + "\n")
                self.log.print(f"sample @ {s['step']}:\n{s['prompt']}{s['text']}\n", style="green")
        finally:
            f.close()

