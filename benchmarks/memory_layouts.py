"""Persistent memory per rank (parameters + gradients + AdamW state) under DDP and FSDP2, at world 2
and 4, measured on live gloo processes.

    python benchmarks/memory_layouts.py            # tiny and moe-512x8 presets
    python benchmarks/memory_layouts.py --quick    # the same (each run is one step); make bench

Each rank builds the Trainer, takes one optimizer step (AdamW state exists), then runs one more
forward/backward so the gradients exist, and counts the bytes of the storages behind its parameters,
gradients and optimizer state, each storage once (DDP's gradients are views into its buckets; FSDP2's
local shards sit in padded storages, and the padding counts). Goal: FSDP2 at most 1.1 x DDP / world.
Table with rich; JSON to benchmarks/results/memory_layouts-<device>-<date>.json.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from benchmarks.common import device_name, print_table, write_results  # noqa: E402

PRESETS = ("tiny", "moe-512x8")
WORLDS = (2, 4)
GOAL = 1.1  # FSDP2 bytes at most this x DDP bytes / world
MiB = 2 ** 20


def storage_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        st = t.untyped_storage()
        if st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            total += st.nbytes()
    return total


def worker(rank: int, world: int, port: int, preset: str, dp: str, run_dir: str, queue) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from dsmoe.config import CONFIG_ROOT, load_config
    from dsmoe.parallel.fsdp import local
    from dsmoe.parallel.mesh import shutdown
    from dsmoe.train.trainer import Trainer

    cfg = load_config(CONFIG_ROOT / "models" / f"{preset}.yaml", [
        "--train.seq_len=64", "--train.micro_batch=1", "--train.grad_accum=1", "--train.device=cpu",
        "--data.tokenizer=byte", "--train.eval_every=0", "--train.sample_every=0", "--log.rich=off",
        f"--parallel.dp={dp}", f"--run.dir={run_dir}"])
    trainer = Trainer(cfg)
    try:
        trainer.train_step()
        x, y = trainer.batch_at(trainer.progress.samples)
        trainer.wrapped(x, y).loss.backward()
        params = list(trainer.model.parameters())
        row = {"params": storage_bytes(local(p.detach()) for p in params),
               "grads": storage_bytes(local(p.grad) for p in params if p.grad is not None),
               "optimizer": storage_bytes(local(v) for s in trainer.optimizer.state.values() for v in s.values()
                                          if torch.is_tensor(v)),
               "n_params": sum(p.numel() for p in params)}
        row["persistent"] = row["params"] + row["grads"] + row["optimizer"]
        if rank == 0:
            queue.put(row)
    finally:
        shutdown(trainer.mesh)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(preset: str, world: int, dp: str) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="dsmoe-mem-") as tmp:
        procs = [ctx.Process(target=worker, args=(r, world, port, preset, dp, tmp, queue)) for r in range(world)]
        for proc in procs:
            proc.start()
        row = queue.get(timeout=600)
        for proc in procs:
            proc.join(timeout=60)
    return {"preset": preset, "world": world, "dp": dp, **row}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the same runs (each is a single step)")
    p.add_argument("--presets", nargs="+", default=list(PRESETS))
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    rows = []
    for preset in args.presets:
        for world in WORLDS:
            ddp = measure(preset, world, "ddp")
            fsdp = measure(preset, world, "fsdp")
            fsdp["ratio_to_ddp_over_world"] = fsdp["persistent"] / (ddp["persistent"] / world)
            rows += [ddp, fsdp]
    table = [[r["preset"], r["world"], r["dp"], f"{r['params'] / MiB:.2f}", f"{r['grads'] / MiB:.2f}",
              f"{r['optimizer'] / MiB:.2f}", f"{r['persistent'] / MiB:.2f}",
              f"{r['ratio_to_ddp_over_world']:.3f}" if "ratio_to_ddp_over_world" in r else ""] for r in rows]
    print_table(f"Persistent memory per rank (rank 0), CPU ({device_name('cpu')})",
                ["preset", "world", "dp", "params MiB", "grads MiB", "AdamW MiB", "total MiB", "FSDP / (DDP/world)"],
                table, caption=f"goal: FSDP2 <= {GOAL} x DDP / world")
    ratios = [r["ratio_to_ddp_over_world"] for r in rows if "ratio_to_ddp_over_world" in r]
    payload = {"device_type": "cpu", "quick": args.quick, "goal": GOAL, "rows": rows,
               "max_ratio": max(ratios), "goal_met": max(ratios) <= GOAL,
               "goals": [{"goal": f"FSDP2 persistent bytes <= {GOAL} x DDP / world", "worst": "all presets and worlds",
                          "value": max(ratios), "target": GOAL, "met": max(ratios) <= GOAL}]}
    print(f"FSDP2 / (DDP / world): worst {max(ratios):.3f} (goal <= {GOAL}: {'met' if payload['goal_met'] else 'NOT met'})")
    if not args.no_save:
        path = write_results("memory_layouts-quick" if args.quick else "memory_layouts", payload, device="cpu")
        print(f"wrote {path.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
