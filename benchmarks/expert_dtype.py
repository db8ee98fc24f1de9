"""fp32 training with the routed experts' GEMMs in bf16 (`moe.expert_dtype: bf16`) against all-fp32:
step time and the loss difference.

    python benchmarks/expert_dtype.py --quick    # 2 layers, 2 x 128 tokens, 8 steps each (make bench)
    python benchmarks/expert_dtype.py            # 4 layers, 4 x 256 tokens, 20 steps each
    python benchmarks/expert_dtype.py --shape fine-grained

Two copies of one model (smollm2-moe-576x30 or the fine-grained shape of benchmarks/profile_step.py,
equal initial weights) train on the same batches with build_optimizer's AdamW, one all-fp32, one with
`moe.expert_dtype=bf16` (torchtitan's experts always run in bf16; here it is a choice). Steps alternate
fp32 / bf16-experts / bf16-experts / fp32 ...; each reports its median step time, and the losses of the
two are compared step by step (relative difference at step 1 and the largest over the run: training
on few batches at the preset's peak rate, unwarmed, amplifies the first steps' rounding). One CPU
thread unless --threads. Table with rich; JSON to benchmarks/results/expert_dtype-<device>-<date>.json
(expert_dtype-quick-... for --quick).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.common import device_name, print_table, write_results  # noqa: E402
from benchmarks.profile_step import PRESET, SHAPES  # noqa: E402
from dsmoe.config import CONFIG_ROOT, load_config  # noqa: E402
from dsmoe.model.transformer import Transformer  # noqa: E402
from dsmoe.tools.model import vocab_size_of  # noqa: E402
from dsmoe.train.optim import build_optimizer  # noqa: E402

WAYS = {"fp32": None, "fp32 + bf16 experts": "bf16"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 layers, 2 x 128 tokens, 8 steps each (make bench)")
    p.add_argument("--shape", choices=tuple(SHAPES), default="smollm2-moe-576x30")
    p.add_argument("--layers", type=int, default=None, help="default 4; 2 with --quick")
    p.add_argument("--batch", type=int, default=None, help="default 4; 2 with --quick")
    p.add_argument("--seq", type=int, default=None, help="default 256; 128 with --quick")
    p.add_argument("--steps", type=int, default=None, help="steps each, all timed but the first (default 20; 8)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    args.layers = args.layers or (2 if args.quick else 4)
    args.batch = args.batch or (2 if args.quick else 4)
    args.seq = args.seq or (128 if args.quick else 256)
    args.steps = args.steps or (8 if args.quick else 20)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    models, opts = {}, {}
    for way, expert_dtype in WAYS.items():
        over = {"train": {"seq_len": args.seq}, "model": {"n_layers": args.layers, "max_seq_len": max(args.seq, 256)},
                "moe": {"first_k_dense": 0, "expert_dtype": expert_dtype}}
        for section, fields in SHAPES[args.shape].items():
            over.setdefault(section, {}).update(fields)
        cfg = load_config(CONFIG_ROOT / "models" / f"{PRESET}.yaml", over)
        models[way] = Transformer(cfg, vocab_size_of(cfg))
        models[way].init_weights(seed=0)  # equal weights: init depends on the seed and names only
        opts[way] = build_optimizer(models[way], cfg.train)
    V = vocab_size_of(cfg)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, V, (args.batch, args.seq + 1), generator=gen) for _ in range(4)]
    losses, times = {w: [] for w in WAYS}, {w: [] for w in WAYS}
    for i in range(args.steps):
        for way in (list(WAYS) if i % 2 == 0 else list(WAYS)[::-1]):
            b = batches[i % len(batches)]
            t0 = time.perf_counter()
            loss = models[way](b[:, :-1], b[:, 1:]).loss
            loss.backward()
            opts[way].step()
            opts[way].zero_grad(set_to_none=True)
            if i:  # the first step allocates the optimizer state
                times[way].append((time.perf_counter() - t0) * 1e3)
            losses[way].append(loss.item())
    base, ours = losses["fp32"], losses["fp32 + bf16 experts"]
    rel = [abs(a - b) / abs(b) for a, b in zip(ours, base)]
    loss_rel = max(rel)
    tokens = args.batch * args.seq
    rows = [{"way": w, "median_ms": statistics.median(times[w]), "min_ms": min(times[w]), "max_ms": max(times[w]),
             "tokens_per_s": tokens / statistics.median(times[w]) * 1e3, "times_ms": times[w], "losses": losses[w]}
            for w in WAYS]
    ratios = [a / b for a, b in zip(times["fp32"], times["fp32 + bf16 experts"])]
    speedup = statistics.median(ratios)
    print_table(f"fp32 training, routed experts in fp32 vs bf16: {args.shape} ({args.layers} layers), "
                f"{args.batch} x {args.seq} tokens, {device_name('cpu')}, {args.threads} thread(s), "
                f"{args.steps - 1} timed steps each, interleaved",
                ["way", "ms / step (median)", "min ms", "max ms", "tokens/s", "final loss"],
                [[r["way"], f"{r['median_ms']:.1f}", f"{r['min_ms']:.1f}", f"{r['max_ms']:.1f}",
                  f"{r['tokens_per_s']:,.0f}", f"{r['losses'][-1]:.4f}"] for r in rows],
                caption=f"bf16 experts speedup (median of per-step ratios): {speedup:.2f}x "
                        f"(range {min(ratios):.2f}-{max(ratios):.2f}); relative loss difference at step 1: "
                        f"{rel[0]:.1e}, largest over {args.steps} steps: {loss_rel:.1e}")
    payload = {"device_type": "cpu", "preset": PRESET, "shape": args.shape, "n_layers": args.layers,
               "batch": args.batch, "seq_len": args.seq, "steps": args.steps, "threads": args.threads,
               "quick": args.quick, "rows": rows, "speedup_bf16_experts": speedup, "step_ratios": ratios,
               "loss_rel_diff_step1": rel[0], "loss_max_rel_diff": loss_rel}
    if not args.no_save:
        path = write_results("expert_dtype-quick" if args.quick else "expert_dtype", payload, device="cpu")
        print(f"wrote {path.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
