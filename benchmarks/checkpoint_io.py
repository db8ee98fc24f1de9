"""Checkpoint I/O at scale, measured on live gloo processes:

1. save: how long `Checkpoints.save()` holds training at world 2 (FSDP2), for a sharded directory
   written synchronously, the same written asynchronously (DCP async_save: training waits for a host
   copy only), and one file (rank 0 gathers and writes); and when each is committed.
2. resume: peak host memory per rank while world 4 resumes one file (FSDP2, and DDP with ep 4), against
   the file's size, beside every rank torch.load-ing the whole file without mmap.
3. start-up: peak host RSS per rank once the Trainer is built, for an expert-heavy model at world 4,
   ep 4 vs world 1 (meta-device construction: each rank materialises only what it holds). Goal <= 0.35x.

    python benchmarks/checkpoint_io.py            # 0.5 GB state; a 4.3 GB start-up model (minutes)
    python benchmarks/checkpoint_io.py --quick    # 76 MB state; a 0.6 GB start-up model (make bench)

Memory is read from /proc/self/status (dsmoe.metrics.host_memory): peak RSS is the kernel's high-water
mark; `private` is anonymous memory (what a rank allocated), `mapped` file pages (a memory-mapped
checkpoint: page cache, shared by a node's ranks). Table with rich; JSON to
benchmarks/results/checkpoint_io[-quick]-<device>-<date>.json.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.common import print_table, write_results  # noqa: E402
from tests.distributed import run_workers  # noqa: E402

MiB = 2 ** 20
GOAL_STARTUP = 0.35  # world 4, ep 4 peak RSS per rank at most this x world 1's
GOAL_RESUME = 0.5  # private memory a world-4 rank adds on a resume, at most this x the file
GOAL_ASYNC = 0.5  # an asynchronous save blocks training at most this x a synchronous one
BASE = ["--train.seq_len=32", "--train.micro_batch=2", "--train.grad_accum=1", "--train.eval_every=0",
        "--train.sample_every=0", "--checkpoint.every=0", "--log.rich=off", "--train.device=cpu",
        "--data.tokenizer=byte", "--model.n_heads=2", "--attention.kv_lora_rank=32",
        "--attention.qk_nope_head_dim=16", "--attention.qk_rope_head_dim=8", "--attention.v_head_dim=16"]
STATE = {  # the model whose checkpoints are saved and resumed
    True: ["--model.d_model=256", "--model.ffn_hidden=1024", "--moe.expert_hidden=256", "--moe.n_routed_experts=8",
           "--model.n_layers=4"],
    False: ["--model.d_model=512", "--model.ffn_hidden=2048", "--moe.expert_hidden=1024", "--moe.n_routed_experts=8",
            "--model.n_layers=4"]}
EXPERT_HEAVY = {  # routed experts ~95% of the parameters
    True: ["--model.d_model=256", "--model.ffn_hidden=1024", "--moe.expert_hidden=1024", "--moe.n_routed_experts=64",
           "--model.n_layers=4"],
    False: ["--model.d_model=512", "--model.ffn_hidden=2048", "--moe.expert_hidden=1536", "--moe.n_routed_experts=64",
            "--model.n_layers=8"]}
SAVES = {"sharded": ["--checkpoint.format=sharded"],
         "sharded async": ["--checkpoint.format=sharded", "--checkpoint.async_save=true"],
         "file": ["--checkpoint.format=file"]}


def config(run_dir, cache, *overrides):
    from dsmoe.config import CONFIG_ROOT, load_config

    return load_config(CONFIG_ROOT / "models" / "tiny.yaml",
                       BASE + [f"--run.dir={run_dir}", f"--data.cache_dir={cache}", *overrides])


def save_worker(rank, world, root, cache, model, repeats):
    """Per save kind: seconds save() held this rank, and until the checkpoint was committed."""
    from dsmoe.train.trainer import Trainer

    out = {}
    for kind, flags in SAVES.items():
        t = Trainer(config(Path(root) / kind.replace(" ", "-"), cache, "--parallel.dp=fsdp", *model, *flags))
        t.train_step()
        blocked, committed = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            path = t.checkpoints.save()
            blocked.append(time.perf_counter() - t0)
            t.checkpoints.wait()
            committed.append(time.perf_counter() - t0)
        out[kind] = {"blocked_s": statistics.median(blocked), "committed_s": statistics.median(committed),
                     "path": str(path)}
        del t
    return out


def resume_worker(rank, world, root, cache, model, path):
    """Host memory a rank adds while resuming the file `path`, per layout; then a whole torch.load of it."""
    import torch

    from dsmoe.metrics.host_memory import HostMemory
    from dsmoe.train.trainer import Trainer

    out = {}
    for layout, flags in {"FSDP2": ["--parallel.dp=fsdp"], "DDP, ep 4": ["--parallel.ep=4"]}.items():
        t = Trainer(config(Path(root) / f"resume-{flags[0][2:].replace('=', '-')}", cache, *model, *flags))
        t.sharded.init_optimizer_state()  # allocated like the model, before the resume writes into it
        with HostMemory() as mem:
            t.checkpoints.restore(Path(path))
        out[layout] = {"peak_rss": mem.peak["rss"], "private": mem.grew("anon"), "mapped": mem.grew("file")}
        del t
    with HostMemory() as mem:
        state = torch.load(path, map_location="cpu", weights_only=True)
    out["torch.load, no mmap"] = {"peak_rss": mem.peak["rss"], "private": mem.grew("anon"), "mapped": mem.grew("file")}
    del state
    return out


def startup_worker(rank, world, root, cache, model):
    """Peak RSS of this rank from before the Trainer is built until it is."""
    from dsmoe.metrics.host_memory import host_memory, reset_peak
    from dsmoe.train.trainer import Trainer

    reset_peak()
    before = host_memory()["rss"]
    t = Trainer(config(Path(root) / f"startup-{world}", cache, *model, f"--parallel.ep={world}"))
    n_params = sum(p.numel() for p in t.model.parameters())
    return {"before": before, "peak": host_memory()["hwm"], "local_params": n_params}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the small presets (make bench)")
    p.add_argument("--repeats", type=int, default=3, help="saves per kind (median)")
    args = p.parse_args(argv)
    q = args.quick
    with tempfile.TemporaryDirectory(prefix="dsmoe-ckpt-io-") as root:
        cache = str(Path(root) / "data")
        saves = run_workers(save_worker, 2, (root, cache, STATE[q], args.repeats), timeout=3600)
        file = saves[0]["file"]["path"]
        file_bytes = Path(file).stat().st_size
        resumes = run_workers(resume_worker, 4, (root, cache, STATE[q], file), timeout=3600)
        one = run_workers(startup_worker, 1, (root, cache, EXPERT_HEAVY[q]), timeout=3600)[0]
        four = run_workers(startup_worker, 4, (root, cache, EXPERT_HEAVY[q]), timeout=3600)

    save_rows = [{"kind": k, "world": 2, "dp": "fsdp", "blocked_s": max(r[k]["blocked_s"] for r in saves),
                  "committed_s": max(r[k]["committed_s"] for r in saves)} for k in SAVES]
    resume_rows = [{"layout": layout, "world": 4, "file_bytes": file_bytes,
                    "peak_rss_max": max(r[layout]["peak_rss"] for r in resumes),
                    "private_max": max(r[layout]["private"] for r in resumes),
                    "mapped_max": max(r[layout]["mapped"] for r in resumes)} for layout in resumes[0]]
    for r in resume_rows:
        r["private_of_file"] = r["private_max"] / file_bytes
        r["mapped_of_file"] = r["mapped_max"] / file_bytes
    peak4 = max(r["peak"] for r in four)
    startup = {"world1_peak": one["peak"], "world4_ep4_peak_max": peak4, "ratio": peak4 / one["peak"],
               "world1_params": one["local_params"], "world4_ep4_params_max": max(r["local_params"] for r in four),
               "ratio_above_start": (peak4 - max(r["before"] for r in four)) / (one["peak"] - one["before"]),
               "process_before_trainer": one["before"]}
    blocked = {r["kind"]: r["blocked_s"] for r in save_rows}
    fsdp = next(r for r in resume_rows if r["layout"] == "FSDP2")
    goals = [{"goal": "async save blocks training <= 0.5x sync", "value": blocked["sharded async"] / blocked["sharded"],
              "target": GOAL_ASYNC, "met": blocked["sharded async"] / blocked["sharded"] <= GOAL_ASYNC},
             {"goal": "resume from one file: private memory per rank / file (world 4, FSDP2)",
              "value": fsdp["private_of_file"], "target": GOAL_RESUME, "met": fsdp["private_of_file"] <= GOAL_RESUME},
             {"goal": "start-up peak RSS per rank, world 4 ep 4 / world 1", "value": startup["ratio"],
              "target": GOAL_STARTUP, "met": None if q else startup["ratio"] <= GOAL_STARTUP}]

    print_table("Checkpoint save: seconds training is held (world 2, FSDP2, gloo)", ["kind", "blocked s", "committed s"],
                [[r["kind"], f"{r['blocked_s']:.3f}", f"{r['committed_s']:.3f}"] for r in save_rows],
                caption=f"state {file_bytes / MiB:,.0f} MiB, median of {args.repeats}")
    print_table(f"Resume from one file ({file_bytes / MiB:,.0f} MiB) at world 4: most any rank adds",
                ["layout", "peak RSS MiB", "private MiB", "mapped MiB", "private / file", "mapped / file"],
                [[r["layout"], f"{r['peak_rss_max'] / MiB:,.0f}", f"{r['private_max'] / MiB:,.1f}",
                  f"{r['mapped_max'] / MiB:,.1f}", f"{r['private_of_file']:.3f}", f"{r['mapped_of_file']:.3f}"]
                 for r in resume_rows])
    print_table("Start-up peak RSS per rank, expert-heavy model", ["layout", "parameters per rank", "peak RSS MiB"],
                [["world 1", f"{startup['world1_params']:,}", f"{one['peak'] / MiB:,.0f}"],
                 ["world 4, ep 4 (max rank)", f"{startup['world4_ep4_params_max']:,}", f"{peak4 / MiB:,.0f}"]],
                caption=f"ratio {startup['ratio']:.3f} (goal <= {GOAL_STARTUP}); above the process before the "
                        f"Trainer ({one['before'] / MiB:,.0f} MiB): {startup['ratio_above_start']:.3f}")
    name = "checkpoint_io-quick" if q else "checkpoint_io"
    path = write_results(name, {"quick": q, "saves": save_rows, "resume": resume_rows, "startup": startup,
                                "goals": goals, "device_type": "cpu"})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
