"""`--dry-run`: the plan of a run, from the model on the meta device, without training."""
from __future__ import annotations

from typing import Optional

from dsmoe.config import Config, ConfigError
from dsmoe.estimate import PROFILES, format_estimate, memory_budget, profile_of, suggest, verdict
from dsmoe.metrics.logger import fmt_tokens
from dsmoe.tools.memory import estimate_memory
from dsmoe.tools.model import breakdown, fmt_count


def print_plan(cfg: Config, world: int, config_path: Optional[str] = None) -> bool:
    """Print world layout, parameters per rank, tokens per step, precision and memory; True if it fits."""
    from rich.console import Console

    console = Console()
    ep = cfg.parallel.ep
    if world % ep:
        raise ConfigError(f"world size {world} is not divisible by parallel.ep={ep}: launch a multiple of {ep} "
                          f"processes or change parallel.ep")
    t = cfg.train
    b = breakdown(cfg)
    per_rank = b["total"] - b["moe_routed"] + b["moe_routed"] // ep
    device = "cpu" if t.device == "cpu" else "cuda"
    console.print(f"[bold]plan[/bold] {cfg.model.name}: {fmt_count(b['total'])} parameters "
                  f"({fmt_count(b['active'])} active per token, {b['flops_per_token']:.3g} train FLOPs/token)")
    console.print(f"  layout      world {world} = edp {world // ep} x ep {ep}; "
                  f"{cfg.moe.n_routed_experts // ep if cfg.moe.n_routed_experts else 0} routed experts per rank")
    if cfg.parallel.dp == "fsdp" and world > 1:
        shard = world // cfg.parallel.replicate
        per_rank = (b["total"] - b["moe_routed"]) // shard + b["moe_routed"] // world
        console.print(f"  per rank    {fmt_count(per_rank)} parameters (FSDP2: experts over ep x edp, "
                      f"the rest over {shard} ranks)")
    else:
        console.print(f"  per rank    {fmt_count(per_rank)} parameters (experts split over ep, the rest replicated)")
    console.print(f"  tokens/step {fmt_tokens(world * t.micro_batch * t.grad_accum * t.seq_len)} = {world} ranks x "
                  f"{t.micro_batch} x {t.grad_accum} accum x {t.seq_len}")
    console.print(f"  precision   {t.precision} on {t.device} (auto: bf16 on sm_80+, fp16 on T4, fp32 on CPU); "
                  f"activation checkpointing {cfg.parallel.activation_checkpointing}")
    est = estimate_memory(cfg, world=world, ep=ep, device=device)
    profile = profile_of(config_path) if config_path else None
    budget = memory_budget(PROFILES[profile][0]) if profile else memory_budget("cpu" if device == "cpu" else None)
    console.print(format_estimate(est, cfg.model.name, budget))
    fits, text = verdict(est, budget)
    console.print(("[green]" if fits else "[red]") + text)
    if not fits and budget is not None:
        for hint in suggest(cfg, world, ep, device, budget[0]):
            console.print(f"  - {hint}")
    return fits
