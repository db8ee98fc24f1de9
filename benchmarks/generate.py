"""Generation with the KV cache against recomputing the whole prefix for every new token, and the bytes
the cache keeps per token and layer (MLA's latent + RoPE key against the per-head K/V it replaces).

    python benchmarks/generate.py                     # v3-tiny, all 12 layers, 256 prompt + 256 new, every step recomputed
    python benchmarks/generate.py --quick             # v3-tiny cut to 2 layers; recompute timed at every 16th step
    python benchmarks/generate.py --threads 1         # on a shared host: one thread gives stable ratios
    python benchmarks/generate.py --device cuda --layers 12 --recompute-every 1

Greedy decoding of one prompt of `--prompt` random ids (seeded) on a randomly initialised model of the
preset's shape (fp32). Cached: `dsmoe.infer.Batch` (prefill, then one token per step): prefill time,
decode tokens/s over the steps after the first token, and end to end; run before and after the
recompute side and averaged, so a drifting host load weighs on both. Recompute: the uncached way, one
full forward of prompt + tokens so far per new token (what `Transformer.generate` did before the
cache), timed at every `--recompute-every`-th step and summed over all steps by linear interpolation
in between (the cost of a forward grows smoothly with its length); at each timed step its argmax must
equal the cached run's token (recorded as `tokens_match`). The ratio is cached decode tokens/s over
recompute tokens/s, both from this run. A batch-8 row (8 prompts of different lengths, cached) shows
the aggregate rate of batched decoding.

Cache bytes: per preset and element size, the bytes per token per layer measured on an allocated
KVCache (its tensors' nbytes / (rows x capacity x layers)) against `cache_bytes_per_token` (MLA:
(kv_lora_rank + qk_rope_head_dim) x element size; GQA: 2 x n_kv_heads x head_dim x element size) and
the per-head keys and values a plain cache would keep (`full_kv_bytes_per_token`).

Goal: cached decode >= 5x the recompute tokens/s at v3-tiny shape on CPU.
Results: benchmarks/results/generate[-quick]-<device>-<date>.json.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `python benchmarks/generate.py` without installing dsmoe
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.common import device_name, print_table, write_results  # noqa: E402
from dsmoe.config import CONFIG_ROOT, load_config  # noqa: E402
from dsmoe.infer import Batch, SamplingParams  # noqa: E402
from dsmoe.infer.cache import KVCache, cache_bytes_per_token, full_kv_bytes_per_token  # noqa: E402
from dsmoe.infer.forward import dropless  # noqa: E402
from dsmoe.model import Transformer  # noqa: E402

GOAL_SPEEDUP = 5.0
CACHE_PRESETS = ("tiny", "v3-tiny", "smollm2-moe-576x30", "moe-512x8", "v3-mini")
BATCH_ROWS = 8


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 layers, recompute timed at every 16th step")
    p.add_argument("--preset", default="v3-tiny")
    p.add_argument("--layers", type=int, default=None, help="keep the first N layers (default: all; 2 with --quick)")
    p.add_argument("--prompt", type=int, default=256, help="prompt tokens")
    p.add_argument("--new", type=int, default=256, help="new tokens")
    p.add_argument("--recompute-every", type=int, default=None, help="time the recompute at every k-th step "
                   "(default 1; 16 with --quick)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="CPU: torch intra-op threads")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    args.layers = args.layers or (2 if args.quick else None)
    args.recompute_every = args.recompute_every or (16 if args.quick else 1)
    return args


def build(args) -> Transformer:
    overrides = [f"--model.n_layers={args.layers}"] if args.layers else []
    cfg = load_config(CONFIG_ROOT / "models" / f"{args.preset}.yaml", overrides)
    torch.manual_seed(0)
    return Transformer(cfg, cfg.model.vocab_size or 320).to(args.device).eval()


def cached_run(model: Transformer, prompts: list[list[int]], new: int, device) -> dict:
    """Prefill and decode `prompts` together; times and every row's tokens."""
    capacity = max(len(p) for p in prompts) + new
    batch = Batch(model, len(prompts), capacity, vocab_limit=model.vocab_size)
    params = SamplingParams(max_new_tokens=new, temperature=0, ignore_eos=True)
    seqs = [batch.new_sequence(p, params) for p in prompts]
    sync(device)
    t0 = time.perf_counter()
    batch.add(seqs)
    sync(device)
    t1 = time.perf_counter()
    while batch.rows:
        batch.step()
    sync(device)
    t2 = time.perf_counter()
    n = len(prompts)
    return {"rows": n, "prefill_s": t1 - t0, "decode_s": t2 - t1, "prompt_tokens": sum(map(len, prompts)),
            "new_tokens": n * new, "decode_tokens_per_s": n * (new - 1) / (t2 - t1),
            "end_to_end_tokens_per_s": n * new / (t2 - t0), "outputs": [s.out for s in seqs],
            "cache_bytes": batch.cache.nbytes(), "cache_capacity": capacity}


