"""NaN and spike guards: one all-reduced flag per step, the policies, and the module that went bad first.

Cost per step: one all-reduce of (5 + world) floats plus the expert counts over the world, and one
device-to-host copy of the flags (the decision must be known on the host before the optimizer step).
The same collective carries the stop request and fp16's overflow flag, so a step that does not log
has no other host sync.
"""
from __future__ import annotations

import json
import math
import warnings
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import torch
import torch.distributed as dist

from dsmoe.config import Config, GuardConfig
from dsmoe.parallel.fsdp import local
from dsmoe.parallel.mesh import Mesh
from dsmoe.train.build import TrainState
from dsmoe.train.faults import FaultInjector
from dsmoe.train.precision import autocast

if TYPE_CHECKING:  # state.py saves only from finite parameters, asking this module
    from dsmoe.train.state import Checkpoints, Progress

QUANTITIES = ("loss", "grad_norm", "params", "spike")
HEAD = 4  # flags before the per-rank ones: loss non-finite, grad norm non-finite, fp16 overflow, stop requested


class TrainingAborted(RuntimeError):
    """The guard gave up: the message is the report; nothing was written from the bad state."""


@dataclass
class StepVerdict:
    bad: bool
    what: list[str]  # the quantities that tripped: loss, grad_norm, params, spike
    ranks: list[int]  # ranks whose own loss was non-finite
    zscore: Optional[float] = None
    stop: bool = False  # some rank was asked to stop (SIGINT/SIGTERM/SIGUSR1): every rank stops after this step
    overflow: bool = False  # fp16: GradScaler found inf/NaN gradients on some rank (skipped, not a guard event)
    counts: Optional[torch.Tensor] = None  # [moe layers, E] tokens per expert summed over every rank
    dropped: Optional[torch.Tensor] = None  # [moe layers] dropped assignments summed over every rank


class SpikeDetector:
    """z-score of the loss against a moving window of accepted losses."""

    def __init__(self, window: int, threshold: float):
        self.threshold = threshold
        self.losses: deque = deque(maxlen=window)

    def zscore(self, loss: float) -> Optional[float]:
        if self.threshold <= 0 or len(self.losses) < self.losses.maxlen or not math.isfinite(loss):
            return None
        mean = sum(self.losses) / len(self.losses)
        var = sum((x - mean) ** 2 for x in self.losses) / (len(self.losses) - 1)
        return (loss - mean) / max(math.sqrt(var), 1e-8)

    def accept(self, loss: float) -> None:
        self.losses.append(loss)

    def state_dict(self) -> dict:
        return {"losses": list(self.losses)}

    def load_state_dict(self, state: dict) -> None:
        self.losses.clear()
        self.losses.extend(state["losses"])


@dataclass
class Guard:
    cfg: GuardConfig
    rank: int = 0
    world: int = 1
    spikes: SpikeDetector = field(init=False)
    bad_steps: deque = field(default_factory=deque)  # steps of recent bad events, for rollback
    events: int = 0
    rollbacks: int = 0

    def __post_init__(self):
        self.spikes = SpikeDetector(self.cfg.spike_window, self.cfg.spike_zscore)

    def check(self, loss: torch.Tensor, grad_norm: torch.Tensor, found_inf: Optional[torch.Tensor] = None,
              stop: bool = False, counts: Optional[torch.Tensor] = None,
              dropped: Optional[torch.Tensor] = None) -> StepVerdict:
        """Every rank calls this with its own numbers and gets the same verdict.

        One all-reduce (SUM) carries the step's flags, the loss for the spike test, the stop request, the
        fp16 overflow flag and the expert counts; one device-to-host copy of its first HEAD + world + 1
        values is the step's only host sync. loss, grad_norm: 0-d; found_inf: 0-d (fp16) or None."""
        device = grad_norm.device
        zero = torch.zeros((), device=device)
        overflow = (found_inf.to(device).float().sum() > 0).float() if found_inf is not None else zero
        loss_bad = (~torch.isfinite(loss.detach())).float().to(device)
        ranks = torch.zeros(self.world, device=device)
        ranks[self.rank] = loss_bad  # the loss is rank-local; gradients are already mixed by the all-reduce
        parts = [loss_bad.reshape(1), ((~torch.isfinite(grad_norm)).float() * (1 - overflow)).reshape(1),
                 overflow.reshape(1), torch.full((1,), float(stop), device=device), ranks,
                 loss.detach().float().reshape(1).to(device) / self.world]
        tail = [t.float().reshape(-1).to(device) for t in (counts, dropped) if t is not None]
        flat = torch.cat(parts + tail)
        if self.world > 1:
            dist.all_reduce(flat)
        n_head = HEAD + self.world + 1
        flags = flat[:n_head].tolist()  # the one host copy of the step's verdict
        rest = flat[n_head:]
        if counts is not None:
            counts, dropped = rest[:counts.numel()].view(counts.shape), rest[counts.numel():].view(dropped.shape)
        mean_loss = flags[-1]
        judging = self.cfg.policy != "off"
        z = self.spikes.zscore(mean_loss) if judging else None
        spike = z is not None and z > self.cfg.spike_zscore
        what = [q for q, f in zip(QUANTITIES[:2], flags[:2]) if f > 0] + (["spike"] if spike else [])
        what = what if judging else []
        bad = bool(what)
        if not bad and judging:
            self.spikes.accept(mean_loss)
        return StepVerdict(bad, what, [r for r in range(self.world) if flags[HEAD + r] > 0], z,
                           stop=flags[3] > 0, overflow=flags[2] > 0, counts=counts, dropped=dropped)

    def record_bad(self, step: int) -> bool:
        """Count a bad step; True when the rollback threshold is reached."""
        self.events += 1
        self.bad_steps.append(step)
        while self.bad_steps and self.bad_steps[0] <= step - self.cfg.rollback_window:
            self.bad_steps.popleft()
        return len(self.bad_steps) >= self.cfg.rollback_after

    def state_dict(self) -> dict:
        return {"spikes": self.spikes.state_dict(), "events": self.events, "rollbacks": self.rollbacks}

    def load_state_dict(self, state: dict) -> None:
        self.spikes.load_state_dict(state["spikes"])
        self.events, self.rollbacks = int(state["events"]), int(state["rollbacks"])


