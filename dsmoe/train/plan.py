"""`--dry-run`: the plan of a run, from the model on the meta device, without training."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from dsmoe.config import Config, ConfigError, validate_training
from dsmoe.tools.fit import format_estimate, gpu_of, memory_budget, suggest, verdict
from dsmoe.metrics.logger import fmt_tokens
from dsmoe.tools.memory import estimate_memory
from dsmoe.tools.model import breakdown, fmt_count
from dsmoe.checkpoint import run_dir as rundir
from dsmoe.checkpoint.file import list_checkpoints


def planned_device(requested: str) -> tuple[str, str]:
    """("cpu" | "cuda", precision auto's choice on it) as the run would pick them on this machine."""
    device = "cuda" if requested.startswith("cuda") or (requested == "auto" and torch.cuda.is_available()) else "cpu"
    if device == "cpu":
        return device, "fp32"
    if not torch.cuda.is_available():
        return device, "bf16 on sm_80+, fp16 on T4"
    return device, "bf16" if torch.cuda.get_device_capability()[0] >= 8 else "fp16"


def run_dir_status(run_dir: Path) -> str:
    """What a fresh run (or --resume auto) would meet in the run directory."""
    if not rundir.holds_a_run(run_dir):
        return f"{run_dir} (new)"
    found = list_checkpoints(run_dir)
    newest = f", newest checkpoint {found[-1].name}" if found else ""
    return (f"{run_dir} holds run {rundir.read_lineage(run_dir) or '(unnamed)'}{newest}: --resume auto continues "
            f"it; a fresh run needs a new --run.dir or --run.overwrite=true")


def print_plan(cfg: Config, world: int, config_path: Optional[str] = None) -> bool:
    """Print world layout, parameters per rank, tokens per step, precision and memory; True if it fits."""
    from rich.console import Console

    validate_training(cfg)
    console = Console()
    ep = cfg.parallel.ep
    if world % ep:
        raise ConfigError(f"world size {world} is not divisible by parallel.ep={ep}: launch a multiple of {ep} "
                          f"processes or change parallel.ep")
    t = cfg.train
    b = breakdown(cfg)
    per_rank = b["total"] - b["moe_routed"] + b["moe_routed"] // ep
    device, precision = planned_device(t.device)
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
    auto = f"{t.precision} -> " if t.precision == "auto" else ""
    console.print(f"  device      {device}" + (" (train.device=auto: no CUDA device here)"
                                               if t.device == "auto" and device == "cpu" else "")
                  + ("; no CUDA device is visible here: this run stops at start-up on this machine"
                     if device == "cuda" and not torch.cuda.is_available() else ""), markup=False)
    console.print(f"  precision   {auto}{precision if t.precision == 'auto' else t.precision}; activation "
                  f"checkpointing {cfg.parallel.activation_checkpointing}", markup=False)
    d = cfg.data
    console.print(f"  data        {d.source} ({d.tokenizer} tokenizer; {d.val_fraction:g} held out for validation; "
                  f"prepared tokens cached in {d.cache_dir})", markup=False)
    total = t.steps * world * t.micro_batch * t.grad_accum * t.seq_len
    console.print(f"  schedule    {t.steps} steps ({fmt_tokens(total)} tokens), {t.schedule} from peak lr {t.lr:g} "
                  f"after {t.warmup_steps} warmup steps; log every {t.log_every}, evaluate every {t.eval_every}, "
                  f"sample every {t.sample_every}, checkpoint every {cfg.checkpoint.every} (0 = off)", markup=False)
    console.print(f"  run dir     {run_dir_status(Path(cfg.run.dir))}", markup=False)
    est = estimate_memory(cfg, world=world, ep=ep, device=device)
    gpu, _ = gpu_of(cfg, config_path)
    budget = memory_budget("cpu" if device == "cpu" else gpu)
    console.print(format_estimate(est, cfg.model.name, budget))
    fits, text = verdict(est, budget)
    console.print({True: "[green]", False: "[red]", None: "[yellow]"}[fits] + text)
    if fits is False:
        for hint in suggest(cfg, world, ep, device, budget[0]):
            console.print(f"  - {hint}", markup=False)
    return fits is not False
