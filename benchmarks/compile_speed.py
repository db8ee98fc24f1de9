"""Training tokens/s with the blocks compiled (dsmoe.parallel.wrap.compile_blocks, inductor) vs eager.

    python benchmarks/compile_speed.py            # tiny preset, 8 x 128 tokens, 10 timed steps each, fp32
    python benchmarks/compile_speed.py --quick    # tiny preset at 2 layers, 4 x 128, 4 timed steps (make bench)
    python benchmarks/compile_speed.py --device cuda --dtype bf16 --preset smollm2-moe-576x30 --batch 4 --seq 2048

Two copies of one model (configs/models/<preset>.yaml, equal weights) train on the same batches with
AdamW: one eager, one with every block compiled by inductor (`dynamic=False`). First both take the
same 10 steps, which must give equal losses (goal: within 1e-5 relative, fp32; 1e-2 in bf16); the
compiled copy's first step includes compilation, reported as compile_s. Then full steps (forward,
backward, AdamW) are timed interleaved, eager / compiled / eager / ..., and the median of each gives
tokens/s. On CPU one torch thread unless --threads. Table with rich; JSON to
benchmarks/results/compile_speed-<device>-<date>.json (compile_speed-quick-... for --quick).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.common import device_name, print_table, time_fn, write_results  # noqa: E402
from dsmoe.config import CONFIG_ROOT, load_config  # noqa: E402
from dsmoe.tools.model import vocab_size_of  # noqa: E402
from dsmoe.model.transformer import Transformer  # noqa: E402
from dsmoe.parallel.wrap import compile_blocks  # noqa: E402

EQUAL_STEPS = 10
LOSS_TOL = {"fp32": 1e-5, "bf16": 1e-2}
SEED = 1234


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 layers, 4 x 128 tokens, 4 timed steps (make bench)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--layers", type=int, default=None, help="override model.n_layers (default: preset; 2 with --quick)")
    p.add_argument("--batch", type=int, default=None, help="micro-batch (default 8; 4 with --quick)")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--iters", type=int, default=None, help="timed steps per way (default 10; 4 with --quick)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16: autocast")
    p.add_argument("--threads", type=int, default=1, help="CPU: torch threads (default 1)")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    args.layers = args.layers or (2 if args.quick else None)
    args.batch = args.batch or (4 if args.quick else 8)
    args.iters = args.iters or (4 if args.quick else 10)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    over = {"train": {"seq_len": args.seq}, "model": {"max_seq_len": max(args.seq, 256)}}
    if args.layers:
        over["model"]["n_layers"] = args.layers
    cfg = load_config(CONFIG_ROOT / "models" / f"{args.preset}.yaml", over)
    V = vocab_size_of(cfg)
    torch.manual_seed(SEED)
    models = {"eager": Transformer(cfg, V).to(device)}
    models["compiled"] = compile_blocks(copy.deepcopy(models["eager"]))
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-3) for k, m in models.items()}
    gen = torch.Generator().manual_seed(SEED)
    batches = [torch.randint(0, V, (args.batch, args.seq + 1), generator=gen).to(device) for _ in range(4)]
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    def step(way: str, i: int) -> float:
        b = batches[i % len(batches)]
        with torch.autocast(**amp):
            loss = models[way](b[:, :-1], b[:, 1:]).loss
        loss.backward()
        opts[way].step()
        opts[way].zero_grad(set_to_none=True)
        return loss.item()

    losses, compile_s = {k: [] for k in models}, 0.0
    for i in range(EQUAL_STEPS):
        for way in models:
            t0 = time.perf_counter()
            losses[way].append(step(way, i))
            if way == "compiled" and i == 0:
                compile_s = time.perf_counter() - t0
    loss_rel = max(abs(a - b) / abs(b) for a, b in zip(losses["compiled"], losses["eager"]))
    times = {k: [] for k in models}
    for i in range(args.iters):
        for way in models:
            times[way] += time_fn(lambda way=way, i=i: step(way, i), warmup=0, iters=1, device=device)["times_ms"]
    tokens = args.batch * args.seq
    rows = [{"way": way, "median_ms": statistics.median(times[way]), "times_ms": times[way],
             "tokens_per_s": tokens / (statistics.median(times[way]) / 1e3)} for way in models]
    speedup = rows[0]["median_ms"] / rows[1]["median_ms"]
    goals = [{"goal": f"compiled losses within {LOSS_TOL[args.dtype]} of eager over {EQUAL_STEPS} steps",
              "shape": args.preset, "value": loss_rel, "target": LOSS_TOL[args.dtype],
              "met": loss_rel <= LOSS_TOL[args.dtype]},
             {"goal": "compiled tokens/s over eager (informational)", "shape": args.preset, "value": speedup,
              "target": None, "met": None}]
    print_table(f"Training step, {args.preset} ({cfg.model.n_layers} layers), {args.batch} x {args.seq} tokens, "
                f"{args.dtype}, {device_name(device)} (median of {args.iters}, interleaved)",
                ["way", "ms / step", "tokens/s", "speed-up vs eager"],
                [[r["way"], f"{r['median_ms']:.1f}", f"{r['tokens_per_s']:,.0f}",
                  f"{rows[0]['median_ms'] / r['median_ms']:.2f}x"] for r in rows],
                caption=f"compile (first compiled step): {compile_s:.1f} s; max relative loss difference over "
                        f"{EQUAL_STEPS} steps: {loss_rel:.2e}")
    payload = {"device_type": device.type, "preset": args.preset, "n_layers": cfg.model.n_layers,
               "micro_batch": args.batch, "seq_len": args.seq, "dtype": args.dtype, "iters": args.iters,
               "quick": args.quick, "threads": torch.get_num_threads() if device.type == "cpu" else None,
               "compile_s": compile_s, "loss_max_rel_diff": loss_rel, "losses": losses,
               "speedup_compiled_vs_eager": speedup, "rows": rows, "goals": goals}
    if not args.no_save:
        path = write_results("compile_speed-quick" if args.quick else "compile_speed", payload, device=device)
        print(f"wrote {path.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
