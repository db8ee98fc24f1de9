"""Held-out loss, perplexity and per-expert load of a checkpoint, on the validation split training uses.

    python -m dsmoe.eval --ckpt auto --run-dir runs/tiny-shakespeare
    python -m dsmoe.eval --ckpt runs/x/checkpoints/step_0000300.pt --batches 32 --json

The batches are the trainer's validation batches (`dsmoe.data.val_batches` over the prepared split of the
checkpoint's data config, with its train.seq_len, train.micro_batch and train.eval_batches, or --batches),
run in the checkpoint's precision (a bf16 checkpoint in fp32 on a GPU without bf16 tensor cores, such as
the T4): the loss is the `val_loss` training logged for the same weights (an imported checkpoint that
dsmoe exported keeps its run's settings, so it evaluates the same windows). `--ckpt auto` names the
checkpoint it chose. The
expert load is the routed assignments per expert of each MoE layer over those tokens (before any capacity
drop), as a share of the layer's assignments, with max/mean (1.0 = perfectly balanced).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Optional

import torch

from dsmoe.config import ConfigError
from dsmoe.data import ensure_prepared, load_prepared, val_batches
from dsmoe.checkpoint import CheckpointError, resolve
from dsmoe.train.precision import autocast, eval_precision


@torch.no_grad()
def evaluate_checkpoint(ckpt: str, run_dir: str = ".", batches: Optional[int] = None, device: str = "auto") -> dict:
    """{"val_loss", "val_ppl", "batches", "tokens", "moe_layers", "expert_load" [layer][expert] shares,
    "expert_imbalance" [layer] max/mean, "dropped_frac"} for a checkpoint (`auto`: the newest in run_dir).

    val_loss is the mean over batches of each batch's mean next-token cross-entropy (nats), summed in fp32
    in batch order as Trainer.evaluate does at world 1. Raises CheckpointError, or ValueError when the
    validation split holds fewer than one batch."""
    from dsmoe.checkpoint.load import load_model

    model, _, cfg = load_model(ckpt, run_dir, device)
    d, t = cfg.data, cfg.train
    data_dir = ensure_prepared(d.source, d.tokenizer, cache_root=d.cache_dir, val_fraction=d.val_fraction,
                               hf_config=d.hf_config, split=d.split, text_field=d.text_field)
    _, _, val_tokens = load_prepared(data_dir)
    val = val_batches(val_tokens, t.seq_len, t.micro_batch, t.eval_batches if batches is None else batches)
    dev = next(model.parameters()).device
    precision = eval_precision(t.precision, dev)
    total = torch.zeros((), device=dev)
    counts = dropped = None
    for x, y in val:
        with autocast(precision, dev):
            out = model(x.to(dev), y.to(dev))
        total += out.ce_loss.float()
        if out.expert_counts is not None:
            counts = out.expert_counts if counts is None else counts + out.expert_counts
            dropped = out.dropped if dropped is None else dropped + out.dropped
    loss = (total / len(val)).item()
    result = {"val_loss": loss, "val_ppl": math.exp(min(loss, 50)), "batches": len(val),
              "tokens": len(val) * t.micro_batch * t.seq_len, "moe_layers": model.moe_layer_ids}
    if counts is not None:
        per_layer = counts.float().sum(-1, keepdim=True)
        result["expert_load"] = (counts.float() / per_layer).tolist()
        result["expert_imbalance"] = (counts.float().max(-1).values / counts.float().mean(-1)).tolist()
        result["dropped_frac"] = (dropped.sum() / per_layer.sum()).item()
    return result


def report(r: dict) -> str:
    lines = [f"val_loss {r['val_loss']:.6f} | val_ppl {r['val_ppl']:.4f} | {r['batches']} batches, {r['tokens']} tokens"]
    for layer, shares, imbalance in zip(r["moe_layers"], r.get("expert_load", []), r.get("expert_imbalance", [])):
        lines.append(f"layer {layer:3d} expert load: " + " ".join(f"{100 * s:5.1f}%" for s in shares)
                     + f" | max/mean {imbalance:.3f}")
    if r.get("dropped_frac"):
        lines.append(f"dropped by capacity: {100 * r['dropped_frac']:.2f}% of assignments")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint file or sharded directory, or 'auto' (newest in --run-dir)")
    p.add_argument("--run-dir", default=".", help="with --ckpt auto: the run directory")
    p.add_argument("--batches", type=int, default=None, help="validation batches (default: the run's train.eval_batches)")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    args = p.parse_args(argv)
    try:
        if args.ckpt == "auto":
            args.ckpt = str(resolve("auto", args.run_dir))
            print(f"checkpoint: {args.ckpt} (the newest in {args.run_dir})", file=sys.stderr)
        result = evaluate_checkpoint(args.ckpt, args.run_dir, args.batches, args.device)
    except (CheckpointError, ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result) if args.json else report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
