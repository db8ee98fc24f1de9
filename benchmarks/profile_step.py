"""Where a training step's time goes: a torch.profiler breakdown into GEMMs and everything around them.

    python benchmarks/profile_step.py --quick    # 2 x 128 tokens, 2 profiled steps (make bench)
    python benchmarks/profile_step.py            # 4 x 256 tokens, 5 profiled steps
    python benchmarks/profile_step.py --dtype fp32 --shapes fine-grained

Shapes: smollm2-moe-576x30 at 4 layers (8 routed + 1 shared experts of 1536, top-2) and a
fine-grained one (the same preset with d 768, 64 routed + 1 shared experts of 384, top-6: many small
experts, as benchmarks/moe_dispatch.py). One CPU thread unless --threads; bf16 autocast unless
--dtype fp32. A step is forward (with the chunked loss), backward, `build_optimizer`'s AdamW and
zero_grad, as the trainer runs it.

Each op's self time goes to one category: GEMMs (mm/addmm/bmm/grouped_mm/linear/matmul) and casts
(to/_to_copy/copy_) by op name, wherever they run; every other op by the model region it runs in
(routing, permutation, norms, RoPE, loss, optimizer, experts' SwiGLU), which this script marks with
`record_function` around the model's own functions; a backward op inherits the region of the forward
op that made its autograd node (the profiler's sequence numbers). Ops outside any region: softmax /
SDPA, index ops, elementwise, other. "untraced" is the step's wall time minus all ops' self time:
Python and dispatcher overhead between ops. Table with rich; JSON to
benchmarks/results/profile_step-<device>-<date>.json (profile_step-quick-... for --quick).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import re
import sys
from pathlib import Path

import torch
from torch.autograd.profiler import record_function

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.common import device_name, print_table, write_results  # noqa: E402
import dsmoe.model.attention as attention_mod  # noqa: E402
import dsmoe.model.dispatch as dispatch_mod  # noqa: E402
import dsmoe.model.moe as moe_mod  # noqa: E402
import dsmoe.model.transformer as transformer_mod  # noqa: E402
from dsmoe.config import CONFIG_ROOT, load_config  # noqa: E402
from dsmoe.model.transformer import Transformer  # noqa: E402
from dsmoe.tools.model import vocab_size_of  # noqa: E402
from dsmoe.train.optim import build_optimizer  # noqa: E402

PRESET = "smollm2-moe-576x30"
SHAPES = {
    "smollm2-moe-576x30": {},
    "fine-grained": {"model": {"d_model": 768, "n_heads": 12},
                     "moe": {"n_routed_experts": 64, "n_shared_experts": 1, "top_k": 6, "expert_hidden": 384}},
}
GEMM_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_grouped_mm", "aten::grouped_mm",
            "aten::linear", "aten::matmul", "aten::addmv", "aten::mv", "aten::dot"}
CAST_OPS = {"aten::to", "aten::_to_copy", "aten::copy_", "aten::type_as"}
SOFTMAX = re.compile(r"softmax|scaled_dot_product|_flash_attention|_efficient_attention|sdpa", re.I)
INDEX = re.compile(r"index|gather|scatter|take|masked_|embedding|nonzero|where", re.I)
ELEMENTWISE = re.compile(r"aten::(add|sub|mul|div|silu|sigmoid|exp|log|neg|rsqrt|sqrt|pow|mean|sum|cat|stack|"
                         r"fill|zero|zeros|ones|clamp|maximum|minimum|sign|lerp|addcmul|addcdiv|threshold|"
                         r"silu_backward|sigmoid_backward|clone|contiguous|empty|full)", re.I)
REGIONS = ("routing", "permutation", "experts (SwiGLU, non-GEMM)", "norms", "rope", "loss", "optimizer")
CATEGORIES = ("GEMM", "casts", *REGIONS, "softmax/SDPA", "index ops", "elementwise", "other", "untraced")
_SCOPE = "region::"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 x 128 tokens, 2 profiled steps (make bench)")
    p.add_argument("--shapes", nargs="+", choices=tuple(SHAPES), default=list(SHAPES))
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default 4; 2 with --quick)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 256; 128 with --quick)")
    p.add_argument("--steps", type=int, default=None, help="profiled steps (default 5; 3 with --quick)")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="bf16: autocast")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--top", type=int, default=12, help="ops listed by self time per shape (0: none)")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    args.batch = args.batch or (2 if args.quick else 4)
    args.seq = args.seq or (128 if args.quick else 256)
    args.steps = args.steps or (2 if args.quick else 5)
    return args


def _scoped(fn, region: str):
    @functools.wraps(fn)
    def wrapper(*a, **kw):
        with record_function(_SCOPE + region):
            return fn(*a, **kw)
    return wrapper


@contextlib.contextmanager
def regions():
    """Mark the model's routing, permutation, expert, norm, RoPE and loss functions with record_function."""
    patches = [(moe_mod.Router, "forward", "routing"), (dispatch_mod, "sort_by_expert", "routing"),
               (dispatch_mod.LocalDispatcher, "dispatch", "permutation"),
               (dispatch_mod.LocalDispatcher, "combine", "permutation"),
               (moe_mod.GroupedExperts, "forward", "experts (SwiGLU, non-GEMM)"),
               (attention_mod.RMSNorm, "forward", "norms"), (attention_mod, "apply_rope", "rope"),
               (transformer_mod, "chunked_cross_entropy", "loss")]
    saved = [(owner, name, owner.__dict__[name]) for owner, name, _ in patches]
    try:
        for owner, name, region in patches:
            setattr(owner, name, _scoped(getattr(owner, name), region))
        yield
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)


