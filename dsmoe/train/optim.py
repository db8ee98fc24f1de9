"""AdamW with decay only on matrices, learning-rate schedules, and the global gradient norm."""
from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Optional

import torch
import torch.distributed as dist

from dsmoe.config import TrainConfig
from dsmoe.parallel.fsdp import local


def decay_split(model: torch.nn.Module) -> tuple[list[str], list[str]]:
    """Parameter names with weight decay (matrices) and without (norms, biases); the routing bias is a
    buffer. Their concatenation is the optimizer's parameter order."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(name)
    return decay, no_decay


def _adamw(decay: list, no_decay: list, t: TrainConfig) -> torch.optim.AdamW:
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused (CUDA and CPU): several times faster than foreach/for-loop, and no step temporaries
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, fused=True)


def build_optimizer(model: torch.nn.Module, t: TrainConfig) -> torch.optim.AdamW:
    params = dict(model.named_parameters())
    decay, no_decay = decay_split(model)
    return _adamw([params[n] for n in decay], [params[n] for n in no_decay], t)


def param_groups_layout(n_decay: int, n_no_decay: int, t: TrainConfig) -> list[dict]:
    """The `param_groups` of build_optimizer's state_dict for a model with these parameter counts."""
    def placeholders(n):
        return [torch.zeros(1, requires_grad=True) for _ in range(n)]

    return _adamw(placeholders(n_decay), placeholders(n_no_decay), t).state_dict()["param_groups"]


def lr_at(step: int, t: TrainConfig) -> float:
    """Learning rate for scheduler step `step` (0-based); skipped fp16 steps do not advance it."""
    peak, floor = t.lr, _floor(t)
    if t.schedule == "onecycle":  # torch's OneCycleLR shape: peak/25 -> peak -> peak/25/1e4, cosine
        start = peak / 25
        if step < t.warmup_steps:
            return start + (peak - start) * 0.5 * (1 - math.cos(math.pi * step / t.warmup_steps))
    elif step < t.warmup_steps:
        return peak * (step + 1) / t.warmup_steps
    if t.schedule == "constant":
        return peak
    return _decay(peak, floor, (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps), t.schedule)


def _floor(t: TrainConfig) -> float:
    return t.lr / 25 / 1e4 if t.schedule == "onecycle" else t.lr * t.min_lr_ratio


def _decay(start: float, floor: float, progress: float, schedule: str) -> float:
    progress = min(1.0, max(0.0, progress))
    if schedule == "linear":
        return start + (floor - start) * progress
    return floor + (start - floor) * 0.5 * (1 + math.cos(math.pi * progress))


class Schedule:
    """The learning rate over scheduler steps, continuous across a resume that changes `train.steps`.

    A run trains with `lr_at` for its configured length. When a resume sets another `train.steps`
    after warmup, the schedule is re-planned at the resume step s0: from the rate step s0 would have
    had, the same shape (cosine or linear) decays to the floor at the new end. Warmup is never redone;
    a resume inside warmup keeps warmup and decays over the new length (warmup does not depend on it).
    The re-plans are part of the checkpoint, so any later resume follows the same curve."""

    def __init__(self, t: TrainConfig, replans: Optional[list] = None, planned_steps: Optional[int] = None):
        self.t = t
        self.planned_steps = planned_steps if planned_steps is not None else t.steps  # of the base curve
        self.replans: list[tuple[int, float, int]] = [tuple(r) for r in (replans or [])]  # (at, lr, until)

    def __call__(self, step: int) -> float:
        for at, lr, until in reversed(self.replans):
            if step >= at:
                return _decay(lr, _floor(self.t), (step - at) / max(1, until - at), self.t.schedule)
        return lr_at(step, dataclasses.replace(self.t, steps=self.planned_steps))

    def extend(self, at: int) -> Optional[str]:
        """Re-plan for the config's `train.steps` at scheduler step `at`; a line for the header, or None."""
        end = self.replans[-1][2] if self.replans else self.planned_steps
        if self.t.steps == end:
            return None
        if at < self.t.warmup_steps and not self.replans or self.t.schedule == "constant":
            self.planned_steps = self.t.steps
            return f"length {end} -> {self.t.steps} steps (continuous: warmup and decay follow the new length)"
        lr = self(at)
        self.replans.append((at, lr, self.t.steps))
        return (f"length {end} -> {self.t.steps} steps: from {lr:.3g} at step {at + 1}, {self.t.schedule} decay "
                f"to {_floor(self.t):.3g} at step {self.t.steps} (no warmup again)")

    def state_dict(self) -> dict:
        return {"planned_steps": self.planned_steps, "replans": [list(r) for r in self.replans]}


def grad_norm_squared(params: Iterable[torch.Tensor]) -> torch.Tensor:
    """Of this rank's gradients (the local shards of sharded ones)."""
    grads = [local(p.grad) for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norms = torch._foreach_norm(grads, 2.0)
    return torch.stack([n.float() for n in norms]).pow(2).sum()


def clip_grad_norm(param_sets: list[tuple[list[torch.Tensor], Optional[dist.ProcessGroup]]],
                   max_norm: float) -> torch.Tensor:
    """Global norm over parameter sets whose gradients are sharded over `group` (None: replicated).

    Each set contributes its squared norm, summed over its group when sharded, so every rank sees
    the same total and clips by the same factor. Returns the norm before clipping.
    """
    total_sq = None
    for params, group in param_sets:
        sq = grad_norm_squared(params)
        if group is not None:
            dist.all_reduce(sq, group=group)
        total_sq = sq if total_sq is None else total_sq + sq.to(total_sq.device)
    total = total_sq.sqrt()
    if max_norm > 0:
        scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        grads = [local(p.grad) for params, _ in param_sets for p in params if p.grad is not None]
        torch._foreach_mul_(grads, scale.to(grads[0].device))
    return total
