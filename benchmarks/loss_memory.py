"""Bytes the LM loss keeps for backward: dsmoe's chunked cross-entropy vs F.linear + F.cross_entropy.

    python benchmarks/loss_memory.py            # v3-tiny whole (12 layers), 4 x 512 tokens, fp32 and bf16
    python benchmarks/loss_memory.py --quick    # v3-tiny at 1 of its 12 layers, 2 x 256 tokens, fp32 (make bench)

One v3-tiny model (configs/models/v3-tiny.yaml: d 768, vocabulary 32000, tied head) computes its loss
two ways on the same batch and weights:

- chunked: `model(idx, targets)`, what training runs (dsmoe.model.loss: the head's input, targets and a
  fp32 [T] log-sum-exp kept; backward recomputes one chunk of logits at a time);
- unchunked: `F.cross_entropy(model(idx).logits.float(), targets)`, the loss as it was before: the
  [T, V] logits, and the fp32 log-softmax kept for backward.

kept: bytes saved for backward, counted exactly by `dsmoe.metrics.memory.saved_tensor_bytes` (each
storage once, parameters excluded), for the whole model and for the loss alone (the head and loss on
the final norm's output). time: forward + backward, the two interleaved (one thread on CPU unless
--threads). bf16 (autocast) runs only without --quick: CPUs without bf16 units make its matmuls
slow. Goal: the loss alone keeps no [T, V] tensor (at most 1/4 of the unchunked loss's bytes).
JSON to benchmarks/results/loss_memory-<device>-<date>.json (loss_memory-quick-... for --quick).
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.common import device_name, print_table, time_fn, write_results  # noqa: E402
from dsmoe.config import CONFIG_ROOT, load_config  # noqa: E402
from dsmoe.metrics.memory import saved_tensor_bytes  # noqa: E402
from dsmoe.model.loss import chunked_cross_entropy  # noqa: E402
from dsmoe.model.transformer import Transformer  # noqa: E402

GOAL_LOSS_KEPT = 0.25  # chunked loss keeps at most this fraction of the unchunked loss's bytes
SEED = 1234
MiB = 2 ** 20


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 of 12 layers, 2 x 256 tokens, fp32 (make bench)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--iters", type=int, default=None, help="timed fwd+bwd per way (default 3; 1 with --quick)")
    p.add_argument("--threads", type=int, default=1, help="CPU: torch threads (default 1)")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    args.layers, args.batch, args.seq = (1, 2, 256) if args.quick else (12, 4, 512)
    args.iters = args.iters or (1 if args.quick else 3)
    args.dtypes = ("fp32",) if args.quick else ("fp32", "bf16")
    return args


def unchunked_loss(model: Transformer, idx, targets) -> torch.Tensor:
    out = model(idx)
    return F.cross_entropy(out.logits.float().flatten(0, 1), targets.reshape(-1)) + out.aux_loss


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    cfg = load_config(CONFIG_ROOT / "models" / "v3-tiny.yaml", {"model": {"n_layers": args.layers}})
    torch.manual_seed(SEED)
    model = Transformer(cfg).to(device)
    V, d = model.vocab_size, cfg.model.d_model
    idx = torch.randint(0, V, (args.batch, args.seq), device=device)
    targets = torch.roll(idx, -1, 1)
    T = idx.numel()
    ways = {"chunked": lambda: model(idx, targets).loss, "unchunked": lambda: unchunked_loss(model, idx, targets)}
    h = torch.randn(T, d, device=device).requires_grad_()
    loss_alone = {"chunked": lambda: chunked_cross_entropy(h, model.output.weight, targets.reshape(-1)),
                  "unchunked": lambda: F.cross_entropy(F.linear(h, model.output.weight).float(), targets.reshape(-1))}
    rows = []
    for dtype in args.dtypes:
        amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")
        row = {"dtype": dtype, "tokens": T, "vocab": V}
        for way in ways:
            with torch.autocast(**amp):
                row[f"{way}_model_kept_bytes"] = saved_tensor_bytes(ways[way], model)
                row[f"{way}_loss_kept_bytes"] = saved_tensor_bytes(loss_alone[way], model)

        def step(way):
            def run():
                model.zero_grad(set_to_none=True)
                with torch.autocast(**amp):
                    loss = ways[way]()
                loss.backward()
            return run
        times = {way: [] for way in ways}
        step("chunked")()  # warm-up, both ways
        step("unchunked")()
        for _ in range(args.iters):
            for way in ways:
                times[way] += time_fn(step(way), warmup=0, iters=1, device=device)["times_ms"]
        for way in ways:
            row[f"{way}_ms"] = statistics.median(times[way])
        row["loss_kept_ratio"] = row["chunked_loss_kept_bytes"] / row["unchunked_loss_kept_bytes"]
        row["model_kept_ratio"] = row["chunked_model_kept_bytes"] / row["unchunked_model_kept_bytes"]
        row["time_ratio"] = row["chunked_ms"] / row["unchunked_ms"]
        rows.append(row)

    goals = [{"goal": f"chunked loss keeps <= {GOAL_LOSS_KEPT} of the unchunked loss's bytes", "shape": r["dtype"],
              "value": round(r["loss_kept_ratio"], 4), "target": GOAL_LOSS_KEPT,
              "met": r["loss_kept_ratio"] <= GOAL_LOSS_KEPT} for r in rows]
    print_table(
        f"Bytes kept for backward: v3-tiny at {args.layers} layers, {args.batch} x {args.seq} tokens, "
        f"vocabulary {V}, {device_name(device)} (median of {args.iters})",
        ["dtype", "loss kept MiB: unchunked", "chunked", "ratio", "model kept MiB: unchunked", "chunked", "ratio",
         "fwd+bwd ms: unchunked", "chunked", "ratio"],
        [[r["dtype"], f"{r['unchunked_loss_kept_bytes'] / MiB:.1f}", f"{r['chunked_loss_kept_bytes'] / MiB:.1f}",
          f"{r['loss_kept_ratio']:.3f}", f"{r['unchunked_model_kept_bytes'] / MiB:.1f}",
          f"{r['chunked_model_kept_bytes'] / MiB:.1f}", f"{r['model_kept_ratio']:.3f}",
          f"{r['unchunked_ms']:.0f}", f"{r['chunked_ms']:.0f}", f"{r['time_ratio']:.2f}"] for r in rows],
        caption="loss: head + cross-entropy on the final norm's output; model: the whole forward")
    for g in goals:
        print(f"  {g['shape']:<5} {g['goal']:<60} {g['value']:.3f}  {'met' if g['met'] else 'NOT met'}")
    payload = {"device_type": device.type, "preset": "v3-tiny", "n_layers": args.layers, "micro_batch": args.batch,
               "seq_len": args.seq, "iters": args.iters, "quick": args.quick,
               "threads": torch.get_num_threads() if device.type == "cpu" else None,
               "rows": rows, "goals": goals, "all_goals_met": all(g["met"] for g in goals)}
    if not args.no_save:
        path = write_results("loss_memory-quick" if args.quick else "loss_memory", payload, device=device)
        print(f"wrote {path.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
