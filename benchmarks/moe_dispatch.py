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
with --quick on CPU the loop reference is timed once (it is the slow one there). A progress line per
shape is printed (flushed) as it is measured. In the table, "time / dense" is the impl's median time
over the dense FFN's (higher is slower; the routing overhead), "grouped speed-up vs loop" the loop's
time over grouped's (higher is faster).

Goals: routing overhead (MoE grouped / dense) <= 1.5 on CPU, <= 1.25 on GPU; grouped >= 3x loop on
GPU. The table is printed with rich and the numbers go to
benchmarks/results/moe_dispatch-<device>-<date>.json (moe_dispatch-quick-... for --quick, so a smoke
run never overwrites the day's full run).

Under torchrun (WORLD_SIZE > 1) it times expert parallelism instead, with ep = world:

    torchrun --standalone --nproc_per_node 4 benchmarks/moe_dispatch.py           # 2048..16384 tokens / rank
    torchrun --standalone --nproc_per_node 2 benchmarks/moe_dispatch.py --quick   # 2048 tokens, few iters

Per shape and tokens per rank: the AllToAllDispatcher's dispatch + combine (forward, no grad; the
experts are skipped: the dispatched rows are combined directly), the floor -- two bare
`all_to_all_single` calls (there and back) with the same split sizes, i.e. the same bytes -- the
bytes per token (2 * top_k * d elements: top_k rows out, top_k rows back), tokens/s over all ranks,
and the whole MoE layer (router, dispatch, grouped experts, combine, shared expert) forward+backward.
Every timed call starts after a barrier and counts as its slowest rank; the three are interleaved
round by round (the order reversed every other round), and "time / bare a2a" is the median of the
per-round ratios with their range (at least 3 rounds; each round's ratio is in the JSON). Goal:
dispatch+combine <= 1.5x the bare all-to-all on CPU/gloo, <= 1.2x on NCCL.
CPU ranks run one torch thread each (--threads to change). Rank 0 prints the table and writes
benchmarks/results/moe_dispatch-ep<world>-<device>-<date>.json (moe_dispatch-quick-ep<world>-... for --quick).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `python benchmarks/moe_dispatch.py` without installing dsmoe
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.common import device_name, print_table, progress, time_fn, write_results  # noqa: E402
from dsmoe.config import load_config  # noqa: E402
from dsmoe.model import moe as moe_mod  # noqa: E402
from dsmoe.model.grouped_mm import GROUPED_MM  # noqa: E402
from dsmoe.model.moe import MoE, SwiGLU  # noqa: E402

SHAPES = {
    "smollm2-moe-576x30": dict(d_model=576, expert_hidden=1536, n_routed_experts=8, n_shared_experts=1, top_k=2),
    "fine-grained-768x64": dict(d_model=768, expert_hidden=384, n_routed_experts=64, n_shared_experts=1, top_k=6),
}
IMPLS = ("dense", "loop", "grouped")
GOAL_OVERHEAD = {"cpu": 1.5, "cuda": 1.25}  # MoE grouped / dense, fwd+bwd
GOAL_GROUPED_SPEEDUP_GPU = 3.0  # loop / grouped, on GPU only
GOAL_DISPATCH_VS_A2A = {"cpu": 1.5, "cuda": 1.2}  # torchrun mode: dispatch+combine / bare all-to-all
EP_TOKENS = (2048, 4096, 8192, 16384)  # torchrun mode: tokens per rank
INIT_STD = 0.02
PRIME_TOKENS = 256  # a short first step per impl: initialises every code path cheaply
SEED = 1234


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=None,
                   help="tokens per step (default 8192; 2048 with --quick); under torchrun: tokens per rank, "
                        "several allowed (default 2048 4096 8192 16384; 2048 with --quick)")
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
    p.add_argument("--glibc-malloc", action="store_true",
                   help="torchrun mode on CPU: keep glibc's default of returning blocks over 32 MB to the OS "
                        "(every large tensor then page-faults afresh)")
    args = p.parse_args(argv)
    args.world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.world > 1:
        args.tokens = args.tokens or ([2048] if args.quick else list(EP_TOKENS))
    elif args.tokens and len(args.tokens) > 1:
        p.error("--tokens takes one value in a single process (several only under torchrun)")
    else:
        args.tokens = args.tokens[0] if args.tokens else None
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    gpu = args.device == "cuda"
    args.dtype = args.dtype or ("bf16" if gpu else "fp32")
    defaults = {(False, False): (8192, 1, 3), (False, True): (2048, 0, 2),
                (True, False): (8192, 5, 20), (True, True): (2048, 2, 5)}[(gpu, args.quick)]
    if args.world > 1:  # torchrun mode: every timed call is cheap next to a full step
        defaults = {(False, False): (0, 1, 5), (False, True): (0, 1, 3),
                    (True, False): (0, 5, 20), (True, True): (0, 2, 5)}[(gpu, args.quick)]
    args.tokens = args.tokens or defaults[0]
    args.warmup = defaults[1] if args.warmup is None else args.warmup
    args.iters = args.iters or defaults[2]
    args.loop_iters = min(args.iters, args.loop_iters or (1 if args.quick and not gpu else args.iters))
    if args.world > 1 and args.iters < 3:
        p.error(f"--iters {args.iters}: expert-parallel rounds need at least 3 for a median and a range")
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
    reason = model.experts.fallback_reason(x.new_empty(0, x.shape[-1], dtype=dtype))
    return "grouped_mm" if reason is None else f"loop fallback ({reason})"


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
    progress(f"{name}: {args.tokens} tokens, warmup {args.warmup}, then {args.iters} rounds of {', '.join(IMPLS)}")
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
                (device.type, compute_dtype) in moe_mod._no_kernel:
            row["grouped_backend"] = "loop (grouped_mm not implemented)"  # it fell back to the loop mid-run
        row["ratio_vs_dense"] = row["median_ms"] / rows["dense"]["median_ms"]
    rows["grouped"]["speedup_vs_loop"] = rows["loop"]["median_ms"] / rows["grouped"]["median_ms"]
    progress(f"{name}: " + ", ".join(f"{impl} {r['median_ms']:.1f} ms" for impl, r in rows.items())
             + f" (median fwd+bwd; grouped time / dense {rows['grouped']['ratio_vs_dense']:.2f})")
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
        ["shape", "impl", "ms fwd+bwd (median)", "min ms", "tokens/s", "time / dense (>1 = slower)", "grouped speed-up vs loop",
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
        "grouped_mm_fn": getattr(GROUPED_MM, "__name__", None),
        "rows": rows,
        "goals": goal_rows,
        "all_goals_met": all(gl["met"] for gl in goal_rows if gl["met"] is not None),
    }
    if not args.no_save:
        path = write_results("moe_dispatch-quick" if args.quick else "moe_dispatch", payload, device=device)
        print(f"wrote {path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path}")
    return payload


