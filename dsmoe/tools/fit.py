"""Does a config fit its GPU? The memory budget of a GPU or hardware profile, the verdict on an
estimate (dsmoe.tools.memory) against it, and the config changes that would make it fit. Used by the
`python -m dsmoe.estimate` command, `--dry-run` and the trainer's start-up check."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import yaml

from dsmoe.config import Config, ConfigError
from dsmoe.tools.memory import GiB, estimate_memory

HEADROOM = 0.10  # kept free for the CUDA context, NCCL buffers and allocator fragmentation
# total memory as nvidia-smi reports it (MiB); "cpu" is the host's RAM, read at run time
GPU_MEMORY_MIB = {"rtx4060": 8188, "t4": 15360, "h100": 81559}
# hardware profile (configs/hardware/NAME.yaml) -> (memory table key, GPUs it launches by default)
PROFILES = {"cpu": ("cpu", 1), "rtx4060": ("rtx4060", 1), "g4dn_12xlarge": ("t4", 4),
            "h100_node": ("h100", 8), "h100_multinode": ("h100", 16)}


def profile_of(path: str | Path) -> Optional[str]:
    """The hardware profile a config file is, or names with `hardware:`."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        raw = {}
    name = raw.get("hardware") if isinstance(raw, dict) else None
    name = Path(str(name)).stem if name else path.stem
    return name if name in PROFILES else None


def gpu_of(cfg: Config, config_path: str | Path | None) -> tuple[Optional[str], int]:
    """(the GPU_MEMORY_MIB key or "cpu" the config is written for, or None; the GPUs its profile
    launches, 1 without one): `train.gpu` first, else the hardware profile's.

    Raises:
        ConfigError: train.gpu names no known GPU."""
    profile = profile_of(config_path) if config_path else None
    gpu, world = PROFILES.get(profile, (None, 1))
    if cfg.train.gpu is not None:
        if cfg.train.gpu not in GPU_MEMORY_MIB:
            raise ConfigError(f"train.gpu={cfg.train.gpu!r} is not a known GPU: one of {', '.join(GPU_MEMORY_MIB)} "
                              f"(or leave it null and pass --gpu-mem-gb G to python -m dsmoe.estimate)")
        gpu = cfg.train.gpu
    return gpu, world


def memory_budget(gpu: Optional[str] = None, gpu_mem_gb: Optional[float] = None) -> Optional[tuple[float, str]]:
    """(usable bytes after the headroom, a description), or None when unknown."""
    if gpu_mem_gb is not None:
        total, what = gpu_mem_gb * GiB, f"GPU {gpu_mem_gb:g} GiB"
    elif gpu == "cpu":
        import psutil

        total, what = float(psutil.virtual_memory().total), "host RAM"
    elif gpu in GPU_MEMORY_MIB:
        total, what = GPU_MEMORY_MIB[gpu] * 2 ** 20, f"{gpu} {GPU_MEMORY_MIB[gpu] / 1024:.1f} GiB"
    else:
        return None
    return total * (1 - HEADROOM), what


def gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def with_sections(cfg: Config, **sections) -> Config:
    """A copy of cfg with some fields of some sections replaced (validated)."""
    from dsmoe.config import validate

    out = dataclasses.replace(cfg, **{s: dataclasses.replace(getattr(cfg, s), **f) for s, f in sections.items()})
    validate(out)
    return out


def suggest(cfg: Config, world: int, ep: int, device: str, budget: float) -> list[str]:
    """Changes that bring the peak under `budget`, cheapest first."""
    t, p, E = cfg.train, cfg.parallel, cfg.moe.n_routed_experts
    out = []

    def fits(c: Config, e: int = ep) -> Optional[dict]:
        est = estimate_memory(c, world=max(world, e), ep=e, device=device)
        return est if est["total"] <= budget else None

    policies = [p.activation_checkpointing] + (["full"] if p.activation_checkpointing != "full" else [])
    if p.activation_checkpointing != "full":
        est = fits(with_sections(cfg, parallel={"activation_checkpointing": "full"}))
        if est:
            out.append(f"activation checkpointing: --parallel.activation_checkpointing=full ({gib(est['total'])})")
    for policy in policies:
        for mb in range(t.micro_batch - 1, 0, -1):
            c = with_sections(cfg, train={"micro_batch": mb}, parallel={"activation_checkpointing": policy})
            est = fits(c)
            if est:
                seqs = t.micro_batch * t.grad_accum
                accum = (f" --train.grad_accum={seqs // mb}" if seqs % mb == 0 and seqs // mb != t.grad_accum
                         else "")
                same = ", same tokens per step" if accum else ""
                ac = "" if policy == p.activation_checkpointing else f" --parallel.activation_checkpointing={policy}"
                out.append(f"smaller micro-batch: --train.micro_batch={mb}{accum}{ac} ({gib(est['total'])}{same})")
                break
        if out and out[-1].startswith("smaller"):
            break
    if E:
        smallest = with_sections(cfg, train={"micro_batch": 1}, parallel={"activation_checkpointing": "full"})
        candidates = [d for d in range(ep + 1, E + 1) if E % d == 0]
        as_is = next(((e, est) for e in candidates if (est := fits(with_sections(cfg, parallel={"ep": e}), e))), None)
        least = next(((e, est) for e in candidates if (est := fits(smallest, e))), None)
        for found, how in ((as_is, ""), (least, " with micro_batch 1 and full checkpointing")):
            if found and (found is as_is or as_is is None or found[0] < as_is[0]):
                e, est = found
                out.append(f"expert parallelism: --parallel.ep {e} on a multiple of {e} GPUs (each holds "
                           f"{E // e} of {E} experts{how}; {gib(est['total'])})")
    est = estimate_memory(cfg, world=world, ep=ep, device=device)
    if world > 1 and p.dp != "fsdp":
        sharded = estimate_memory(with_sections(cfg, parallel={"dp": "fsdp"}), world=world, ep=ep, device=device)
        out.append(f"sharding over {world} GPUs: launch/train_fsdp.py (--parallel.dp=fsdp): parameters + gradients "
                   f"+ AdamW state {gib(est['persistent'])} -> {gib(sharded['persistent'])} per GPU "
                   f"({gib(sharded['total'])} peak{'' if sharded['total'] <= budget else ', still too much'})")
    elif est["persistent"] > budget:
        out.append(f"the training state alone ({gib(est['persistent'])} of weights, gradients and AdamW moments) "
                   f"exceeds the budget: use more GPUs with --parallel.ep, or a smaller model")
    return out