def _region_of(event) -> str | None:
    e = event
    while e is not None:
        if e.name.startswith(_SCOPE):
            return e.name[len(_SCOPE):]
        e = e.cpu_parent
    return None


def _backward_node(event):
    e = event
    while e is not None:
        if e.name.startswith("autograd::engine::evaluate_function"):
            return e
        e = e.cpu_parent
    return None


def categorize(events, per_op: collections.Counter | None = None) -> dict:
    """Self time (us) per category over profiler `events` (FunctionEvents of the step), and the casts'
    self time per region they ran in ("cast@<region>" keys; "cast@model" outside the regions).
    `per_op`, when given, is added each op's self time under (category, op name)."""
    forward_region = {}  # autograd sequence number -> region of the forward op that made the node
    for e in events:
        if e.sequence_nr >= 0 and _backward_node(e) is None and e.sequence_nr not in forward_region:
            forward_region[e.sequence_nr] = _region_of(e)
    totals = collections.Counter()
    for e in events:
        name = e.name
        if name.startswith(_SCOPE) or name.startswith("autograd::engine") or name == "step":
            region = _region_of(e.cpu_parent) if name.startswith(_SCOPE) else None
            totals[region or "other"] += e.self_cpu_time_total  # profiler bookkeeping, tiny
            continue
        if name in GEMM_OPS:
            totals["GEMM"] += e.self_cpu_time_total
            if per_op is not None:
                per_op[("GEMM", name)] += e.self_cpu_time_total
            continue
        region = _region_of(e)
        node = _backward_node(e)
        if region is None and node is not None:
            region = forward_region.get(node.sequence_nr)
            if region is None and "ChunkedLinearCrossEntropy" in node.name:
                region = "loss"
        if name in CAST_OPS:
            totals["casts"] += e.self_cpu_time_total
            totals[f"cast@{region or 'model'}"] += e.self_cpu_time_total
            if per_op is not None:
                per_op[("casts", f"{name} in {region or 'model'}")] += e.self_cpu_time_total
            continue
        if region is None:
            region = ("softmax/SDPA" if SOFTMAX.search(name) else "index ops" if INDEX.search(name)
                      else "elementwise" if ELEMENTWISE.match(name) else "other")
        totals[region] += e.self_cpu_time_total
        if per_op is not None:
            per_op[(region, name)] += e.self_cpu_time_total
    return totals


