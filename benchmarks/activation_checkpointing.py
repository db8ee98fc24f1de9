"""Activation-checkpointing policies: the bytes each keeps for backward and its training-step time.

    python benchmarks/activation_checkpointing.py            # tiny 8 x 256; smollm2-moe-576x30 at 8 layers x 1024 on CPU
    python benchmarks/activation_checkpointing.py --quick    # tiny 8 x 128; smollm2-moe-576x30 at 4 layers x 256 (make bench)
    python benchmarks/activation_checkpointing.py --device cuda   # bf16; smollm2-moe-576x30 whole: 30 layers x 2048

For each shape one model (configs/models/<preset>.yaml, random token batches) runs every policy of
`parallel.activation_checkpointing` through `dsmoe.parallel.wrap.block_fn_for`, as the trainer does:

- kept: the bytes a forward keeps for backward, counted exactly by
  `dsmoe.metrics.memory.measure_saved_activation_bytes` (autograd's saved tensors, non-reentrant
  checkpoints' inputs and selective checkpointing's cache; each storage once, parameters excluded).
  The policies act on the transformer blocks only, so the figures are the blocks' part: the model's
  count minus that of the same model with its blocks skipped (embedding, final norm, LM head and the
  loss's fp32 log-probs, T x V x 4 bytes, which every policy keeps and which would dominate the
  reduced CPU shapes). The whole model's count is in the JSON too.
- time: the median forward+backward step (gradients reset before each, no optimizer), the policies and the
  blocks-skipped model timed round-robin so a drifting host load hits them alike; the blocks' time
  is the step minus the blocks-skipped step. Ratios are to `none`, for the blocks and the whole step.

The smollm2-moe-576x30 shape is the preset's (d 576, MLA, 8 routed + 1 shared experts of 1536, vocabulary
49152) with fewer layers and shorter sequences on CPU; the JSON says which (`reduction`). Goals, on
the blocks: full keeps at most 15% of none's bytes at no more than 1.4x its time; selective sits between
(more bytes than full, fewer than none; no slower than full). On CPU it runs one torch thread unless
--threads says otherwise; on CUDA the peak memory a step adds (`torch.cuda.max_memory_allocated`) is
reported as well. Table with rich; JSON to
benchmarks/results/activation_checkpointing-<device>-<date>.json (activation_checkpointing-quick-... for --quick).
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.common import device_name, print_table, time_fn, write_results  # noqa: E402
from dsmoe.config import CONFIG_ROOT, load_config  # noqa: E402
from dsmoe.metrics.memory import measure_saved_activation_bytes  # noqa: E402
from dsmoe.tools.model import vocab_size_of  # noqa: E402
from dsmoe.model.transformer import Transformer  # noqa: E402
from dsmoe.parallel.wrap import block_fn_for  # noqa: E402

POLICIES = ("none", "full", "every_n", "moe_only", "attention_only", "selective")
GOAL_FULL_KEPT = 0.15  # full keeps at most this fraction of none's bytes
GOAL_FULL_TIME = 1.4  # at no more than this step time
SEED = 1234
MiB = 2 ** 20


def skip_blocks(block, x):
    """A block_fn that leaves the blocks out: what every policy keeps and spends outside them."""
    return x, None, None, None


def shapes(args) -> dict:
    """name -> (preset, {section: overrides}, reduction or None)."""
    gpu = args.device == "cuda"
    smol_layers, smol_seq = (30, 2048) if gpu else ((4, 256) if args.quick else (8, 1024))
    smol = {"model": {"n_layers": smol_layers}, "train": {"micro_batch": 1, "seq_len": smol_seq}}
    reduction = None if gpu else f"{smol_layers} of 30 layers, 1 x {smol_seq} tokens (preset: 2048)"
    tiny_seq = 128 if args.quick else 256
    return {"tiny": ("tiny", {"train": {"micro_batch": 8, "seq_len": tiny_seq}}, None),
            "smollm2-moe-576x30": ("smollm2-moe-576x30", smol, reduction)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short sequences, few layers and iterations (about a minute)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default=None,
                   help="fp32, or bf16 autocast (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--iters", type=int, default=None, help="timed steps per policy (default 5 on CPU, 10 on CUDA)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per policy first (default 1 on CPU, 3 on CUDA)")
    p.add_argument("--shapes", nargs="+", choices=("tiny", "smollm2-moe-576x30"), default=None)
    p.add_argument("--threads", type=int, default=1,
                   help="CPU: torch intra-op threads (default 1: ratios are what count, and one thread keeps them "
                        "steady on a shared host)")
    p.add_argument("--no-save", action="store_true", help="print the table only, write no JSON")
    args = p.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = args.device == "cuda"
    args.dtype = args.dtype or ("bf16" if gpu else "fp32")
    args.iters = args.iters or (10 if gpu else 5)
    args.warmup = (3 if gpu else 1) if args.warmup is None else args.warmup
    return args


def bench_shape(name: str, preset: str, overrides: dict, args, device: torch.device) -> list[dict]:
    cfg = load_config(CONFIG_ROOT / "models" / f"{preset}.yaml", {**overrides, "train": {
        **overrides["train"], "device": device.type}})
    torch.manual_seed(SEED)
    vocab = vocab_size_of(cfg)
    model = Transformer(cfg, vocab).to(device).train()
    B, S = cfg.train.micro_batch, cfg.train.seq_len
    gen = torch.Generator().manual_seed(SEED)
    idx, targets = (torch.randint(0, vocab, (B, S), generator=gen).to(device) for _ in range(2))
    amp_dtype = torch.bfloat16 if args.dtype == "bf16" else None

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)

    block_fns = {p: block_fn_for(dataclasses.replace(cfg.parallel, activation_checkpointing=p)) for p in POLICIES}
    block_fns["skip"] = skip_blocks
    params = list(model.parameters())

    def make_step(block_fn):
        def step():
            for p in params:
                p.grad = None
            with autocast():
                loss = model(idx, targets, block_fn=block_fn).loss
            loss.backward()
        return step

    kept = {}
    for key, block_fn in block_fns.items():
        with autocast():
            kept[key] = measure_saved_activation_bytes(model, (idx, targets), block_fn)

    steps = {key: make_step(fn) for key, fn in block_fns.items()}
    times = {key: [] for key in steps}
    peak = dict.fromkeys(steps, 0)
    for step in steps.values():
        time_fn(step, warmup=args.warmup, iters=1, device=device)
    for _ in range(args.iters):
        for key, step in steps.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                resident = torch.cuda.memory_allocated(device)
            times[key] += time_fn(step, warmup=0, iters=1, device=device)["times_ms"]
            if device.type == "cuda":  # what the step adds on top of the weights and last gradients
                peak[key] = max(peak[key], (torch.cuda.max_memory_allocated(device) - resident) / MiB)

    outside_ms = statistics.median(times["skip"])
    blocks_kept = {p: kept[p] - kept["skip"] for p in POLICIES}
    blocks_ms = {p: statistics.median(times[p]) - outside_ms for p in POLICIES}
    rows = []
    for p in POLICIES:
        step_ms = statistics.median(times[p])
        row = {"shape": name, "policy": p, "tokens": B * S, "blocks_kept_bytes": blocks_kept[p],
               "blocks_kept_fraction": blocks_kept[p] / blocks_kept["none"], "model_kept_bytes": kept[p],
               "model_kept_fraction": kept[p] / kept["none"], "step_ms": step_ms, "times_ms": times[p],
               "step_time_ratio": step_ms / statistics.median(times["none"]),
               "blocks_ms": blocks_ms[p], "blocks_time_ratio": blocks_ms[p] / blocks_ms["none"]}
        if device.type == "cuda":
            row["step_peak_extra_mib"] = round(peak[p], 1)
        rows.append(row)
    rows.append({"shape": name, "policy": "(blocks skipped)", "tokens": B * S, "model_kept_bytes": kept["skip"],
                 "step_ms": outside_ms, "times_ms": times["skip"]})
    return rows


def goals(rows: list[dict]) -> list[dict]:
    out = []
    for name in dict.fromkeys(r["shape"] for r in rows):
        by = {r["policy"]: r for r in rows if r["shape"] == name}
        full, sel = by["full"], by["selective"]
        out += [
            {"goal": f"full keeps <= {GOAL_FULL_KEPT:.0%} of none's block activations", "shape": name,
             "value": round(full["blocks_kept_fraction"], 4), "target": GOAL_FULL_KEPT,
             "met": full["blocks_kept_fraction"] <= GOAL_FULL_KEPT},
            {"goal": f"full block time <= {GOAL_FULL_TIME}x none", "shape": name,
             "value": round(full["blocks_time_ratio"], 3), "target": GOAL_FULL_TIME,
             "met": full["blocks_time_ratio"] <= GOAL_FULL_TIME},
            {"goal": "selective keeps between full and none", "shape": name,
             "value": round(sel["blocks_kept_fraction"], 4), "target": None,
             "met": full["blocks_kept_fraction"] < sel["blocks_kept_fraction"] < 1},
            {"goal": "selective block time <= full's", "shape": name, "value": round(sel["blocks_time_ratio"], 3),
             "target": round(full["blocks_time_ratio"], 3), "met": sel["blocks_time_ratio"] <= full["blocks_time_ratio"]},
        ]
    return out


def report(rows: list[dict], goal_rows: list[dict], args, device: torch.device) -> None:
    table = []
    for r in rows:
        blocks = "blocks_kept_bytes" in r
        table.append([r["shape"], r["policy"],
                      f"{r['blocks_kept_bytes'] / MiB:,.1f}" if blocks else "",
                      f"{r['blocks_kept_fraction']:.3f}" if blocks else "",
                      f"{r['model_kept_bytes'] / MiB:,.1f}", f"{r['step_ms']:,.1f}",
                      f"{r['blocks_time_ratio']:.2f}" if blocks else "",
                      f"{r['step_time_ratio']:.2f}" if blocks else "",
                      f"{r['step_peak_extra_mib']:,.1f}" if "step_peak_extra_mib" in r else ""])
    print_table(f"Activation checkpointing, {args.dtype}, {device_name(device)} (warmup {args.warmup}, "
                f"median of {args.iters})",
                ["shape", "policy", "blocks kept MiB", "of none", "model kept MiB", "step ms", "blocks time",
                 "step time", "peak extra MiB"], table,
                caption="kept: bytes saved for backward; blocks = model minus the blocks-skipped model; "
                        "times relative to none")
    for g in goal_rows:
        met = {True: "met", False: "NOT met", None: "n/a"}[g["met"]]
        print(f"  {g['shape']:<20} {g['goal']:<50} {g['value']:>7.3f}  {met}")


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    todo = {k: v for k, v in shapes(args).items() if not args.shapes or k in args.shapes}
    rows = []
    for name, (preset, overrides, _) in todo.items():
        rows += bench_shape(name, preset, overrides, args, device)
    goal_rows = goals(rows)
    report(rows, goal_rows, args, device)
    payload = {
        "device_type": device.type, "dtype": args.dtype, "autocast": args.dtype == "bf16", "quick": args.quick,
        "warmup": args.warmup, "iters": args.iters,
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "shapes": {name: {"preset": preset, "overrides": overrides, "reduction": reduction}
                   for name, (preset, overrides, reduction) in todo.items()},
        "rows": rows, "goals": goal_rows, "all_goals_met": all(g["met"] for g in goal_rows),
    }
    if not args.no_save:
        path = write_results("activation_checkpointing-quick" if args.quick else "activation_checkpointing", payload,
                             device=device)
        print(f"wrote {path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