@torch.no_grad()
def recompute_run(model: Transformer, prompt: list[int], out: list[int], every: int, device) -> dict:
    """The uncached cost of generating `out` after `prompt`: step i runs one full forward over
    prompt + out[:i]. Steps 0, every, 2*every, ... and the last are timed; the rest interpolated."""
    new = len(out)
    timed = sorted(set(range(0, new, every)) | {new - 1})
    times, match = {}, True
    for i in timed:
        ids = torch.tensor([prompt + out[:i]], device=device)
        sync(device)
        t0 = time.perf_counter()
        with dropless(model):  # route as the cached run does
            nxt = int(model(ids).logits[0, -1].argmax())
        sync(device)
        times[i] = time.perf_counter() - t0
        match &= nxt == out[i]
    total = 0.0
    for a, b in zip(timed, timed[1:]):  # steps a .. b-1 at the cost interpolated between a and b
        total += sum(times[a] + (times[b] - times[a]) * (j - a) / (b - a) for j in range(a, b))
    total += times[timed[-1]]
    return {"timed_steps": len(timed), "every": every, "total_s": total, "tokens_per_s": new / total,
            "first_step_s": times[0], "last_step_s": times[new - 1], "tokens_match": match}


def mean_runs(a: dict, b: dict) -> dict:
    """Two cached runs of the same prompt as one: mean times, rates from them; their tokens must agree."""
    out = {**a, "prefill_s": (a["prefill_s"] + b["prefill_s"]) / 2, "decode_s": (a["decode_s"] + b["decode_s"]) / 2,
           "runs_decode_s": [a["decode_s"], b["decode_s"]], "runs_equal": a["outputs"] == b["outputs"]}
    n, new = a["rows"], a["new_tokens"] // a["rows"]
    out["decode_tokens_per_s"] = n * (new - 1) / out["decode_s"]
    out["end_to_end_tokens_per_s"] = n * new / (out["prefill_s"] + out["decode_s"])
    return out


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def cache_table() -> list[dict]:
    rows = []
    for preset in CACHE_PRESETS:
        cfg = load_config(CONFIG_ROOT / "models" / f"{preset}.yaml", [])
        for dtype in (torch.float32, torch.bfloat16):
            size = torch.empty((), dtype=dtype).element_size()
            rows_, capacity = 2, 8
            cache = KVCache.allocate(cfg, rows_, capacity, dtype, torch.device("cpu"))
            measured = cache.nbytes() / (rows_ * capacity * cfg.model.n_layers)
            formula, full = cache_bytes_per_token(cfg, size), full_kv_bytes_per_token(cfg, size)
            rows.append({"preset": preset, "attention": cfg.attention.kind, "dtype": str(dtype).split(".")[-1],
                         "measured_bytes": measured, "formula_bytes": formula, "full_kv_bytes": full,
                         "matches_formula": measured == formula, "compression": full / measured})
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build(args)
    cfg = model.cfg
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, model.vocab_size, (args.prompt,), generator=g).tolist()
    shape = f"{cfg.model.name} ({cfg.model.n_layers} layers), {args.prompt} + {args.new}"
    print(f"generate: {shape}, {args.device}, {torch.get_num_threads()} threads", flush=True)
    cached_run(model, [prompt[:16]], 4, args.device)  # warm-up (allocator, kernels)
    # cached, recompute, cached again: a host whose load drifts weighs on both sides alike
    first = cached_run(model, [prompt], args.new, args.device)
    recompute = recompute_run(model, prompt, first["outputs"][0], args.recompute_every, args.device)
    again = cached_run(model, [prompt], args.new, args.device)
    single = mean_runs(first, again)
    lengths = [max(1, args.prompt - args.prompt * i // (2 * BATCH_ROWS)) for i in range(BATCH_ROWS)]  # ragged prompts
    batched = cached_run(model, [torch.randint(0, model.vocab_size, (n,), generator=g).tolist() for n in lengths],
                         args.new, args.device)
    ratio = single["decode_tokens_per_s"] / recompute["tokens_per_s"]
    e2e_ratio = single["end_to_end_tokens_per_s"] / recompute["tokens_per_s"]
    per_token_layer = single["cache_bytes"] / (single["cache_capacity"] * cfg.model.n_layers)
    print_table(f"Greedy generation, {shape}, fp32, {device_name(args.device)}",
                ["method", "rows", "prefill s", "decode s", "decode tok/s", "end-to-end tok/s", "speed-up vs recompute"],
                [["KV cache", 1, f"{single['prefill_s']:.2f}", f"{single['decode_s']:.2f}",
                  f"{single['decode_tokens_per_s']:.1f}", f"{single['end_to_end_tokens_per_s']:.1f}", f"{ratio:.1f}x"],
                 ["recompute", 1, "-", f"{recompute['total_s']:.2f}", f"{recompute['tokens_per_s']:.2f}",
                  f"{recompute['tokens_per_s']:.2f}", "1.0x"],
                 [f"KV cache, batch {BATCH_ROWS} (ragged)", BATCH_ROWS, f"{batched['prefill_s']:.2f}",
                  f"{batched['decode_s']:.2f}", f"{batched['decode_tokens_per_s']:.1f}",
                  f"{batched['end_to_end_tokens_per_s']:.1f}", "-"]],
                caption=f"recompute timed at {recompute['timed_steps']} of {args.new} steps (every "
                        f"{recompute['every']}), interpolated between; argmax equal to the cached tokens at every timed "
                        f"step: {recompute['tokens_match']}"
                        + (f"; --quick: {cfg.model.n_layers} of the preset's layers" if args.quick else ""))
    caches = cache_table()
    print_table("KV cache bytes per token per layer: measured (allocated tensors) vs formula",
                ["preset", "attention", "dtype", "measured", "formula", "per-head K/V", "smaller by"],
                [[r["preset"], r["attention"], r["dtype"], f"{r['measured_bytes']:.0f}", r["formula_bytes"],
                  r["full_kv_bytes"], f"{r['compression']:.2f}x"] for r in caches])
    for r in (single, batched):
        del r["outputs"]
    goal = {"goal": f"KV-cache decode >= {GOAL_SPEEDUP:g}x recompute tokens/s", "shape": shape,
            "value": round(ratio, 2), "target": GOAL_SPEEDUP, "met": ratio >= GOAL_SPEEDUP}
    payload = {"device_type": torch.device(args.device).type, "quick": args.quick, "preset": args.preset,
               "layers": cfg.model.n_layers, "preset_layers": load_config(CONFIG_ROOT / "models" / f"{args.preset}.yaml",
                                                                          []).model.n_layers,
               "prompt_tokens": args.prompt, "new_tokens": args.new, "dtype": "float32",
               "threads": torch.get_num_threads(), "cached": single, "recompute": recompute, "batched": batched,
               "decode_speedup": round(ratio, 2), "end_to_end_speedup": round(e2e_ratio, 2),
               "run_cache_bytes_per_token_per_layer": per_token_layer, "cache_bytes": caches, "goals": [goal]}
    print(f"cached decode {ratio:.1f}x the recompute tokens/s (end to end {e2e_ratio:.1f}x); goal >= "
          f"{GOAL_SPEEDUP:g}x: {'met' if goal['met'] else 'NOT met'}")
    if not args.no_save:
        path = write_results("generate-quick" if args.quick else "generate", payload, device=args.device)
        print(f"wrote {path.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