def params_finite_everywhere(model: torch.nn.Module, mesh: Mesh) -> bool:
    """Whether every rank's parameters are finite (one all-reduce: expert shards differ between ranks)."""
    ok = params_all_finite(model).float()
    if mesh.distributed:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


def params_all_finite(model: torch.nn.Module) -> torch.Tensor:
    """One fused check over every parameter (a 0-d bool tensor, no host sync)."""
    norms = torch._foreach_norm([local(p.detach()) for p in model.parameters()], 2.0)  # FSDP: this rank's shards
    return torch.isfinite(torch.stack([n.float() for n in norms]).sum())


def _stats(t: torch.Tensor) -> dict:
    t = t.detach().float()
    finite = t[torch.isfinite(t)]
    return {"shape": list(t.shape), "nan": int(torch.isnan(t).sum()), "inf": int(torch.isinf(t).sum()),
            "finite_min": float(finite.min()) if finite.numel() else None,
            "finite_max": float(finite.max()) if finite.numel() else None,
            "finite_absmean": float(finite.abs().mean()) if finite.numel() else None}


def _tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    if hasattr(out, "__dataclass_fields__"):
        return [t for f in out.__dataclass_fields__ for t in _tensors(getattr(out, f))]
    return []


def localize(model: torch.nn.Module, run_micro_batch, step: int, rank: int) -> Optional[dict]:
    """Replay a micro-batch with hooks; the first module whose forward output (or, if the forward
    is clean, whose backward input gradient) holds a non-finite value.

    `run_micro_batch()` runs forward and returns the loss (backward is run here)."""
    found: list[dict] = []
    handles = []

    def fwd_hook(name):
        def hook(module, inputs, output):
            if not found:
                bad = [t for t in _tensors(output) if t.is_floating_point() and not torch.isfinite(t).all()]
                if bad:
                    found.append({"phase": "forward", "module": name or "<model>",
                                  "type": type(module).__name__, "output": _stats(bad[0])})
        return hook

    def bwd_hook(name):
        def hook(module, grad_input, grad_output):
            if not found:
                bad = [t for t in _tensors(grad_input) if t is not None and not torch.isfinite(t).all()]
                if bad:
                    found.append({"phase": "backward", "module": name or "<model>",
                                  "type": type(module).__name__, "grad_input": _stats(bad[0])})
        return hook

    for name, module in model.named_modules():
        handles.append(module.register_forward_hook(fwd_hook(name)))
        if name and not list(module.children()):  # leaf modules: full backward hooks on containers clash
            handles.append(module.register_full_backward_hook(bwd_hook(name)))
    try:
        with warnings.catch_warnings():  # the router returns a Routing: its backward hook never fires, fine
            warnings.filterwarnings("ignore", message="For backward hooks to be called")
            loss = run_micro_batch()
        if not found and not torch.isfinite(loss):
            found.append({"phase": "loss", "module": "<loss>", "type": "loss", "output": _stats(loss)})
        if loss.requires_grad:
            # on every rank, whatever it found: backward holds collectives (the expert all-to-alls, FSDP's
            # reduce-scatters) that every rank must enter alike
            with warnings.catch_warnings():  # the embedding's input (token ids) needs no gradient
                warnings.simplefilter("ignore", UserWarning)
                loss.backward()
        # parameters that are already non-finite explain everything downstream (FSDP: this rank's shards)
        bad_params = [n for n, p in model.named_parameters() if not torch.isfinite(local(p.detach())).all()]
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
    if not found and not bad_params:
        return None
    report = found[0] if found else {"phase": "parameters"}
    return {**report, "step": step, "rank": rank, "non_finite_parameters": bad_params[:20]}


