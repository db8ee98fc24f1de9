"""Training throughput of the tiny preset on CPU per parallel layout: one process, DDP, expert
parallelism and FSDP2 over 2 processes, at the same global batch.

    python benchmarks/train_throughput.py            # 30 steps per layout
    python benchmarks/train_throughput.py --quick    # 12 steps per layout (make bench, CI)

Each layout is a real `launch/train.py` / `torchrun ... launch/train_ddp.py` run of
configs/runs/tiny-shakespeare.yaml (the tiny preset, byte tokenizer, seq 128) with evaluation,
sampling and the final checkpoint off and a log row every step, into a temporary run directory:

- single: `python launch/train.py`, micro_batch 2b;
- ddp: `torchrun --standalone --nproc_per_node 2 launch/train_ddp.py`, micro_batch b per rank;
- ep: the same with `--parallel.ep=2` (the routed experts split over the 2 ranks);
- fsdp: the same with `--parallel.dp=fsdp` (FSDP2: parameters, gradients and moments sharded).

OMP_NUM_THREADS=1 per rank under torchrun. From RUN_DIR/metrics.jsonl (rank 0's rows) it reports the
median tokens/s over the steps after the first `--skip` warm-up steps, the median phase split
(data / forward / backward / optimizer ms) and RSS; the persistent memory per rank (fp32 params +
grads + AdamW moments) comes from `dsmoe.tools.memory.estimate_memory(cfg, world, ep, "cpu")`
(benchmarks/memory_layouts.py measures it). CPU MFU: the achieved training FLOP/s (tokens/s x
`dsmoe.tools.model.breakdown(cfg)["flops_per_token"]`) over this machine's fp32 matmul peak measured by
`dsmoe.metrics.throughput.measure_peak_tflops` with the threads the layout runs (the default count for
the single process; one thread times the world size under torchrun). Table with rich; JSON to
benchmarks/results/train_throughput-<device>-<date>.json (train_throughput-quick-... for --quick).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.common import device_name, print_table, write_results  # noqa: E402
from dsmoe.config import load_config  # noqa: E402
from dsmoe.metrics.throughput import measure_peak_tflops  # noqa: E402
from dsmoe.tools.model import breakdown  # noqa: E402
from dsmoe.tools.memory import estimate_memory  # noqa: E402

CONFIG = REPO_ROOT / "configs" / "runs" / "tiny-shakespeare.yaml"
PHASES = ("data_ms", "forward_ms", "backward_ms", "optimizer_ms")
LAYOUTS = (  # name, world, ep, data parallelism
    ("single", 1, 1, "ddp"),
    ("ddp", 2, 1, "ddp"),
    ("ep", 2, 2, "ddp"),
    ("fsdp", 2, 1, "fsdp"),
)
MiB = 2 ** 20


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=None, help="training steps per layout (default 30; 12 with --quick)")
    p.add_argument("--skip", type=int, default=2, help="first steps left out of the medians (warm-up)")
    p.add_argument("--micro-batch", type=int, default=8,
                   help="b: sequences per rank at world 2; the single process runs 2b (same global batch)")
    p.add_argument("--layouts", nargs="+", choices=[name for name, *_ in LAYOUTS],
                   default=[name for name, *_ in LAYOUTS])
    p.add_argument("--timeout", type=int, default=300, help="seconds per layout run")
    p.add_argument("--quick", action="store_true", help="12 steps per layout")
    p.add_argument("--no-save", action="store_true", help="print the table only, write no JSON")
    args = p.parse_args(argv)
    args.steps = args.steps or (12 if args.quick else 30)
    if args.steps <= args.skip:
        p.error(f"--steps ({args.steps}) must exceed --skip ({args.skip})")
    return args


def overrides(micro_batch: int, steps: int, ep: int, dp: str, run_dir: Path) -> list[str]:
    out = [f"--train.steps={steps}", f"--train.micro_batch={micro_batch}", "--train.grad_accum=1",
           "--train.eval_every=0", "--train.sample_every=0", "--train.log_every=1",
           "--train.device=cpu", "--checkpoint.save_final=false", "--log.rich=off", f"--run.dir={run_dir}"]
    if ep > 1:
        out.append(f"--parallel.ep={ep}")
    if dp != "ddp":
        out.append(f"--parallel.dp={dp}")
    return out


def run_layout(name: str, world: int, ep: int, dp: str, args, tmp: Path) -> dict:
    micro_batch = args.micro_batch * 2 // world
    run_dir = tmp / name
    ov = overrides(micro_batch, args.steps, ep, dp, run_dir)
    env = dict(os.environ)
    if world == 1:
        cmd = [sys.executable, str(REPO_ROOT / "launch" / "train.py")]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
               str(REPO_ROOT / "launch" / "train_ddp.py")]
        env["OMP_NUM_THREADS"] = "1"
    cmd += ["--config", str(CONFIG), *ov]
    cfg = load_config(CONFIG, ov)
    mem = estimate_memory(cfg, world, ep, device="cpu")
    row = {"layout": name, "world": world, "ep": ep, "dp": dp, "micro_batch_per_rank": micro_batch,
           "global_batch": micro_batch * world, "seq_len": cfg.train.seq_len,
           "tokens_per_step": micro_batch * world * cfg.train.seq_len, "steps": args.steps, "skip": args.skip,
           "params_bytes": mem["params"], "grads_bytes": mem["grads"], "optimizer_bytes": mem["optimizer"],
           "persistent_bytes": mem["params"] + mem["grads"] + mem["optimizer"], "n_params_per_rank": mem["n_params"],
           "command": " ".join(cmd)}
    print(f"train_throughput: {name} (world {world}, ep {ep}, micro_batch {micro_batch}) ...", flush=True)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
        rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-3000:]
    except subprocess.TimeoutExpired as e:
        rc, tail = "timeout", str(e)
    row["wall_s"] = round(time.perf_counter() - t0, 2)
    metrics = run_dir / "metrics.jsonl"
    recs = []
    if metrics.exists():
        recs = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    timed = [r for r in recs if r.get("step", 0) > args.skip]
    if rc != 0 or not timed:
        row.update(status="failed", returncode=rc, error_tail=tail)
        print(f"train_throughput: {name} FAILED (rc {rc})\n{tail}", file=sys.stderr)
        return row
    row["status"] = "ok"
    row["timed_steps"] = len(timed)
    row["tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in timed)
    row["tokens_per_s_max"] = max(r["tokens_per_s"] for r in timed)
    row["step_time_ms"] = statistics.median(r["step_time_s"] for r in timed) * 1e3
    for ph in PHASES:
        vals = [r[ph] for r in timed if r.get(ph) is not None]
        row[ph] = statistics.median(vals) if vals else None
    rss = [r["rss_gb"] for r in timed if r.get("rss_gb") is not None]
    row["rss_gb_rank0"] = max(rss) if rss else None
    row["final_loss"] = timed[-1].get("loss")
    return row


def fmt(x, spec=",.1f"):
    return "-" if x is None else format(x, spec)


def main(argv=None) -> int:
    args = parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="dsmoe-train-throughput-") as tmp:
        for name, world, ep, dp in LAYOUTS:
            if name in args.layouts:
                rows.append(run_layout(name, world, ep, dp, args, Path(tmp)))
    base = next((r["tokens_per_s"] for r in rows if r["layout"] == "single" and r.get("status") == "ok"), None)
    # fp32 matmul peaks at each layout's thread count: torch's default in one process, 1 per torchrun rank
    peaks = {"default_threads": measure_peak_tflops(torch.float32),
             "one_thread": measure_peak_tflops(torch.float32, threads=1)}
    flops_per_token = breakdown(load_config(CONFIG))["flops_per_token"]
    for r in rows:
        if base and r.get("status") == "ok":
            r["speedup_vs_single"] = r["tokens_per_s"] / base
        if r.get("status") == "ok":
            peak = peaks["default_threads"] if r["world"] == 1 else peaks["one_thread"] * r["world"]
            r.update(flops_per_token=flops_per_token, achieved_tflops=r["tokens_per_s"] * flops_per_token / 1e12,
                     cpu_peak_tflops=peak)
            r["cpu_mfu"] = r["achieved_tflops"] / peak
    table = []
    for r in rows:
        if r.get("status") != "ok":
            table.append([r["layout"], r["world"], r["ep"], "-", r["status"], "", "", "", "", "", "", "", ""])
            continue
        table.append([r["layout"], r["world"], r["ep"], f"{r['global_batch']}x{r['seq_len']}",
                      fmt(r["tokens_per_s"], ",.0f"), fmt(r.get("speedup_vs_single"), ".2f"),
                      fmt(r.get("cpu_mfu"), ".1%"), fmt(r["step_time_ms"]), fmt(r["data_ms"]), fmt(r["forward_ms"]),
                      fmt(r["backward_ms"]),
                      fmt(r["optimizer_ms"]), fmt(r["persistent_bytes"] / MiB, ".2f")])
    print_table(f"Training throughput, tiny preset, CPU ({device_name('cpu')}), {args.steps} steps, "
                f"median after {args.skip} warm-up",
                ["layout", "world", "ep", "batch", "tokens/s", "speed-up vs single", "CPU MFU", "step ms", "data ms", "fwd ms",
                 "bwd ms", "opt ms", "persist MiB/rank"], table,
                caption="phase ms: rank 0; persistent = fp32 params + grads + AdamW moments per rank (estimate_memory); "
                        f"CPU MFU against the measured fp32 matmul peak: {peaks['default_threads'] * 1e3:.1f} GFLOP/s "
                        f"({torch.get_num_threads()} threads), {peaks['one_thread'] * 1e3:.1f} GFLOP/s per 1-thread rank")
    payload = {"device_type": "cpu", "quick": args.quick, "config": str(CONFIG.relative_to(REPO_ROOT)),
               "steps": args.steps, "skip": args.skip, "micro_batch_b": args.micro_batch, "rows": rows,
               "cpu_peak_tflops": peaks, "torch_threads": torch.get_num_threads(),
               "all_ok": all(r.get("status") == "ok" for r in rows)}
    if not args.no_save:
        path = write_results("train_throughput-quick" if args.quick else "train_throughput", payload, device="cpu")
        print(f"wrote {path.relative_to(REPO_ROOT)}")
    return 0 if payload["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