# ----------------------------------------------------------------------------- torchrun: expert parallelism


def timed_round(fns: dict, device: torch.device, reverse: bool = False) -> dict:
    """One call of each function, each after a barrier (in reverse order when `reverse`, so none always
    goes first); ms of this rank (wall clock, device synced)."""
    import torch.distributed as dist

    out = {}
    for key, fn in (list(fns.items())[::-1] if reverse else fns.items()):
        synchronize_device(device)
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        synchronize_device(device)
        out[key] = (time.perf_counter() - t0) * 1e3
    return out


def synchronize_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_ep(name: str, shape: dict, tokens: int, args, mesh) -> dict:
    """dispatch+combine vs two bare all_to_all_single with its split sizes vs the MoE layer fwd+bwd."""
    import torch.distributed as dist

    from dsmoe.parallel.dispatch import AllToAllDispatcher

    device, group = mesh.device, mesh.ep_group
    autocast_dtype = torch.bfloat16 if args.dtype == "bf16" else None
    row_dtype = autocast_dtype or torch.float32
    E, K, d = shape["n_routed_experts"], shape["top_k"], shape["d_model"]
    dispatcher = AllToAllDispatcher(E, group)
    # same weights on every rank (the router is replicated; expert slices are equal, which is fine here)
    moe = init_(MoE(make_cfg(shape, "grouped", device.type), dispatcher), SEED).to(device).train()
    gen = torch.Generator().manual_seed(SEED + 1 + mesh.rank)  # each rank its own tokens
    x = torch.randn(1, tokens, d, generator=gen).to(device)
    g = torch.randn(1, tokens, d, generator=gen).to(device)
    x_TD = x.view(tokens, d).to(row_dtype)
    with torch.no_grad():
        routing = moe.router(x.view(tokens, d), 1)
        _, _, handle = dispatcher.dispatch(x_TD, routing.topk_idx)
    idx, weight = routing.topk_idx, routing.topk_weight
    ins, outs = handle.input_splits, handle.output_splits
    send = torch.randn(sum(ins), d, generator=gen).to(device, row_dtype)
    recv = send.new_empty(sum(outs), d)
    back = torch.empty_like(send)

    def floor():  # the same bytes, the same splits, nothing else: there and back
        dist.all_to_all_single(recv, send, outs, ins, group=group)
        dist.all_to_all_single(back, recv, ins, outs, group=group)

    @torch.no_grad()
    def dispatch_combine():  # the experts are skipped: combine the dispatched rows directly
        expert_x, _, h = dispatcher.dispatch(x_TD, idx)
        dispatcher.combine(expert_x, weight, h)

    x_grad = x.clone().requires_grad_(True)
    layer = make_step(moe, x_grad, g, autocast_dtype)
    fns = {"a2a": floor, "dispatch": dispatch_combine, "layer": layer}
    for _ in range(args.warmup):
        timed_round(fns, device)
    per_iter = [timed_round(fns, device, reverse=i % 2 == 1) for i in range(args.iters)]
    # each call costs what its slowest rank took
    t = torch.tensor([[it[k] for k in fns] for it in per_iter], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    times = {k: t[:, i].tolist() for i, k in enumerate(fns)}
    med = {k: statistics.median(v) for k, v in times.items()}
    ratios = [dc / a2a for dc, a2a in zip(times["dispatch"], times["a2a"])]  # per round: load drifts between rounds

    # rows each rank sends to other ranks (the rest stay local: a copy inside all_to_all_single)
    sent = torch.tensor([sum(ins), sum(ins) - ins[mesh.ep_rank]], dtype=torch.float64)
    dist.all_reduce(sent)
    elem = torch.finfo(row_dtype).bits // 8
    world = mesh.world
    return {
        "shape": name, **shape, "tokens_per_rank": tokens, "world": world, "ep": mesh.ep, "dtype": args.dtype,
        "bytes_per_token": 2 * K * d * elem,  # top_k rows of d out, top_k back (forward)
        "a2a_mb_per_rank": round(2 * sum(ins) * d * elem / 2**20, 2),
        "off_rank_fraction": round(float(sent[1] / sent[0]), 4),
        "a2a_ms": med["a2a"], "dispatch_combine_ms": med["dispatch"], "layer_fwd_bwd_ms": med["layer"],
        "dispatch_vs_a2a": statistics.median(ratios), "dispatch_vs_a2a_min": min(ratios),
        "dispatch_vs_a2a_max": max(ratios), "dispatch_vs_a2a_rounds": [round(r, 4) for r in ratios],
        "a2a_gb_per_s_per_rank": 2 * sum(ins) * d * elem / (med["a2a"] / 1e3) / 1e9,
        "dispatch_tokens_per_s": world * tokens / (med["dispatch"] / 1e3),
        "layer_tokens_per_s": world * tokens / (med["layer"] / 1e3),
        "iters": args.iters, "times_ms": {k: [round(v, 3) for v in vs] for k, vs in times.items()},
    }


def ep_goals(rows: list[dict], device_type: str) -> list[dict]:
    limit = GOAL_DISPATCH_VS_A2A[device_type]
    backend = "gloo" if device_type == "cpu" else "nccl"
    return [{"goal": f"dispatch+combine <= {limit}x bare all-to-all ({backend}), median of rounds", "shape": r["shape"],
             "tokens_per_rank": r["tokens_per_rank"], "value": round(r["dispatch_vs_a2a"], 3), "target": limit,
             "met": r["dispatch_vs_a2a"] <= limit} for r in rows]


def report_ep(rows: list[dict], goal_rows: list[dict], args, device: torch.device) -> None:
    world = rows[0]["world"] if rows else args.world
    print_table(
        f"Expert-parallel MoE, ep={world} ({'gloo' if device.type == 'cpu' else 'nccl'}), {args.dtype}, "
        f"{device_name(device)} (warmup {args.warmup}, median of {args.iters} interleaved rounds; each call = "
        f"slowest rank)",
        ["shape", "tokens/rank", "bytes/token", "MB a2a/rank", "off-rank", "bare a2a ms", "dispatch+combine ms",
         "time / bare a2a (>1 = slower)", "range over rounds", "tokens/s (d+c)", "layer fwd+bwd ms",
         "layer tokens/s"],
        [[r["shape"], r["tokens_per_rank"], r["bytes_per_token"], f"{r['a2a_mb_per_rank']:.1f}",
          f"{r['off_rank_fraction']:.2f}", f"{r['a2a_ms']:.2f}", f"{r['dispatch_combine_ms']:.2f}",
          f"{r['dispatch_vs_a2a']:.2f}", f"{r['dispatch_vs_a2a_min']:.2f}-{r['dispatch_vs_a2a_max']:.2f}",
          f"{r['dispatch_tokens_per_s']:,.0f}", f"{r['layer_fwd_bwd_ms']:.1f}",
          f"{r['layer_tokens_per_s']:,.0f}"] for r in rows],
        caption="bytes/token: forward, 2 x top_k x d elements (out and back); tokens/s over all ranks")
    for gl in goal_rows:
        print(f"  {gl['shape']:<22} {gl['tokens_per_rank']:>6} tokens/rank  {gl['goal']:<48} "
              f"{gl['value']:>6.2f}  {'met' if gl['met'] else 'NOT met'}")


def reuse_freed_memory() -> str:
    """glibc hands every block over 32 MB back to the OS on free, so each large tensor pays its page
    faults again (on a small VM, ~25 ms per 36 MB: more than the all-to-all itself). Keep freed memory
    in the heap instead, which is what CUDA's caching allocator (and jemalloc/tcmalloc, as PyTorch's
    CPU tuning guide advises) does. Returns what the allocator now is, for the JSON."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
        if libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1):
            return "glibc, freed memory kept (mmap off, no trim)"
    except (OSError, AttributeError):
        pass
    return "default"


def run_distributed(args) -> dict:
    import torch.distributed as dist

    from dsmoe.parallel.mesh import init_mesh, shutdown

    malloc = "default"
    if args.device == "cpu":
        torch.set_num_threads(args.threads or 1)  # ranks share the cores
        if not args.glibc_malloc:
            malloc = reuse_freed_memory()
    mesh = init_mesh(args.device, ep=args.world)  # gloo on CPU, NCCL on CUDA; experts over every rank
    try:
        device = mesh.device
        torch.manual_seed(SEED)
        rows = []
        for name in args.shapes:
            for tokens in args.tokens:
                rows.append(bench_ep(name, SHAPES[name], tokens, args, mesh))
                if mesh.is_main:
                    r = rows[-1]
                    progress(f"{name}, {tokens} tokens/rank: bare a2a {r['a2a_ms']:.2f} ms, dispatch+combine "
                             f"{r['dispatch_combine_ms']:.2f} ms, layer fwd+bwd {r['layer_fwd_bwd_ms']:.1f} ms")
        goal_rows = ep_goals(rows, device.type)
        payload = {
            "device_type": device.type, "mode": "torchrun-expert-parallel", "backend": dist.get_backend(),
            "world_size": mesh.world, "ep": mesh.ep, "dtype": args.dtype, "tokens_per_rank": args.tokens,
            "warmup": args.warmup, "iters": args.iters, "quick": args.quick,
            "threads": torch.get_num_threads() if device.type == "cpu" else None,
            "cpu_malloc": malloc if device.type == "cpu" else None,
            "rows": rows, "goals": goal_rows, "all_goals_met": all(gl["met"] for gl in goal_rows),
        }
        if mesh.is_main:
            report_ep(rows, goal_rows, args, device)
            if not args.no_save:
                name = f"moe_dispatch-{'quick-' if args.quick else ''}ep{mesh.world}"
                path = write_results(name, payload, device=device)
                print(f"wrote {path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path}")
        return payload
    finally:
        shutdown(mesh)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.world > 1:
        run_distributed(args)
        return 0
    run_single(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
