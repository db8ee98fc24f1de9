"""AdamW with decay only on matrices, learning-rate schedules, and the global gradient norm."""
from __future__ import annotations

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
    peak, floor = t.lr, t.lr * t.min_lr_ratio
    if t.schedule == "onecycle":  # torch's OneCycleLR shape: peak/25 -> peak -> peak/25/1e4, cosine
        start, floor = peak / 25, peak / 25 / 1e4
        if step < t.warmup_steps:
            return start + (peak - start) * 0.5 * (1 - math.cos(math.pi * step / t.warmup_steps))
    elif step < t.warmup_steps:
        return peak * (step + 1) / t.warmup_steps
    if t.schedule == "constant":
        return peak
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps))
    if t.schedule == "linear":
        return peak + (floor - peak) * progress
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))


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