def write_report(run_dir: Path, report: dict) -> Path:
    path = run_dir / f"nan_report_rank{report['rank']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    return path


class GuardPolicy:
    """What the trainer does with a bad step: skip it (every rank alike), localise the first event,
    decide a rollback to the newest checkpoint after repeats (the loop applies it), or abort with a report.

    `batch_at(first_sample)`: this rank's micro-batch at a sample position (the replay's); `warn`: how
    the run reports (its logger changes when fit() opens the run's files)."""

    def __init__(self, cfg: Config, state: TrainState, progress: Progress, guard: Guard, mesh: Mesh,
                 checkpoints: Checkpoints, faults: FaultInjector, batch_at: Callable, warn: Callable[[str], None]):
        self.cfg: GuardConfig = cfg.guard
        self.grad_accum, self.run_dir = cfg.train.grad_accum, Path(cfg.run.dir)
        self.state, self.progress, self.guard, self.mesh = state, progress, guard, mesh
        self.checkpoints, self.faults, self.batch_at, self.warn = checkpoints, faults, batch_at, warn
        self.events: list[dict] = []  # guard events of this run, for logs and tests

    def record(self, verdict: StepVerdict) -> dict:
        step = self.progress.step
        event = {"step": step, "what": verdict.what, "ranks": verdict.ranks, "zscore": verdict.zscore,
                 "policy": self.cfg.policy}
        self.events.append(event)
        ranks = f" on rank(s) {verdict.ranks}" if verdict.ranks else ""
        self.warn(f"step {step}: {', '.join(verdict.what)} tripped the guard{ranks} -> {self.cfg.policy}"
                  + (f" (z={verdict.zscore:.1f})" if verdict.zscore else ""))
        return event

    def on_bad_step(self, verdict: StepVerdict, first_sample: int) -> bool:
        """Skip (every rank alike), then localise the first event, then abort if asked. Returns whether
        to roll back (policy rollback, after repeats): the loop applies it with `rollback`."""
        first_event = not self.events
        self.record(verdict)
        if self.cfg.localize and first_event and "spike" not in verdict.what:
            self.localize(first_sample)
        if self.cfg.policy == "abort":
            self.abort(f"step {self.progress.step}: {', '.join(verdict.what)} non-finite on ranks {verdict.ranks}")
        return self.cfg.policy == "rollback" and self.guard.record_bad(self.progress.step)

    def check_params(self) -> bool:
        """Non-finite parameters after an update cannot be skipped: returns whether to roll back (else
        aborts)."""
        if params_finite_everywhere(self.state.model, self.mesh):
            return False
        self.record(StepVerdict(True, ["params"], []))
        if self.cfg.policy != "rollback":
            self.abort(f"step {self.progress.step}: non-finite parameters after the update")
        return True

    def localize(self, first_sample: int) -> None:
        """Replay the step's micro-batches with hooks; every rank replays all of them (EP collectives)."""
        s = self.state
        report = None
        for i in range(self.grad_accum):
            x, y = self.batch_at(first_sample + i * s.samples_per_micro_step)

            def run(x=x, y=y):
                with autocast(s.precision, s.device):
                    return self.faults.scale_loss(s.model(x, y).loss)

            found = localize(s.model, run, self.progress.step, self.mesh.rank)
            report = report or found
        if report is not None:
            path = write_report(self.run_dir, report)
            self.events[-1]["report"] = report
            self.warn(f"first non-finite value: {report['phase']} of {report['module']} ({report.get('type')}) "
                      f"at step {report['step']} on rank {report['rank']} -> {path}")

    def rollback(self) -> None:
        """To the newest checkpoint, keeping the data position (past the data that went bad) and the
        guard's history, with the learning rate scaled by guard.rollback_lr_factor."""
        g, p, guard = self.cfg, self.progress, self.guard
        if guard.rollbacks >= g.max_rollbacks:
            self.abort(f"{guard.rollbacks} rollbacks did not help")
        path = self.checkpoints.newest()  # chosen by rank 0, broadcast
        if path is None:
            self.abort("no checkpoint to roll back to (set checkpoint.every)")
        samples, lr_scale, guard_state = p.samples, p.lr_scale, guard.state_dict()
        self.checkpoints.restore(path)
        p.samples = samples  # skip past the data that went bad
        guard.load_state_dict(guard_state)
        guard.rollbacks += 1
        guard.bad_steps.clear()
        p.lr_scale = lr_scale * g.rollback_lr_factor
        self.warn(f"rolled back to {path.name} (step {p.step}), data position kept at sample {samples}, "
                  f"learning rate x{p.lr_scale:g}")

    def abort(self, why: str) -> None:
        events = "\n".join(f"  step {e['step']}: {', '.join(e['what'])} ranks {e['ranks']}" for e in self.events)
        raise TrainingAborted(f"training aborted: {why}; nothing was saved from the bad state.\n"
                              f"events:\n{events}\nlast good checkpoint: {self.checkpoints.newest()}")
