"""Forward+backward time of one MoE layer (routed experts as a per-expert loop and as a grouped GEMM)
against a dense SwiGLU FFN with the same active FLOPs.

    python benchmarks/moe_dispatch.py                          # 8192 tokens, fp32 on CPU / bf16 on CUDA
    python benchmarks/moe_dispatch.py --quick                  # 2048 tokens, few iterations (make bench, CI)
    python benchmarks/moe_dispatch.py --device cuda --dtype bf16 --tokens 16384 --iters 50
    python benchmarks/moe_dispatch.py --device cpu --threads 1 --shapes fine-grained-768x64

One `dsmoe.model.moe.MoE` layer (router + LocalDispatcher dispatch + routed experts + combine +
shared expert) runs on an input [1, tokens, d] that requires grad; the backward is
`(y * g).sum().backward()` with a fixed random g. It is timed with `moe.expert_impl` = "loop" (the
reference) and "grouped", and compared with a dense `SwiGLU(d, (top_k + n_shared) * expert_hidden)`,
which does the same active FLOPs. Shapes: the smollm2-moe-576x30 layer (d 576, 8 routed + 1 shared
experts of 1536, top-2) and a fine-grained one (d 768, 64 routed + 1 shared experts of 384, top-6).
Weights are N(0, 0.02) and the routing bias is zero, so routing is roughly balanced; the measured
max/mean expert load is reported. With --dtype bf16 the step runs under torch.autocast. The three
impls are timed round-robin (dense, loop, grouped, dense, ...) so a drifting host load hits them alike;
with --quick on CPU the loop reference is timed once (it is the slow one there).

Goals: routing overhead (MoE grouped / dense) <= 1.5 on CPU, <= 1.25 on GPU; grouped >= 3x loop on
GPU. The table is printed with rich and the numbers go to
benchmarks/results/moe_dispatch-<device>-<date>.json (moe_dispatch-quick-... for --quick, so a smoke
run never overwrites the day's full run).

Single process only for now; `main()` branches on WORLD_SIZE so a torchrun all-to-all mode can be added.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `python benchmarks/moe_dispatch.py` without installing dsmoe
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.common import device_name, print_table, time_fn, write_results  # noqa: E402
from dsmoe.config import load_config  # noqa: E402
from dsmoe.model import moe as moe_mod  # noqa: E402
from dsmoe.model.moe import MoE, SwiGLU  # noqa: E402

SHAPES = {
    "smollm2-moe-576x30": dict(d_model=576, expert_hidden=1536, n_routed_experts=8, n_shared_experts=1, top_k=2),
    "fine-grained-768x64": dict(d_model=768, expert_hidden=384, n_routed_experts=64, n_shared_experts=1, top_k=6),
}
IMPLS = ("dense", "loop", "grouped")
GOAL_OVERHEAD = {"cpu": 1.5, "cuda": 1.25}  # MoE grouped / dense, fwd+bwd
GOAL_GROUPED_SPEEDUP_GPU = 3.0  # loop / grouped, on GPU only
INIT_STD = 0.02
PRIME_TOKENS = 256  # a short first step per impl: initialises every code path cheaply
SEED = 1234


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=None, help="tokens per step (default 8192; 2048 with --quick)")
    p.add_argument("--iters", type=int, default=None,
                   help="timed steps per impl, interleaved (default: 3 on CPU, 20 on CUDA; 2 / 5 with --quick)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed full-size steps per impl first (default: 1 on CPU, 5 on CUDA; 0 / 2 with --quick)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default=None,
                   help="fp32, or bf16 autocast (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    p.add_argument("--shapes", nargs="+", choices=tuple(SHAPES), default=list(SHAPES), help="shapes to run")
    p.add_argument("--loop-iters", type=int, default=None,
                   help="timed steps of the loop reference (default: --iters; 1 with --quick on CPU, where the "
                        "fine-grained loop is tens of times slower than everything else)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU: torch intra-op threads (default: torch's choice, usually one per core)")
    p.add_argument("--quick", action="store_true",
                   help="2048 tokens, few iterations: a smoke run in well under a minute")
    p.add_argument("--no-save", action="store_true", help="print the table only, write no JSON")
    args = p.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    gpu = args.device == "cuda"
    args.dtype = args.dtype or ("bf16" if gpu else "fp32")
    defaults = {(False, False): (8192, 1, 3), (False, True): (2048, 0, 2),
                (True, False): (8192, 5, 20), (True, True): (2048, 2, 5)}[(gpu, args.quick)]
    args.tokens = args.tokens or defaults[0]
    args.warmup = defaults[1] if args.warmup is None else args.warmup
    args.iters = args.iters or defaults[2]
    args.loop_iters = min(args.iters, args.loop_iters or (1 if args.quick and not gpu else args.iters))
    return args


def make_cfg(shape: dict, impl: str, device: str):
    """A dropless MoE config with the given shape; everything else is the library default."""
    return load_config(None, {
        "model": {"name": "moe-dispatch-bench", "d_model": shape["d_model"], "init_std": INIT_STD},
        "moe": {**{k: v for k, v in shape.items() if k != "d_model"}, "expert_impl": impl,
                "capacity_factor": None, "seq_aux_loss_coef": 0.0, "z_loss_coef": 0.0},
        "train": {"device": device, "seed": SEED},
    })


def init_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """N(0, 0.02) for every parameter in registration order (so loop and grouped get equal weights)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * INIT_STD)
        if isinstance(module, MoE):
            module.router.expert_bias.zero_()  # no balancing bias: a random router is roughly balanced
    return module


