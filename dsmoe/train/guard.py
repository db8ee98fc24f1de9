"""NaN and spike guards: one all-reduced flag per step, a policy, and the module that went bad first.

Cost per step: one all-reduce of 4 floats over the world and one device-to-host copy of them (the
decision must be known on the host before the optimizer step).
"""
from __future__ import annotations

import json
import math
import warnings
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from dsmoe.config import GuardConfig
from dsmoe.parallel.fsdp import local

QUANTITIES = ("loss", "grad_norm", "params", "spike")


class TrainingAborted(RuntimeError):
    """The guard gave up: the message is the report; nothing was written from the bad state."""


@dataclass
class StepVerdict:
    bad: bool
    what: list[str]  # the quantities that tripped: loss, grad_norm, params, spike
    ranks: list[int]  # ranks whose own loss was non-finite
    zscore: Optional[float] = None


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

    def check(self, loss: torch.Tensor, grad_norm: torch.Tensor, params_finite: Optional[torch.Tensor],
              global_loss: Optional[float] = None) -> StepVerdict:
        """Every rank calls this with its own numbers and gets the same verdict."""
        device = grad_norm.device
        local = torch.zeros(len(QUANTITIES) + self.world, device=device)
        local[0] = (~torch.isfinite(loss)).float()
        local[1] = (~torch.isfinite(grad_norm)).float()
        if params_finite is not None:
            local[2] = (~params_finite).float()
        if local[0] > 0:  # the loss is rank-local; gradients are already mixed by the all-reduce
            local[len(QUANTITIES) + self.rank] = 1.0
        # the spike test needs the mean loss over ranks: send the loss along in the same collective
        local = torch.cat([local, loss.detach().float().reshape(1).to(device) / self.world])
        if self.world > 1:
            dist.all_reduce(local)
        flags = local.tolist()  # the one host copy of the step's verdict
        mean_loss = flags[-1]
        z = self.spikes.zscore(mean_loss)
        spike = z is not None and z > self.cfg.spike_zscore
        what = [q for q, f in zip(QUANTITIES[:3], flags[:3]) if f > 0] + (["spike"] if spike else [])
        ranks = [r for r in range(self.world) if flags[len(QUANTITIES) + r] > 0]
        bad = bool(what)
        if not bad:
            self.spikes.accept(mean_loss)
        return StepVerdict(bad, what, ranks, z)

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