def device_margin_warning(cfg: Config, world: int, ep: int, device) -> Optional[str]:
    """On a CUDA device: a warning naming the fixes when the estimated peak leaves less than HEADROOM of
    the GPU's memory free; None when the margin is wide enough (or off CUDA).

    What this process can use is the free memory (`torch.cuda.mem_get_info`) plus what its allocator
    already reserved (the model and optimizer state, counted in the estimate): another process on the
    same GPU, or a smaller card than the profile's, shows up here. The estimate counts allocated bytes;
    the allocator's fragmentation and the CUDA context need the headroom."""
    import torch

    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    usable = free + torch.cuda.memory_reserved(device)
    est = estimate_memory(cfg, world=world, ep=ep, device="cuda")
    if usable - est["total"] >= HEADROOM * total:
        return None
    fixes = suggest(cfg, world, ep, "cuda", usable - HEADROOM * total)
    return (f"estimated peak {gib(est['total'])} leaves {gib(max(usable - est['total'], 0))} of {gib(usable)} usable "
            f"on {torch.cuda.get_device_name(device)} (under {HEADROOM:.0%} of its {gib(total)}): out-of-memory "
            f"errors are likely. Fixes: " + ("; ".join(fixes) if fixes else "a GPU with more memory, or more GPUs"))


def format_estimate(est: dict, title: str = "", budget: Optional[tuple[float, str]] = None):
    """A rich Table of the estimate (one rank)."""
    from rich.table import Table

    from dsmoe.tools.model import fmt_count

    prec = "fp32" if est["precision_bytes"] == 4 else "bf16/fp16 autocast"
    table = Table(title=f"{title}: {est['device']}, {prec}, world {est['world']}, ep {est['ep']}, "
                        f"{est['tokens']:,} tokens per micro-batch")
    table.add_column("per rank")
    table.add_column("GiB", justify="right")
    table.add_column("bytes", justify="right")
    table.add_column("note")
    n = est["n_params"]
    rows = [
        ("parameters", est["params"], f"{fmt_count(n)}, fp32 master" + (", FSDP shard" if est["fsdp_gathered"] else "")),
        ("gradients", est["grads"], "fp32" + (", unsharded between micro-steps" if est["grads_unsharded"] else "")
         + (", + DDP buckets beside the accumulating ones" if est["grads_beside_buckets"] else "")),
        ("optimizer state", est["optimizer"], "AdamW 2 x fp32"),
        ("autocast weight copies", est["weight_casts"], "16-bit matmul weights held at the peak"),
        ("FSDP gathered units", est["fsdp_gathered"], "root + blocks unsharded for compute"),
        (f"activations ({est['policy']})", est["activations"], "saved for backward (+ a recomputed block)"),
        ("loss (chunked logits)", est["logits"], "a chunk of logits + the head's gradients"),
        ("activations (no ckpt)", est["activations_none"], "for comparison"),
        ("activations (full ckpt)", est["activations_full"], "for comparison: block inputs + 1 block"),
    ]
    for name, b, note in rows:
        table.add_row(name, f"{b / GiB:.2f}", f"{b:,}", note)
    table.add_row(f"peak, checkpointing {est['policy']}", f"{est['total'] / GiB:.2f}", f"{est['total']:,}",
                  f"in the {est['peak_at']}", style="bold")
    if budget is not None:
        table.add_row("usable memory", f"{budget[0] / GiB:.2f}", f"{int(budget[0]):,}",
                      f"{budget[1]} - {HEADROOM:.0%}")
    return table


def verdict(est: dict, budget: Optional[tuple[float, str]]) -> tuple[Optional[bool], str]:
    """(True fits / False does not / None unknown, the line that says so)."""
    if budget is None:
        return None, ("fits: unknown: no GPU memory known for this config: set train.gpu (one of "
                      f"{', '.join(GPU_MEMORY_MIB)}) in the run file, name a configs/hardware profile, or pass "
                      "--gpu-mem-gb G to python -m dsmoe.estimate")
    usable, what = budget
    if est["total"] <= usable:
        return True, f"fits: {gib(est['total'])} of {gib(usable)} usable on {what} ({est['total'] / usable:.0%})"
    return False, f"does not fit: {gib(est['total'])} > {gib(usable)} usable on {what}"
