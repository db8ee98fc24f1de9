"""One metrics row per log interval: loss, rate, throughput, MFU, memory, expert load.

The only host syncs of a training run outside the guard's one per step happen here, on steps that log.
"""
from __future__ import annotations

import psutil
import torch
import torch.distributed as dist

from dsmoe.metrics.throughput import mfu


def log_row(stats, state, progress, cfg, mesh, *, timer, log, guard_events: int, flops_per_token: float,
            peak_tflops: float | None, steps: int, train_seconds: float) -> dict:
    """`stats`: the last train step's StepResult; `state`: the TrainState (model, experts, device,
    tokens_per_step); `progress`: the run's Progress; `timer`: the StepTimer whose phases are taken;
    `log` warns of a tight CUDA allocator. `steps` and `train_seconds` cover the interval (training
    steps only: evaluation, samples and checkpoints are not in the time)."""
    loss = stats.loss_sum / cfg.train.grad_accum
    if mesh.distributed:
        dist.all_reduce(loss)
        loss = loss / mesh.world
    steps = max(steps, 1)  # a rollback moves the step back
    tokens_per_s = state.tokens_per_step * steps / max(train_seconds, 1e-9)
    p = progress
    row = {"step": p.step, "loss": loss.item(), "lr": stats.lr, "grad_norm": stats.grad_norm.item(),
           "samples": p.samples, "tokens": p.tokens, "step_time_s": train_seconds / steps,
           "tokens_per_s": tokens_per_s, "tokens_per_s_per_device": tokens_per_s / mesh.world,
           "mfu": mfu(tokens_per_s, flops_per_token, peak_tflops, mesh.world)}
    row.update({f"{phase}_ms": ms / steps for phase, ms in timer.take().items()})
    if state.device.type == "cuda":
        mem = torch.cuda.memory_stats(state.device)
        row["mem_gb"] = mem.get("allocated_bytes.all.peak", 0) / 2**30
        row["mem_reserved_gb"] = mem.get("reserved_bytes.all.peak", 0) / 2**30
        row["alloc_retries"], row["ooms"] = mem.get("num_alloc_retries", 0), mem.get("num_ooms", 0)
        if row["alloc_retries"] or row["ooms"]:
            log.warn(f"the CUDA allocator retried {row['alloc_retries']} times ({row['ooms']} OOMs): memory "
                       f"is tight; see python -m dsmoe.estimate")
    row["rss_gb"] = psutil.Process().memory_info().rss / 2**30
    if stats.counts is not None:
        counts = stats.counts.float()
        per_layer = counts.max(-1).values / counts.mean(-1).clamp(min=1e-9)
        row["expert_imbalance"] = per_layer.max().item()  # the worst layer
        row["expert_imbalance_per_layer"] = per_layer.tolist()
        row["dropped_frac"] = (stats.dropped.sum() / counts.sum().clamp(min=1)).item()
        biases = torch.stack([m.router.expert_bias for m in state.model.moe_modules()])
        row["bias_range"] = (biases.max() - biases.min()).item()
        if cfg.log.expert_stats:
            row["tokens_per_expert"] = counts.int().tolist()  # [moe layer][expert], this step
        if state.experts is not None:
            dispatchers = [m.dispatcher for m in state.model.moe_modules()]
            row["a2a_mb_per_step"] = sum(d.bytes_sent for d in dispatchers) / steps / 2**20  # this rank
            for d in dispatchers:
                d.bytes_sent = 0
    if p.skipped_overflow:
        row["skipped_overflow"] = p.skipped_overflow
    if guard_events:
        row["guard_events"] = guard_events
    return row
