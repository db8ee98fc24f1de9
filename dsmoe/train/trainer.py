"""The training loop: data, model, AdamW, precision, balance, validation, samples, checkpoints, logs."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional

import psutil
import torch
import torch.distributed as dist

from dsmoe.config import Config, ConfigError, dump_yaml
from dsmoe.data import TokenBatches, ensure_prepared, get_tokenizer, load_prepared, padded_vocab_size, val_batches
from dsmoe.metrics.logger import RunLogger, fmt_tokens
from dsmoe.metrics.throughput import StepTimer, device_label, mfu, peak_tflops
from dsmoe.model import Transformer, flops_per_token, param_breakdown, update_expert_bias
from dsmoe.params import fmt_count
from dsmoe.parallel.dispatch import make_dispatcher
from dsmoe.parallel.expert_state import ExpertShards, is_expert_param
from dsmoe.parallel.fsdp import apply_fsdp, full, grad_norm_sets, optional_no_sync, shard_like
from dsmoe.parallel.mesh import Mesh, init_mesh, missing_ranks, set_timeout
from dsmoe.parallel.wrap import block_fn_for, wrap_ddp
from dsmoe.train.checkpoint import (check_compatible, checkpoint_path, is_sharded, latest_checkpoint,
                                    load_checkpoint, resolve_resume, save_checkpoint)
from dsmoe.train.faults import FaultInjector
from dsmoe.train.guard import Guard, StepVerdict, TrainingAborted, localize, params_all_finite, write_report
from dsmoe.train.optim import build_optimizer, clip_grad_norm, lr_at
from dsmoe.train.precision import autocast, grad_scaler, resolve_precision
from dsmoe.train.sharded_checkpoint import ShardedState, load_meta, model_shapes, save_sharded


class Trainer:
    def __init__(self, cfg: Config, resume: Optional[str] = None, mesh: Optional[Mesh] = None):
        self.cfg = cfg
        t = cfg.train
        self.mesh = mesh or init_mesh(t.device, cfg.parallel.ep, cfg.parallel.timeout_s)
        self.device = self.mesh.device
        self.run_dir = Path(cfg.run.dir)
        self.precision = resolve_precision(t.precision, self.device)
        self.tokenizer = get_tokenizer(cfg.data.tokenizer)
        self.vocab_size = cfg.model.vocab_size or padded_vocab_size(self.tokenizer.vocab_size)
        if self.vocab_size < self.tokenizer.vocab_size:
            raise ConfigError(f"model.vocab_size={self.vocab_size} is smaller than the tokenizer's "
                              f"{self.tokenizer.vocab_size} ({cfg.data.tokenizer}): raise it or set it to null")
        self._load_data()

        torch.manual_seed(t.seed)  # same init on every rank
        self.model = self._build_model().to(self.device)
        self.fsdp = cfg.parallel.dp == "fsdp" and self.mesh.distributed
        if self.fsdp:  # first: sharding replaces the parameters
            apply_fsdp(self.model, self.mesh, cfg.parallel, self.precision)
        # expert parallelism: routed-expert shards stay out of DDP and are reduced over edp only
        self.experts = None
        if self.mesh.ep > 1 and any(is_expert_param(n) for n, _ in self.model.named_parameters()):
            self.experts = ExpertShards.of(self.model, self.mesh, cfg.moe.n_routed_experts)
        if self.fsdp:
            self.param_sets = grad_norm_sets(self.model, cfg.parallel.replicate,
                                             set(self.experts.names) if self.experts else set())
        else:
            self.param_sets = [(list(self.model.parameters()), None)]
            if self.experts is not None:  # replicated, and sharded over the EP group
                self.param_sets = [([p for n, p in self.model.named_parameters() if not is_expert_param(n)], None),
                                   (self.experts.params, self.mesh.ep_group)]
        self.optimizer = build_optimizer(self.model, t)
        self.sharded = ShardedState(self.model, self.optimizer, self.mesh, self.experts, self.fsdp)
        fmt = cfg.checkpoint.format
        self.save_sharded = fmt == "sharded" or (fmt == "auto" and self.fsdp)
        self.scaler = grad_scaler(self.precision, self.device)
        self.block_fn = block_fn_for(cfg.parallel)
        self.step = 0  # optimizer steps taken
        self.sched_step = 0  # steps that advanced the LR schedule (fp16 overflow skips do not)
        self.batches_consumed = 0  # micro-batch index into the data order
        self.tokens_seen = 0
        self.skipped_overflow = 0
        self.lr_scale = 1.0  # lowered by each guard rollback
        self.guard = Guard(cfg.guard, self.mesh.rank, self.mesh.world) if cfg.guard.policy != "off" else None
        self.faults = FaultInjector(cfg.guard, self.mesh.rank, self.run_dir)
        self.faults.attach(self.model)
        self.events: list[dict] = []  # guard events of this run, for logs and tests
        self.timer = StepTimer(self.device)
        for moe in self.model.moe_modules():
            if hasattr(moe.dispatcher, "timer"):  # expert parallelism: time the all-to-alls
                moe.dispatcher.timer = self.timer
        self.log: Optional[RunLogger] = None
        self.resumed_from = resolve_resume(resume, self.run_dir)
        if self.resumed_from is not None:
            self._restore(self.resumed_from)
        self.wrapped = self.model if self.fsdp else \
            wrap_ddp(self.model, self.mesh, cfg.parallel, ignore=self.experts.names if self.experts else ())
        self.tokens_per_step = self.mesh.world * t.micro_batch * t.grad_accum * t.seq_len
        self.flops_per_token = flops_per_token(self.model, t.seq_len)
        self.peak_tflops = peak_tflops(device_label(self.device), self.precision, cfg.log.peak_tflops)

    # ------------------------------------------------------------------------- set-up

    def _build_model(self) -> Transformer:
        """The model on the CPU; under parallel.ep > 1 each MoE layer holds only this EP rank's experts
        (expert e on EP rank e // (E / ep)), initialised equal to the single-process model's rows."""
        if self.mesh.ep == 1:
            return Transformer(self.cfg, self.vocab_size)
        E, drops = self.cfg.moe.n_routed_experts, self.cfg.moe.capacity_factor is not None
        return Transformer(self.cfg, self.vocab_size,
                           dispatcher_factory=lambda layer: make_dispatcher(E, self.mesh, drops=drops))

    def _load_data(self) -> None:
        d, t = self.cfg.data, self.cfg.train
        options = dict(val_fraction=d.val_fraction, hf_config=d.hf_config, split=d.split, text_field=d.text_field)
        if self.mesh.is_main:  # one rank tokenizes; the others wait and read the same files
            data_dir = ensure_prepared(d.source, d.tokenizer, cache_root=d.cache_dir, **options)
        if self.mesh.distributed:
            dist.barrier()
        if not self.mesh.is_main:
            data_dir = ensure_prepared(d.source, d.tokenizer, cache_root=d.cache_dir, **options)
        self.data_dir = data_dir
        self.data_meta, train_tokens, val_tokens = load_prepared(data_dir)
        m = self.mesh
        self.batches = TokenBatches(train_tokens, t.seq_len, t.micro_batch, rank=m.rank, world=m.world, seed=t.seed)
        self.val, self.val_counted = [], 0
        if t.eval_every and len(val_tokens) > t.seq_len + 1:
            all_val = val_batches(val_tokens, t.seq_len, t.micro_batch, t.eval_batches)
            self.val = all_val[m.rank::m.world]
            self.val_counted = len(self.val)
            # Every rank runs as many batches: under expert parallelism each MoE forward is a collective
            # of the EP group, and evaluate() ends in an all-reduce. Short shards repeat a batch that
            # is run but not counted.
            self.val += [all_val[0]] * (-(-len(all_val) // m.world) - len(self.val))

    def _restore(self, path: Path) -> None:
        """From a single file or a sharded directory, whatever layout wrote it."""
        # checkpoints hold tensors at their single-process shapes (every expert): compare with those
        model_state = self.model.state_dict()
        if self.experts is not None:
            model_state = self.experts.full_shapes(model_state)
        if is_sharded(path):
            state = load_meta(path)
            check_compatible({**state, "model": model_shapes(path)}, self.cfg.model_dict(), model_state, path)
            self.sharded.load(path)  # each rank reads its own shards
        else:
            state = load_checkpoint(path)
            check_compatible(state, self.cfg.model_dict(), model_state, path)
            if self.experts is not None:  # keep this rank's experts
                self.experts.take_slice(state, self.optimizer)
            if self.fsdp:
                self._shard_like_live(state)
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        for key in ("step", "sched_step", "batches_consumed", "tokens_seen", "skipped_overflow"):
            setattr(self, key, int(state["progress"][key]))
        self.lr_scale = float(state["progress"].get("lr_scale", 1.0))
        if self.guard is not None and "guard" in state:
            self.guard.load_state_dict(state["guard"])
        rng = state["rng"]
        if self.mesh.rank < rng["cpu"].shape[0]:  # a rank beyond the saved world keeps its seeded state
            # clone: set_rng_state reads a row view from its storage's start (and can crash)
            torch.set_rng_state(rng["cpu"][self.mesh.rank].clone())
            if self.device.type == "cuda" and "cuda" in rng and self.mesh.rank < rng["cuda"].shape[0]:
                torch.cuda.set_rng_state(rng["cuda"][self.mesh.rank].clone(), self.device)

    def _shard_like_live(self, state: dict) -> None:
        """Whole tensors of a single-file checkpoint -> this rank's FSDP shards, in place on `state`."""
        live = self.model.state_dict()
        for name, value in state["model"].items():
            state["model"][name] = shard_like(value, live[name])
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        for i, per_param in state["optimizer"]["state"].items():
            p = params[i]
            for key, v in per_param.items():
                if torch.is_tensor(v) and v.shape == p.shape:
                    per_param[key] = shard_like(v, p)

    def _gather_rng(self) -> dict:
        """Every rank's RNG states as [world, n] uint8 tensors (all ranks take part)."""
        out = {}
        states = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            states["cuda"] = torch.cuda.get_rng_state(self.device)
        for name, s in states.items():
            if self.mesh.distributed:
                comm = s.to(self.device) if self.device.type == "cuda" else s
                parts = [torch.empty_like(comm) for _ in range(self.mesh.world)]
                dist.all_gather(parts, comm)
                out[name] = torch.stack([p.cpu() for p in parts])
            else:
                out[name] = s[None]
        return out

    # ------------------------------------------------------------------------- steps

    def train_step(self) -> dict:
        t = self.cfg.train
        self.faults.step = self.step + 1
        self.faults.maybe_kill()
        self.faults.maybe_hang()
        self.wrapped.train()
        first_batch = self.batches_consumed
        lr = lr_at(self.sched_step, t) * self.lr_scale
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=self.device)
        counts = dropped = None
        for micro in range(t.grad_accum):
            with self.timer.phase("data"):
                x, y = self._batch(self.batches_consumed)
            self.batches_consumed += 1
            last = micro == t.grad_accum - 1
            # gradients are reduced once per optimizer step, on the last micro-batch
            with optional_no_sync(self.wrapped, self.fsdp, self.mesh.distributed, last):
                with self.timer.phase("forward"), autocast(self.precision, self.device):
                    out = self.wrapped(x, y, block_fn=self.block_fn)
                with self.timer.phase("backward"):
                    self.scaler.scale(self.faults.scale_loss(out.loss) / t.grad_accum).backward()
            loss_sum += self.faults.scale_loss(out.ce_loss.detach())
            if out.expert_counts is not None:
                counts = out.expert_counts if counts is None else counts + out.expert_counts
                dropped = out.dropped if dropped is None else dropped + out.dropped

        if self.experts is not None:  # DDP / FSDP reduced the rest on the last micro-batch's backward
            self.experts.reduce_grads(edp_averaged=self.fsdp)
        with self.timer.phase("optimizer"):
            grad_norm, verdict, scale_before = self._optimizer_step(self.param_sets, loss_sum / t.grad_accum)
        if verdict is not None and verdict.bad:  # dropped on every rank: no update, schedule or bias step
            self.step += 1
            self.tokens_seen += self.tokens_per_step
            self._on_bad_step(verdict, first_batch)
            self.faults.step_done()
            return {"loss_sum": loss_sum, "grad_norm": grad_norm, "lr": lr, "counts": None, "dropped": None}
        overflow = self.precision == "fp16" and self.scaler.get_scale() < scale_before
        if counts is not None and self.mesh.distributed:
            dist.all_reduce(counts)  # the bias must stay identical on every rank
            dist.all_reduce(dropped)
        if overflow:
            self.skipped_overflow += 1
        else:
            self.sched_step += 1
            if counts is not None and self.cfg.moe.bias_update_rate > 0:
                for moe, layer_counts in zip(self.model.moe_modules(), counts):
                    update_expert_bias(moe.router, layer_counts, self.cfg.moe.bias_update_rate)
        self.step += 1
        self.tokens_seen += self.tokens_per_step
        if self.guard is not None and self.cfg.guard.check_params:
            self._check_params()
        self.faults.step_done()
        return {"loss_sum": loss_sum, "grad_norm": grad_norm, "lr": lr, "counts": counts, "dropped": dropped}

    def _optimizer_step(self, param_sets, mean_loss):
        """Unscale, clip, ask the guard, and step unless it says no. Returns (norm, verdict, scale before)."""
        self.scaler.unscale_(self.optimizer)
        self._sync_found_inf()
        grad_norm = clip_grad_norm(param_sets, self.cfg.train.grad_clip)
        verdict = None
        if self.guard is not None:
            # fp16: an inf gradient is GradScaler's overflow (skipped and counted), not a NaN event
            norm_for_guard = torch.zeros_like(grad_norm) if self.precision == "fp16" else grad_norm
            verdict = self.guard.check(mean_loss, norm_for_guard, None)
        scale_before = self.scaler.get_scale()
        if verdict is None or not verdict.bad:
            self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, verdict, scale_before

    def _batch(self, index: int):
        x, y = self.batches.batch(index)
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    # ------------------------------------------------------------------------- guard

    def _params_finite_everywhere(self) -> bool:
        ok = params_all_finite(self.model).float()
        if self.mesh.distributed:
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)  # expert shards differ between ranks
        return bool(ok.item())

    def _check_params(self) -> None:
        """Non-finite parameters after an update cannot be skipped: roll back, or abort."""
        if self._params_finite_everywhere():
            return
        verdict = StepVerdict(True, ["params"], [])
        self._record_event(verdict)
        if self.cfg.guard.policy == "rollback":
            self._rollback()
        else:
            self._abort(f"step {self.step}: non-finite parameters after the update")

    def _record_event(self, verdict: StepVerdict) -> dict:
        event = {"step": self.step, "what": verdict.what, "ranks": verdict.ranks, "zscore": verdict.zscore,
                 "policy": self.cfg.guard.policy}
        self.events.append(event)
        if self.log is not None:
            ranks = f" on rank(s) {verdict.ranks}" if verdict.ranks else ""
            self.log.warn(f"step {self.step}: {', '.join(verdict.what)} tripped the guard{ranks} "
                          f"-> {self.cfg.guard.policy}" + (f" (z={verdict.zscore:.1f})" if verdict.zscore else ""))
        return event

    def _on_bad_step(self, verdict: StepVerdict, first_batch: int) -> None:
        """Skip (every rank alike), then localise the first event, then roll back or abort if asked."""
        g = self.cfg.guard
        first_event = not self.events
        self._record_event(verdict)
        if g.localize and first_event and "spike" not in verdict.what:
            self._localize(first_batch)
        if g.policy == "abort":
            self._abort(f"step {self.step}: {', '.join(verdict.what)} non-finite on ranks {verdict.ranks}")
        if g.policy == "rollback" and self.guard.record_bad(self.step):
            self._rollback()

    def _localize(self, first_batch: int) -> None:
        """Replay the step's micro-batches with hooks; every rank replays all of them (EP collectives)."""
        report = None
        for i in range(self.cfg.train.grad_accum):
            x, y = self._batch(first_batch + i)

            def run(x=x, y=y):
                with autocast(self.precision, self.device):
                    return self.faults.scale_loss(self.model(x, y).loss)

            found = localize(self.model, run, self.step, self.mesh.rank)
            report = report or found
        if report is not None:
            path = write_report(self.run_dir, report)
            self.events[-1]["report"] = report
            if self.log is not None:
                self.log.warn(f"first non-finite value: {report['phase']} of {report['module']} "
                              f"({report.get('type')}) at step {report['step']} on rank {report['rank']} -> {path}")

    def _rollback(self) -> None:
        g = self.cfg.guard
        if self.guard.rollbacks >= g.max_rollbacks:
            self._abort(f"{self.guard.rollbacks} rollbacks did not help")
        path = latest_checkpoint(self.run_dir)
        if path is None:
            self._abort("no checkpoint to roll back to (set checkpoint.every)")
        position, lr_scale, guard_state = self.batches_consumed, self.lr_scale, self.guard.state_dict()
        self._restore(path)
        self.batches_consumed = position  # skip past the data that went bad
        self.guard.load_state_dict(guard_state)
        self.guard.rollbacks += 1
        self.guard.bad_steps.clear()
        self.lr_scale = lr_scale * g.rollback_lr_factor
        if self.log is not None:
            self.log.warn(f"rolled back to {path.name} (step {self.step}), data position kept at "
                          f"{position}, learning rate x{self.lr_scale:g}")

    def _abort(self, why: str) -> None:
        events = "\n".join(f"  step {e['step']}: {', '.join(e['what'])} ranks {e['ranks']}" for e in self.events)
        raise TrainingAborted(f"training aborted: {why}; nothing was saved from the bad state.\n"
                              f"events:\n{events}\nlast good checkpoint: {latest_checkpoint(self.run_dir)}")

    def _sync_found_inf(self) -> None:
        """fp16: GradScaler looks at this rank's gradients only. Replicated ones agree everywhere, expert
        and FSDP shards do not, so an inf in one shard must skip the step on every rank (MAX over the world)."""
        if (self.experts is None and not self.fsdp) or not self.scaler.is_enabled():
            return
        for found in self.scaler._per_optimizer_states[id(self.optimizer)]["found_inf_per_device"].values():
            dist.all_reduce(found, op=dist.ReduceOp.MAX)

    @torch.no_grad()
    def evaluate(self) -> Optional[dict]:
        if not self.val:
            return None
        self.model.eval()
        total = torch.zeros(2, device=self.device)
        for i, (x, y) in enumerate(self.val):
            with autocast(self.precision, self.device):
                out = self.model(x.to(self.device), y.to(self.device))
            if i < self.val_counted:  # the rest are padding (see _load_data)
                total += torch.stack([out.ce_loss.float(), torch.ones((), device=self.device)])
        if self.mesh.distributed:
            dist.all_reduce(total)
        loss = (total[0] / total[1]).item()
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50))}

    @torch.no_grad()
    def sample(self, prompts: Optional[list[str]] = None) -> list[dict]:
        t = self.cfg.train
        self.model.eval()
        gen = torch.Generator(device=self.device).manual_seed(t.seed + self.step)  # leaves the global RNG alone
        results = []
        for prompt in prompts or t.sample_prompts:
            ids = self.tokenizer.encode(prompt) or [self.tokenizer.eot_id]
            idx = torch.tensor([ids], device=self.device)
            with autocast(self.precision, self.device):
                out = self.model.generate(idx, t.sample_tokens, t.temperature, t.sample_top_k, generator=gen,
                                          vocab_limit=self.tokenizer.vocab_size)
            results.append({"step": self.step, "prompt": prompt,
                            "text": self.tokenizer.decode(out[0, len(ids):].tolist())})
        return results

    def checkpoint_state(self) -> dict:
        """The full state to continue from; every rank must call it (RNG states are gathered).

        Under expert parallelism rank 0's copy holds every expert (gathered from its EP group), so
        the file is exactly a single-process checkpoint and resumes at any ep."""
        state = self.meta_state()
        model_state, optim_state = self.model.state_dict(), self.optimizer.state_dict()
        if self.fsdp:  # whole tensors (expert ones whole over edp; gathered over ep below)
            model_state = {k: full(v) for k, v in model_state.items()}
            optim_state["state"] = {i: {k: full(v) for k, v in per.items()} for i, per in optim_state["state"].items()}
        if self.experts is not None:
            self.experts.gather_state(model_state, optim_state, self.optimizer)
        return {"model": model_state, "optimizer": optim_state, **state}

    def meta_state(self) -> dict:
        """Everything but the model and optimizer tensors; every rank must call it (RNG states are gathered)."""
        return {
            "scaler": self.scaler.state_dict(),
            "progress": {"step": self.step, "sched_step": self.sched_step, "batches_consumed": self.batches_consumed,
                         "tokens_seen": self.tokens_seen, "skipped_overflow": self.skipped_overflow,
                         "lr_scale": self.lr_scale},
            "guard": self.guard.state_dict() if self.guard is not None else {},
            "rng": self._gather_rng(),
            "config": self.cfg.to_dict(),
            "layout": {"world": self.mesh.world, "ep": self.mesh.ep, "dp": "fsdp" if self.fsdp else "ddp"},
            "data": {"tokenizer": self.cfg.data.tokenizer, "vocab_size": self.vocab_size,
                     "source": self.cfg.data.source},
        }

    def save(self) -> Optional[Path]:
        """Every rank calls it; never writes from non-finite parameters."""
        if not self._params_finite_everywhere():
            if self.log is not None:
                self.log.warn(f"step {self.step}: parameters are not finite: checkpoint not written")
            return None
        keep = self.cfg.checkpoint.keep_last
        if self.save_sharded:  # every rank writes its shards; no rank holds the whole model
            return save_sharded(self.sharded.tensors(), self.meta_state(), checkpoint_path(self.run_dir, self.step, True),
                                keep, self.mesh, before_commit=self.faults.save_hook())
        state = self.checkpoint_state()
        path = None
        if self.mesh.is_main:
            path = save_checkpoint(state, checkpoint_path(self.run_dir, self.step), keep,
                                   before_commit=self.faults.save_hook())
        if self.mesh.distributed:
            dist.barrier()  # nobody races ahead of a checkpoint that is still being written
        return path

    # ------------------------------------------------------------------------- the run

    def header(self) -> dict:
        b = param_breakdown(self.model)
        t, m = self.cfg.train, self.mesh
        return {
            "model": f"{self.cfg.model.name} ({self.cfg.attention.kind}, {self.cfg.moe.n_routed_experts} routed "
                     f"+ {self.cfg.moe.n_shared_experts} shared, top-{self.cfg.moe.top_k})",
            "parameters": f"{fmt_count(b['total'])} total, {fmt_count(b['active'])} active per token",
            "layout": f"world {m.world} (edp {m.edp} x ep {m.ep}, {'FSDP2' if self.fsdp else 'DDP'}) on {self.device}"
                      + (f", {self.experts.n_local} of {self.experts.n_experts} routed experts per rank"
                         if self.experts else ""),
            "precision": self.precision,
            "tokens / step": f"{fmt_tokens(self.tokens_per_step)} = {m.world} ranks x {t.micro_batch} x "
                             f"{t.grad_accum} accum x {t.seq_len}",
            "data": f"{self.cfg.data.source} ({self.cfg.data.tokenizer}, vocab {self.vocab_size}, "
                    f"{fmt_tokens(self.data_meta['train_tokens'])} train tokens)",
            "run dir": str(self.run_dir),
            "resumed from": str(self.resumed_from) if self.resumed_from else "-",
        }

    def fit(self) -> dict:
        cfg, t = self.cfg, self.cfg.train
        end = min(t.steps, t.stop_after) if t.stop_after is not None else t.steps
        log = self.log = RunLogger(self.run_dir, self.mesh.rank, t.steps, cfg.log.rich, start_step=self.step)
        if self.mesh.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(dump_yaml(cfg))
        log.header(self.header())
        history = []
        last = {"step": self.step, "time": time.perf_counter()}
        try:
            started = self.step
            while self.step < end:
                if self.step == started + 2:  # start-up is over: a hang from here on is an error, soon
                    set_timeout(self.mesh, cfg.parallel.step_timeout_s)
                stats = self._guarded_step()
                log.advance(self.step)
                if self.step % t.log_every == 0 or self.step == end:
                    row = self._log_row(stats, last)
                    history.append(row)
                    log.log(row)
                    last = {"step": self.step, "time": time.perf_counter()}
                if t.eval_every and (self.step % t.eval_every == 0 or self.step == end):
                    val = self.evaluate()
                    if val:
                        log.log({"step": self.step, **val})
                        history.append({"step": self.step, **val})
                if t.sample_every and (self.step % t.sample_every == 0 or self.step == end) and \
                        (self.mesh.is_main or self.mesh.ep > 1 or self.fsdp):
                    # under expert parallelism or FSDP every rank samples (same generator seed, same
                    # lengths), since each forward is a collective; rank 0 writes
                    samples = self.sample()
                    if self.mesh.is_main:
                        self._write_samples(samples, log)
                if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0 and self.step != end:
                    self.save()
            if cfg.checkpoint.save_final:
                path = self.save()
                if path:
                    log.print(f"checkpoint: {path}")
        except torch.OutOfMemoryError as e:
            raise MemoryError(f"out of memory at step {self.step + 1}: see `python -m dsmoe.estimate CONFIG --world "
                              f"{self.mesh.world}` for what fits: lower train.micro_batch (raise train.grad_accum to "
                              f"keep the batch), set parallel.activation_checkpointing=full, split the experts "
                              f"with --parallel.ep, or shard with launch/train_fsdp.py\n{e}") from e
        finally:
            log.close()
            self.log = None
        return {"history": history, "step": self.step}

    def _guarded_step(self) -> dict:
        """A train step whose collective timeouts name the step and the ranks that stopped answering."""
        try:
            return self.train_step()
        except RuntimeError as e:
            text = str(e).lower()
            if not self.mesh.distributed or ("timeout" not in text and "timed out" not in text):
                raise
            silent = missing_ranks(self.mesh, self.cfg.parallel.step_timeout_s)
            raise RuntimeError(f"rank {self.mesh.rank}: a collective of step {self.step + 1} (gradient all-reduce, "
                               f"expert all-to-all or guard flag) timed out; {silent}. "
                               f"Check those ranks' logs; parallel.step_timeout_s sets the limit.\n{e}") from e

    def _log_row(self, stats: dict, last: dict) -> dict:
        loss = stats["loss_sum"] / self.cfg.train.grad_accum
        if self.mesh.distributed:
            dist.all_reduce(loss)
            loss = loss / self.mesh.world
        elapsed = time.perf_counter() - last["time"]
        steps = max(self.step - last["step"], 1)  # a rollback moves the step back
        tokens_per_s = self.tokens_per_step * steps / max(elapsed, 1e-9)
        row = {"step": self.step, "loss": loss.item(), "lr": stats["lr"], "grad_norm": stats["grad_norm"].item(),
               "tokens_seen": self.tokens_seen, "step_time_s": elapsed / steps, "tokens_per_s": tokens_per_s,
               "tokens_per_s_per_device": tokens_per_s / self.mesh.world,
               "mfu": mfu(tokens_per_s, self.flops_per_token, self.peak_tflops, self.mesh.world)}
        row.update({f"{phase}_ms": ms / steps for phase, ms in self.timer.take().items()})
        if self.device.type == "cuda":
            mem = torch.cuda.memory_stats(self.device)
            row["mem_gb"] = mem.get("allocated_bytes.all.peak", 0) / 2**30
            row["mem_reserved_gb"] = mem.get("reserved_bytes.all.peak", 0) / 2**30
            row["alloc_retries"], row["ooms"] = mem.get("num_alloc_retries", 0), mem.get("num_ooms", 0)
            if (row["alloc_retries"] or row["ooms"]) and self.log is not None:
                self.log.warn(f"the CUDA allocator retried {row['alloc_retries']} times ({row['ooms']} OOMs): memory "
                              f"is tight; see python -m dsmoe.estimate")
        row["rss_gb"] = psutil.Process().memory_info().rss / 2**30
        if stats["counts"] is not None:
            counts = stats["counts"].float()
            per_layer = counts.max(-1).values / counts.mean(-1).clamp(min=1e-9)
            row["expert_imbalance"] = per_layer.max().item()  # the worst layer
            row["dropped_frac"] = (stats["dropped"].sum() / counts.sum().clamp(min=1)).item()
            biases = torch.stack([m.router.expert_bias for m in self.model.moe_modules()])
            row["bias_range"] = (biases.max() - biases.min()).item()
            if self.cfg.log.expert_stats:
                row["tokens_per_expert"] = counts.int().tolist()  # [moe layer][expert], this step
            if self.experts is not None:
                dispatchers = [m.dispatcher for m in self.model.moe_modules()]
                row["a2a_mb_per_step"] = sum(d.bytes_sent for d in dispatchers) / steps / 2**20  # this rank
                for d in dispatchers:
                    d.bytes_sent = 0
        if self.skipped_overflow:
            row["skipped_overflow"] = self.skipped_overflow
        if self.events:
            row["guard_events"] = len(self.events)
        return row

    def _write_samples(self, samples: list[dict], log: RunLogger) -> None:
        with open(self.run_dir / "samples.jsonl", "a") as f:
            for s in samples:
                f.write(json.dumps(s) + "\n")
                log.print(f"sample @ {s['step']}: {s['prompt']}{s['text']!r}", style="green")