def profile_shape(name: str, args, amp: dict) -> dict:
    over = {"train": {"seq_len": args.seq}, "model": {"n_layers": args.layers, "max_seq_len": max(args.seq, 256)},
            "moe": {"first_k_dense": 0}}
    for section, fields in SHAPES[name].items():
        over.setdefault(section, {}).update(fields)
    cfg = load_config(CONFIG_ROOT / "models" / f"{PRESET}.yaml", over)
    V = vocab_size_of(cfg)
    torch.manual_seed(0)
    model = Transformer(cfg, V)
    model.init_weights(seed=0)
    opt = build_optimizer(model, cfg.train)
    gen = torch.Generator().manual_seed(0)
    batch = torch.randint(0, V, (args.batch, args.seq + 1), generator=gen)

    def step():
        with record_function("step"):
            with torch.autocast(**amp):
                loss = model(batch[:, :-1], batch[:, 1:]).loss
            loss.backward()
            with record_function(_SCOPE + "optimizer"):
                opt.step()
                opt.zero_grad(set_to_none=True)

    with regions():
        step()  # warm-up: allocations, lazy init, the optimizer's state
        totals, per_op, wall_us = collections.Counter(), collections.Counter(), 0.0
        for _ in range(args.steps):
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                step()
            events = prof.events()
            wall_us += sum(e.cpu_time_total for e in events if e.name == "step")
            totals.update(categorize([e for e in events if e.name != "step"], per_op))
    casts_by_region = {k[5:]: v / args.steps / 1e3 for k, v in totals.items() if k.startswith("cast@")}
    totals = collections.Counter({k: v for k, v in totals.items() if not k.startswith("cast@")})
    traced = sum(totals.values())
    totals["untraced"] = max(0.0, wall_us - traced)
    step_ms = wall_us / args.steps / 1e3
    shares = {c: totals.get(c, 0.0) / wall_us for c in CATEGORIES}
    return {"shape": name, "n_layers": cfg.model.n_layers, "d_model": cfg.model.d_model,
            "n_routed_experts": cfg.moe.n_routed_experts, "expert_hidden": cfg.moe.expert_hidden,
            "top_k": cfg.moe.top_k, "vocab": V, "step_ms": step_ms,
            "ms_per_step": {c: totals.get(c, 0.0) / args.steps / 1e3 for c in CATEGORIES},
            "share": shares, "non_gemm_share": 1.0 - shares["GEMM"], "casts_ms_by_region": casts_by_region,
            "top_ops": [{"category": c, "op": op, "ms_per_step": us / args.steps / 1e3}
                        for (c, op), us in per_op.most_common(args.top)]}


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    amp = dict(device_type="cpu", dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    rows = [profile_shape(name, args, amp) for name in args.shapes]
    print_table(f"Where a training step's time goes ({args.dtype}, {args.batch} x {args.seq} tokens, "
                f"{args.layers} layers, {device_name('cpu')}, {args.threads} thread(s), {args.steps} steps)",
                ["category", *(f"{r['shape']} ms" for r in rows), *(f"{r['shape']} share" for r in rows)],
                [[c, *(f"{r['ms_per_step'][c]:.1f}" for r in rows), *(f"{r['share'][c]:.1%}" for r in rows)]
                 for c in CATEGORIES] + [["step", *(f"{r['step_ms']:.1f}" for r in rows), *("100%" for _ in rows)]],
                caption="GEMM and casts by op name; the others by the model region the op ran in (backward ops "
                        "by their forward op's region); untraced = wall minus ops' self time; casts by region: "
                        + "; ".join(f"{r['shape']}: " + ", ".join(f"{k} {v:.0f} ms" for k, v in sorted(
                            r["casts_ms_by_region"].items(), key=lambda kv: -kv[1])) for r in rows))
    for r in rows if args.top else []:
        print_table(f"{r['shape']}: the {args.top} ops with the most self time", ["category", "op", "ms / step", "share"],
                    [[o["category"], o["op"], f"{o['ms_per_step']:.1f}", f"{o['ms_per_step'] / r['step_ms']:.1%}"]
                     for o in r["top_ops"]])
    payload = {"device_type": "cpu", "preset": PRESET, "dtype": args.dtype, "batch": args.batch, "seq_len": args.seq,
               "steps": args.steps, "threads": args.threads, "quick": args.quick, "categories": list(CATEGORIES),
               "rows": rows}
    if not args.no_save:
        path = write_results("profile_step-quick" if args.quick else "profile_step", payload, device="cpu")
        print(f"wrote {path.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