def build(shape: dict, impl: str, device: torch.device) -> torch.nn.Module:
    if impl == "dense":
        hidden = (shape["top_k"] + shape["n_shared_experts"]) * shape["expert_hidden"]
        model = SwiGLU(shape["d_model"], hidden)
    else:
        model = MoE(make_cfg(shape, impl, device.type))
    return init_(model, SEED).to(device).train()


def grouped_backend(model: MoE, x: torch.Tensor, dtype: torch.dtype) -> str:
    """What the "grouped" impl really ran: grouped_mm, or the loop it falls back to."""
    experts = model.experts
    probe = x.new_empty(0, x.shape[-1], dtype=dtype)
    ok = getattr(experts, "_grouped_ok", None)
    if ok is None:
        return "unknown"
    return "grouped_mm" if ok(probe) else "loop fallback (no usable grouped_mm)"


def make_step(model: torch.nn.Module, x: torch.Tensor, g: torch.Tensor, autocast_dtype):
    """One training-like step: fresh gradients (as after zero_grad(set_to_none=True)), fwd, (y*g).sum() bwd."""
    params = list(model.parameters())

    def step():
        for p in params:
            p.grad = None
        x.grad = None
        with torch.autocast(x.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            y = model(x)
            y = y[0] if isinstance(y, tuple) else y
        (y.float() * g).sum().backward()
    return step


def bench_shape(name: str, shape: dict, args, device: torch.device) -> list[dict]:
    """Time dense, loop and grouped on the same input, interleaved round by round.

    Interleaving keeps the ratios fair when the host's load drifts (shared CI runners, laptops):
    every impl sees the same slice of time. A short step at PRIME_TOKENS first initialises each code
    path (kernels, oneDNN primitives, the grouped_mm fallback check) without costing a full step.
    """
    autocast_dtype = torch.bfloat16 if args.dtype == "bf16" else None
    compute_dtype = autocast_dtype or torch.float32
    gen = torch.Generator().manual_seed(SEED + 1)
    d = shape["d_model"]
    x = torch.randn(1, args.tokens, d, generator=gen).to(device).requires_grad_(True)
    g = torch.randn(1, args.tokens, d, generator=gen).to(device)
    x_prime = x.detach()[:, :PRIME_TOKENS].clone().requires_grad_(True)

    models, steps, rows = {}, {}, {}
    for impl in IMPLS:
        model = models[impl] = build(shape, impl, device)
        make_step(model, x_prime, g[:, :PRIME_TOKENS], autocast_dtype)()
        steps[impl] = make_step(model, x, g, autocast_dtype)
        row = rows[impl] = {"shape": name, "impl": impl, **shape, "tokens": args.tokens}
        if impl == "dense":
            row["dense_hidden"] = model.w_gate.out_features
            continue
        with torch.no_grad(), torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            _, routing = model(x)
        counts = routing.counts.float()
        row["load_max_over_mean"] = counts.max().item() / counts.mean().item()
        row["load_min_over_mean"] = counts.min().item() / counts.mean().item()
        if impl == "grouped":
            row["grouped_backend"] = grouped_backend(model, x, compute_dtype)

    times = {impl: [] for impl in IMPLS}
    peak_mb = {impl: 0.0 for impl in IMPLS}
    for impl in IMPLS:
        for _ in range(args.warmup):
            steps[impl]()
    for i in range(args.iters):
        for impl in IMPLS:
            if impl == "loop" and i >= args.loop_iters:
                continue
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                resident = torch.cuda.memory_allocated(device)  # every model's weights and last grads
            times[impl] += time_fn(steps[impl], warmup=0, iters=1, device=device)["times_ms"]
            if device.type == "cuda":  # what this step added on top: activations, gradients, workspaces
                peak_mb[impl] = max(peak_mb[impl], (torch.cuda.max_memory_allocated(device) - resident) / 2**20)

    for impl, row in rows.items():
        ts = times[impl]
        row.update(median_ms=statistics.median(ts), min_ms=min(ts), iters=len(ts), times_ms=ts)
        row["tokens_per_s"] = args.tokens / (row["median_ms"] / 1e3)
        if device.type == "cuda":
            row["step_peak_extra_mb"] = round(peak_mb[impl], 1)
        if impl == "grouped" and row["grouped_backend"] == "grouped_mm" and \
                (device.type, compute_dtype) in getattr(moe_mod, "_grouped_mm_broken", set()):
            row["grouped_backend"] = "loop (grouped_mm raised)"  # it fell back to the loop mid-run
        row["ratio_vs_dense"] = row["median_ms"] / rows["dense"]["median_ms"]
    rows["grouped"]["speedup_vs_loop"] = rows["loop"]["median_ms"] / rows["grouped"]["median_ms"]
    return list(rows.values())


def goals(rows: list[dict], device_type: str) -> list[dict]:
    out = []
    for r in rows:
        if r["impl"] != "grouped":
            continue
        limit = GOAL_OVERHEAD[device_type]
        out.append({"goal": f"routing overhead (grouped / dense) <= {limit} on {device_type}", "shape": r["shape"],
                    "value": round(r["ratio_vs_dense"], 3), "target": limit, "met": r["ratio_vs_dense"] <= limit})
        speedup = r["speedup_vs_loop"]
        out.append({"goal": f"grouped >= {GOAL_GROUPED_SPEEDUP_GPU}x loop on GPU", "shape": r["shape"],
                    "value": round(speedup, 3), "target": GOAL_GROUPED_SPEEDUP_GPU,
                    # only a GPU goal: on CPU it is informational
                    "met": speedup >= GOAL_GROUPED_SPEEDUP_GPU if device_type == "cuda" else None})
    return out


def report(rows: list[dict], goal_rows: list[dict], args, device: torch.device) -> None:
    table_rows = []
    for r in rows:
        impl = r["impl"] if r["impl"] != "grouped" or r.get("grouped_backend") == "grouped_mm" \
            else f"grouped [{r.get('grouped_backend')}]"
        table_rows.append([
            r["shape"], impl, f"{r['median_ms']:.1f}", f"{r['min_ms']:.1f}", f"{r['tokens_per_s']:,.0f}",
            f"{r['ratio_vs_dense']:.2f}",
            f"{r['speedup_vs_loop']:.2f}x" if "speedup_vs_loop" in r else "",
            f"{r['load_max_over_mean']:.2f}" if "load_max_over_mean" in r else "",
        ])
    print_table(
        f"MoE layer fwd+bwd, {args.tokens} tokens, {args.dtype}, {device_name(device)} "
        f"(warmup {args.warmup}, median of {args.iters}"
        + (f"; loop: {args.loop_iters}" if args.loop_iters != args.iters else "") + ")",
        ["shape", "impl", "ms fwd+bwd (median)", "min ms", "tokens/s", "vs dense", "grouped vs loop",
         "load max/mean"],
        table_rows)
    for gl in goal_rows:
        met = {True: "met", False: "NOT met", None: "n/a here"}[gl["met"]]
        print(f"  {gl['shape']:<22} {gl['goal']:<48} {gl['value']:>7.2f}  {met}")


def run_single(args) -> dict:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    rows = []
    for name in args.shapes:
        rows += bench_shape(name, SHAPES[name], args, device)
    goal_rows = goals(rows, device.type)
    report(rows, goal_rows, args, device)
    payload = {
        "device_type": device.type,
        "mode": "single-process",
        "world_size": 1,
        "dtype": args.dtype,
        "autocast": args.dtype == "bf16",
        "tokens": args.tokens,
        "warmup": args.warmup,
        "iters": args.iters,
        "loop_iters": args.loop_iters,
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "quick": args.quick,
        "grouped_mm_fn": getattr(getattr(moe_mod, "_GROUPED_MM", None), "__name__", None),
        "rows": rows,
        "goals": goal_rows,
        "all_goals_met": all(gl["met"] for gl in goal_rows if gl["met"] is not None),
    }
    if not args.no_save:
        path = write_results("moe_dispatch-quick" if args.quick else "moe_dispatch", payload, device=device)
        print(f"wrote {path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path}")
    return payload


def main(argv=None) -> int:
    args = parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        # Later: torchrun mode timing the AllToAllDispatcher across EP ranks.
        print("moe_dispatch: the torchrun / all-to-all mode is not implemented yet; run it as one process",
              file=sys.stderr)
        return 2
    run_single(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
