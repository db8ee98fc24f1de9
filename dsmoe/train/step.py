"""One optimizer step, read whole: micro-steps, gradient sync, expert reduction, clipping, the guard's
verdict, the update, the progress. The trainer's loop runs it, and the simulated rehearsal
(dsmoe/train/simulate.py) runs this same function on fake tensors.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Iterable, Optional

import torch

from dsmoe.config import Config
from dsmoe.model import update_expert_bias
from dsmoe.parallel.fsdp import optional_no_sync
from dsmoe.train.build import TrainState
from dsmoe.train.faults import FaultInjector
from dsmoe.train.guard import Guard, GuardPolicy
from dsmoe.train.optim import clip_grad_norm
from dsmoe.train.precision import autocast
from dsmoe.train.signals import StopRequest
from dsmoe.train.state import Progress


@dataclasses.dataclass
class StepResult:
    """What a step returns to the loop."""

    loss_sum: torch.Tensor
    """this rank's cross-entropy summed over the micro-steps (0-d, on the device; divide by grad_accum)"""
    grad_norm: torch.Tensor
    """the global gradient norm before clipping (0-d)"""
    lr: Optional[float]
    """the learning rate the step used (None: left as the optimizer had it)"""
    stop: bool = False
    """some rank was asked to stop: every rank stops after this step"""
    counts: Optional[torch.Tensor] = None
    """[moe layers, E] tokens per expert summed over every rank (None on a dropped step)"""
    dropped: Optional[torch.Tensor] = None
    """[moe layers] dropped assignments summed over every rank"""
    rollback: bool = False
    """the guard decided to roll back to the newest checkpoint: the loop applies it (GuardPolicy.rollback)"""


def train_step(state: TrainState, progress: Progress, batches: Iterable, guard: Optional[Guard], cfg: Config, *,
               policy: Optional[GuardPolicy] = None, lr: Optional[float] = None, stop: Optional[StopRequest] = None,
               faults: Optional[FaultInjector] = None, timer=None, micro_steps: Optional[list[int]] = None,
               on_micro_step: Optional[Callable[[], None]] = None) -> StepResult:
    """Micro-steps `micro_steps` of train.grad_accum (default all) on `batches` [(x [B,S], y [B,S])], drawn
    one per micro-step; gradients synchronised on the last; expert gradients reduced over edp; clipped;
    the optimizer stepped unless the guard's verdict (one all-reduce, one host copy) drops the step or
    fp16 overflowed; `progress` advanced. Without `guard` (the rehearsal) every step updates.

    `policy` decides what a bad step does (skip, localise, abort, or a rollback returned in the result);
    `stop`: this rank's stop request, which the verdict carries to every rank;
    `timer`: a StepTimer whose phases the step is booked to; `on_micro_step`: called after each
    micro-step's backward (the rehearsal's memory tracker)."""
    t = cfg.train
    if faults is not None:
        faults.step = progress.step + 1
        faults.maybe_kill()
        faults.maybe_hang()
    scale_loss = faults.scale_loss if faults is not None else (lambda loss: loss)
    phase = timer.phase if timer is not None else (lambda name: contextlib.nullcontext())
    state.wrapped.train()
    first_sample = progress.samples
    if lr is not None:
        for group in state.optimizer.param_groups:
            group["lr"] = lr
    batches = iter(batches)
    loss_sum = torch.zeros((), device=state.device)
    counts = dropped = None
    for micro in range(t.grad_accum) if micro_steps is None else micro_steps:
        with phase("data"):
            x, y = next(batches)
        progress.samples += state.samples_per_micro_step
        last = micro == t.grad_accum - 1
        # gradients are reduced once per optimizer step, on the last micro-batch
        with optional_no_sync(state.wrapped, state.fsdp, state.distributed, last):
            with phase("forward"), autocast(state.precision, state.device):
                out = state.wrapped(x, y, block_fn=state.block_fn)
            with phase("backward"):
                state.scaler.scale(scale_loss(out.loss) / t.grad_accum).backward()
        loss_sum += scale_loss(out.ce_loss.detach())
        if out.expert_counts is not None:
            counts = out.expert_counts if counts is None else counts + out.expert_counts
            dropped = out.dropped if dropped is None else dropped + out.dropped
        if on_micro_step is not None:
            on_micro_step()
    if state.experts is not None:  # DDP / FSDP reduced the rest on the last micro-batch's backward
        state.experts.reduce_grads(edp_averaged=state.fsdp)

    with phase("optimizer"):
        state.scaler.unscale_(state.optimizer)
        found_inf = _found_inf(state)
        grad_norm = clip_grad_norm(state.param_sets, t.grad_clip)
        verdict = None
        if guard is not None:
            # one all-reduce and one host copy: NaN/spike flags, stop request, fp16 overflow, expert counts
            requested = stop is not None and stop.requested  # read as late as it can be: a signal during the step
            verdict = guard.check(loss_sum / t.grad_accum, grad_norm, found_inf, requested, counts, dropped)
        if verdict is None or not (verdict.bad or verdict.overflow):
            state.optimizer.step()
        if found_inf is not None:  # every rank updates the scale from the same, global, overflow flag
            for f in _found_inf_per_device(state):
                f.fill_(float(verdict.overflow))
        state.scaler.update()
        state.optimizer.zero_grad(set_to_none=True)
    progress.step += 1
    progress.tokens += state.tokens_per_step
    result = StepResult(loss_sum, grad_norm, lr)
    if verdict is None:
        progress.sched_step += 1
    elif verdict.bad:  # dropped on every rank: no update, schedule or bias step
        result.stop, result.rollback = verdict.stop, policy.on_bad_step(verdict, first_sample)
    elif verdict.overflow:
        result.stop = verdict.stop
        progress.skipped_overflow += 1
    else:
        result.stop, result.counts, result.dropped = verdict.stop, verdict.counts, verdict.dropped
        progress.sched_step += 1
        if verdict.counts is not None and cfg.moe.bias_update_rate > 0:
            for moe, layer_counts in zip(state.model.moe_modules(), verdict.counts):
                update_expert_bias(moe.router, layer_counts, cfg.moe.bias_update_rate)
        if cfg.guard.check_params and cfg.guard.policy != "off":
            result.rollback = policy.check_params()
    if faults is not None:
        faults.step_done()
    return result


def _found_inf_per_device(state: TrainState) -> list[torch.Tensor]:
    # GradScaler keeps its per-device overflow flags private; the guard must read and overwrite them so
    # every rank updates the scale from the global flag
    return list(state.scaler._per_optimizer_states[id(state.optimizer)]["found_inf_per_device"].values())


def _found_inf(state: TrainState) -> Optional[torch.Tensor]:
    """fp16: this rank's GradScaler overflow flag (0-d, on the device); None without a scaler."""
    if not state.scaler.is_enabled():
        return None
    return torch.stack([f.to(state.device) for f in _found_inf_per_device(state)]).sum()
