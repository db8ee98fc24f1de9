"""Will this config fit? Per-GPU training memory, from the model built on the meta device.

    python -m dsmoe.estimate configs/hardware/rtx4060.yaml
    python -m dsmoe.estimate configs/hardware/h100_multinode.yaml --world 16 --ep 8
    python -m dsmoe.estimate configs/models/v3-mini.yaml --gpu-mem-gb 80 --train.micro_batch=4
    python -m dsmoe.estimate configs/runs/v3-mini-h100-fsdp.yaml --simulate --world 64
    python -m dsmoe.estimate CONFIG [--world N] [--ep N] [--gpu-mem-gb G] [--device cpu|cuda] [--simulate]
                             [--section.field=value ...]

Prints parameters, gradients, AdamW state, autocast weight copies, activations with and without
activation checkpointing, the chunked loss's workspace, and the peak for the config's
checkpointing policy; then whether it fits the GPU with 10% headroom (CUDA context, allocator
fragmentation) and, when it does not, the changes that would make it fit. The GPU's memory comes
from --gpu-mem-gb, the config's `train.gpu` or the hardware profile's name (GPU_MEMORY_MIB); with none
of them the verdict is "fits: unknown". Exit status: 0 fits (or unknown: the report printed), 1 does
not fit, 2 config error. How each number is derived: dsmoe/tools/memory.py.

--simulate rehearses one training step of the config as rank 0 of `--world` ranks on this CPU, with
fake tensors and a fake process group (dsmoe/train/simulate.py, a minute or two for a 5.7B model),
and prints the measured peak per category beside the analytic estimate; the verdict then uses the
simulated peak.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


from dsmoe.config import Config, ConfigError, load_config
from dsmoe.tools.fit import format_estimate, gib, gpu_of, memory_budget, suggest, verdict, with_sections
from dsmoe.tools.memory import GiB, estimate_memory

__all__ = ["main"]

def rehearse(cfg: Config, world: int, ep: int) -> tuple[dict, dict, dict]:
    """The simulated step (dsmoe.train.simulate) and the analytic estimate of the same config and
    precision, with CPU kernels (what the simulation runs) and CUDA ones."""
    from dsmoe.train.simulate import simulate

    sim = simulate(cfg, world, ep)
    same = with_sections(cfg, train={"precision": sim["precision"]})
    return sim, estimate_memory(same, world, ep, "cpu"), estimate_memory(same, world, ep, "cuda")


def estimate_rows(est: dict) -> dict:
    """The estimate in the simulation's categories (dsmoe.metrics.memory.StepMemory.CATEGORIES)."""
    return {"parameters": est["params"], "gathered": est["fsdp_gathered"], "gradients": est["grads"],
            "optimizer": est["optimizer"], "activations": est["weight_casts"] + est["activations"] + est["logits"],
            "buffers": 0, "total": est["total"]}


def format_simulation(sim: dict, est_cpu: dict, est_cuda: dict, title: str = ""):
    """A rich Table: the simulated peak per category beside the two analytic estimates."""
    from rich.table import Table

    steps = " and ".join(map(str, sim["micro_steps"]))
    layout = "one process" if sim["world"] == 1 else f"{'FSDP2' if sim['dp'] == 'fsdp' else 'DDP'}, ep {sim['ep']}"
    table = Table(title=f"{title}: simulated step, rank 0 of world {sim['world']} ({layout}), {sim['precision']}, "
                        f"micro-steps {steps}; {sim['seconds']:.0f} s")
    for col in ("per rank at the peak", "simulated GiB", "estimate GiB (CPU kernels)", "sim / est",
                "estimate GiB (CUDA)"):
        table.add_column(col, justify="left" if col.startswith("per") else "right")
    cpu, cuda = estimate_rows(est_cpu), estimate_rows(est_cuda)
    for key, value in sim["peak"].items():
        ratio = f"{value / cpu[key]:.2f}" if cpu[key] else ""
        table.add_row(key if key != "total" else "peak", f"{value / GiB:.2f}", f"{cpu[key] / GiB:.2f}", ratio,
                      f"{cuda[key] / GiB:.2f}", style="bold" if key == "total" else None)
    return table


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m dsmoe.estimate", description=__doc__.split("\n")[0],
                                     epilog="any config field: --section.field=value")
    parser.add_argument("config")
    parser.add_argument("--world", type=int, default=None, help="GPUs in the job (default: the profile's)")
    parser.add_argument("--ep", type=int, default=None, help="expert-parallel size (default: parallel.ep)")
    parser.add_argument("--gpu-mem-gb", type=float, default=None, help="GPU memory in GiB (default: the profile's GPU)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="default: cpu when train.device is cpu, else cuda")
    parser.add_argument("--simulate", action="store_true",
                        help="rehearse one training step as rank 0 of --world ranks (fake tensors, fake process group)")
    args, rest = parser.parse_known_args(argv)
    console = Console()
    try:
        cfg = load_config(args.config, rest)
        gpu, default_world = gpu_of(cfg, args.config)
    except ConfigError as e:
        console.print(f"[red]config error:[/red] {e}")
        return 2
    ep = args.ep or cfg.parallel.ep
    world = args.world or max(default_world, ep)
    device = args.device or ("cpu" if cfg.train.device == "cpu" or gpu == "cpu" else "cuda")
    try:
        est = estimate_memory(cfg, world=world, ep=ep, device=device)
    except ValueError as e:
        console.print(f"[red]error:[/red] {e}")
        return 2
    budget = memory_budget(gpu, args.gpu_mem_gb)
    title = f"{cfg.model.name} @ {Path(args.config).stem}"
    if args.simulate:
        try:
            sim, est_cpu, est_cuda = rehearse(cfg, world, ep)
        except ValueError as e:
            console.print(f"[red]error:[/red] {e}")
            return 2
        console.print(format_simulation(sim, est_cpu, est_cuda, title))
        plan = sim["checkpoint"]
        console.print(f"checkpoint (format {plan['format']}): a sharded save writes this rank's "
                      f"{gib(plan['rank_bytes'])} ({plan['tensors']} tensors in DCP's local plan); one file "
                      f"holds {gib(plan['whole_bytes'])}, gathered on rank 0", markup=False)
        for line in sim["assumptions"]:
            console.print(f"  assumed: {line}", markup=False)
        est = {**est, "total": sim["peak"]["total"]}
    else:
        console.print(format_estimate(est, title, budget))
    ok, text = verdict(est, budget)
    console.print(f"[{ {True: 'green', False: 'red', None: 'yellow'}[ok] }]{text}[/]")
    if ok is False:
        fixes = suggest(cfg, world, ep, device, budget[0])
        console.print("suggestions:" if fixes else "no single change found that fits; use more GPUs or a smaller model")
        for fix in fixes:
            console.print(f"  - {fix}", markup=False)
    return 1 if ok is False else 0


if __name__ == "__main__":
    sys.exit(main())
