"""The `make bench` suite: every benchmark as a subprocess, then one combined JSON, a markdown summary
and plots.

    python benchmarks/suite.py --quick     # what `make bench` runs: about 5-10 minutes on 2 CPU cores
    python benchmarks/suite.py             # the full presets (much longer)

Runs, continuing past a failing one (its return code and the tail of its output are recorded):

    benchmarks/moe_dispatch.py                                      one MoE layer: loop / grouped / dense
    torchrun --standalone --nproc_per_node 2 benchmarks/moe_dispatch.py   expert-parallel dispatch vs all-to-all
    benchmarks/data_loader.py                                       loader tokens/s vs training tokens/s
    benchmarks/train_throughput.py                                  tiny training: single / DDP / EP / FSDP2
    benchmarks/memory_layouts.py                                    measured bytes per rank: DDP vs FSDP2, world 2 and 4
    benchmarks/simulate.py                                          simulated per-rank peak at scale vs the estimate
    benchmarks/activation_checkpointing.py                          bytes kept and step time per checkpointing policy
    benchmarks/peer_hf.py                                           dsmoe vs HF DeepseekV3 (skips without transformers)
    benchmarks/peer_torchtitan.py                                   dsmoe vs torchtitan DeepSeek-V3 (skips without torchtitan)
    benchmarks/generate.py                                          KV-cache decode vs recomputation, cache bytes per token
    benchmarks/loss_memory.py                                       bytes the LM loss keeps: chunked vs F.cross_entropy
    benchmarks/profile_step.py                                      share of a bf16 step in GEMMs, casts, routing, norms...
    benchmarks/expert_dtype.py                                      fp32 training with bf16 expert GEMMs vs all-fp32
    benchmarks/compile_speed.py                                     training step with compiled blocks vs eager
    benchmarks/serve_load.py                                        server under N concurrent clients vs one
    benchmarks/checkpoint_io.py                                     save blocking sync vs async, resume and start-up RSS per rank

(each with --quick when given). Then reads the JSON each wrote in this run
(benchmarks/results/<name>[-quick][-ep2]-<device>-<date>.json) and writes
benchmarks/results/<device>-<date>.json (all of them, plus the run log), <device>-<date>.md (one table
per benchmark with the key figures and each goal met / not met) and, when matplotlib is importable,
<device>-<date>-moe_layer.png, -dispatch_vs_a2a.png, -train_throughput.png, -memory_layouts.png and
-activation_checkpointing.png. The markdown is
printed at the end. Exit status 1 when a benchmark failed (goals not met do not fail the suite).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.common import RESULTS_DIR, device_name  # noqa: E402

MiB = 2 ** 20
GiB = 2 ** 30


def steps(quick: bool) -> list[dict]:
    q = ["--quick"] if quick else []
    sfx = "-quick" if quick else ""
    py = sys.executable
    torchrun = [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    return [
        {"key": "moe_dispatch", "title": "MoE layer: loop vs grouped vs dense",
         "cmd": [py, "benchmarks/moe_dispatch.py", *q], "result": f"moe_dispatch{sfx}"},
        {"key": "moe_dispatch_ep2", "title": "Expert-parallel dispatch vs bare all-to-all (world 2)",
         "cmd": [*torchrun, "benchmarks/moe_dispatch.py", *q], "result": f"moe_dispatch{sfx}-ep2"},
        {"key": "data_loader", "title": "Data loader vs training",
         "cmd": [py, "benchmarks/data_loader.py", *q], "result": f"data_loader{sfx}"},
        {"key": "train_throughput", "title": "Training throughput per layout (tiny, CPU)",
         "cmd": [py, "benchmarks/train_throughput.py", *q], "result": f"train_throughput{sfx}"},
        {"key": "memory_layouts", "title": "Persistent memory per rank: DDP vs FSDP2",
         "cmd": [py, "benchmarks/memory_layouts.py", *q], "result": f"memory_layouts{sfx}"},
        {"key": "simulate", "title": "Rehearsed at scale: simulated per-rank peak vs the estimate",
         "cmd": [py, "benchmarks/simulate.py", *q], "result": f"simulate{sfx}"},
        {"key": "activation_checkpointing", "title": "Activation checkpointing: bytes kept vs step time",
         "cmd": [py, "benchmarks/activation_checkpointing.py", *q], "result": f"activation_checkpointing{sfx}"},
        {"key": "peer_hf", "title": "dsmoe vs Hugging Face DeepseekV3",
         "cmd": [py, "benchmarks/peer_hf.py", *q], "result": f"peer_hf{sfx}"},
        {"key": "peer_torchtitan", "title": "dsmoe vs torchtitan DeepSeek-V3 (bf16)",
         "cmd": [py, "benchmarks/peer_torchtitan.py", *q], "result": f"peer_torchtitan{sfx}"},
        {"key": "generate", "title": "Generation: KV cache vs recomputation",
         "cmd": [py, "benchmarks/generate.py", *q], "result": f"generate{sfx}"},
        {"key": "loss_memory", "title": "LM loss: bytes kept for backward, chunked vs unchunked (v3-tiny)",
         "cmd": [py, "benchmarks/loss_memory.py", *q], "result": f"loss_memory{sfx}"},
        {"key": "profile_step", "title": "Where a bf16 training step's time goes (torch.profiler, CPU)",
         "cmd": [py, "benchmarks/profile_step.py", *q], "result": f"profile_step{sfx}"},
        {"key": "expert_dtype", "title": "fp32 training: routed experts in fp32 vs bf16 (moe.expert_dtype)",
         "cmd": [py, "benchmarks/expert_dtype.py", *q], "result": f"expert_dtype{sfx}"},
        {"key": "compile_speed", "title": "Compiled blocks (inductor) vs eager: training tokens/s",
         "cmd": [py, "benchmarks/compile_speed.py", *q], "result": f"compile_speed{sfx}"},
        {"key": "serve_load", "title": "Serving: concurrent clients on loopback",
         "cmd": [py, "benchmarks/serve_load.py", *q], "result": f"serve_load{sfx}"},
        {"key": "checkpoint_io", "title": "Checkpoints: save blocking, resume and start-up memory per rank",
         "cmd": [py, "benchmarks/checkpoint_io.py", *q], "result": f"checkpoint_io{sfx}"},
    ]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="every benchmark with --quick (make bench)")
    p.add_argument("--only", nargs="+", default=None,
                   help="run only these (moe_dispatch moe_dispatch_ep2 loss_memory profile_step expert_dtype compile_speed "
                        "data_loader "
                        "simulate "
                        "train_throughput "
                        "memory_layouts activation_checkpointing peer_hf peer_torchtitan generate serve_load checkpoint_io)")
    p.add_argument("--timeout", type=int, default=None, help="seconds per benchmark (default 600; 3600 full)")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    args.timeout = args.timeout or (600 if args.quick else 3600)
    return args


def find_result(name: str, devices: list[str], date: str, since: float):
    """The JSON `name` wrote in this run (mtime after `since`), under any of the device names; of
    timestamped files (<date>T<time>), the newest."""
    for dev in devices:
        paths = [RESULTS_DIR / f"{name}-{dev}-{date}.json", *sorted(RESULTS_DIR.glob(f"{name}-{dev}-{date}T*.json"))[::-1]]
        for path in paths:
            if path.exists() and path.stat().st_mtime >= since - 1:
                return path
    return None


def run_step(step: dict, timeout: int, devices: list[str], date: str) -> dict:
    print(f"\n=== suite: {step['key']}: {' '.join(step['cmd'][1:] if step['cmd'][0] == sys.executable else step['cmd'])}",
          flush=True)
    t0, wall0 = time.time(), time.perf_counter()
    lines: list[str] = []
    try:
        proc = subprocess.Popen(step["cmd"], cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1)
        deadline = time.perf_counter() + timeout
        for line in proc.stdout:  # stream to the console, keep the tail
            sys.stdout.write(line)
            lines.append(line)
            if time.perf_counter() > deadline:
                proc.kill()
                break
        try:
            rc = proc.wait(timeout=max(1.0, deadline - time.perf_counter()))
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = "timeout"
        if time.perf_counter() > deadline:
            rc = "timeout"
    except OSError as e:
        rc, lines = "error", [str(e)]
    wall = time.perf_counter() - wall0
    path = find_result(step["result"], devices, date, t0)
    out = "".join(lines)
    if rc == 0 and path is None and "Skipped" in out:
        status = "skipped"
    elif rc == 0 and path is not None:
        status = "ok"
    elif rc == 0:
        status = "no result file"
    else:
        status = "failed"
    print(f"=== suite: {step['key']}: {status} (rc {rc}, {wall:.1f} s)", flush=True)
    return {"key": step["key"], "title": step["title"], "command": " ".join(step["cmd"]), "returncode": rc,
            "status": status, "wall_s": round(wall, 1), "result_file": str(path.relative_to(REPO_ROOT)) if path else None,
            "output_tail": out[-2000:] if status != "ok" else None}


# ---------------------------------------------------------------- markdown

def _f(x, spec=",.1f"):
    if x is None:
        return "-"
    try:
        return format(x, spec)
    except (TypeError, ValueError):
        return str(x)


def _table(cols: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(cols))) + "|"]
    out += ["| " + " | ".join("" if c is None else str(c) for c in r) + " |" for r in rows]
    return out


def _met(m) -> str:
    return "n/a" if m is None else ("met" if m else "**NOT met**")


def _goals(res: dict) -> list[str]:
    goals = res.get("goals") or []
    if not goals:
        return []
    rows = []
    for g in goals:
        where = " ".join(str(g[k]) for k in ("shape", "tokens_per_rank", "worst") if g.get(k) is not None)
        value = g.get("value")
        spec = ",.0f" if abs(value or 0) >= 1000 else ".3g"
        rows.append([g["goal"], where, _f(value, spec), _f(g.get("target"), "g"), _met(g.get("met"))])
    return ["", *_table(["goal", "where", "value", "target", "status"], rows)]


def md_moe(res: dict) -> list[str]:
    rows = [[r["shape"], r["impl"], r.get("tokens"), _f(r["median_ms"]), _f(r.get("tokens_per_s"), ",.0f"),
             _f(r.get("ratio_vs_dense"), ".2f")] for r in res["rows"]]
    head = [f"{res.get('tokens')} tokens, {res.get('dtype')}, fwd+bwd, median of {res.get('iters')} "
            f"(loop: {res.get('loop_iters')})", ""]
    return head + _table(["shape", "impl", "tokens", "ms", "tokens/s", "time / dense (>1 = slower)"], rows) + _goals(res)


def md_ep(res: dict) -> list[str]:
    rows = [[r["shape"], r["tokens_per_rank"], _f(r["a2a_ms"], ".2f"), _f(r["dispatch_combine_ms"], ".2f"),
             _f(r["dispatch_vs_a2a"], ".2f"),
             f'{_f(r.get("dispatch_vs_a2a_min"), ".2f")}-{_f(r.get("dispatch_vs_a2a_max"), ".2f")}',
             _f(r.get("a2a_gb_per_s_per_rank"), ".2f"),
             _f(r.get("layer_fwd_bwd_ms"), ",.1f")] for r in res["rows"]]
    head = [f"world {res.get('world_size')}, ep {res.get('ep')}, {res.get('backend')}, {res.get('dtype')}", ""]
    return head + _table(["shape", "tokens/rank", "bare a2a ms", "dispatch+combine ms", "time / bare a2a (>1 = slower)",
                          "range over rounds", "a2a GB/s/rank",
                          "layer fwd+bwd ms"], rows) + _goals(res)


def md_loader(res: dict) -> list[str]:
    tr = res.get("training") or {}
    out = [f"tiny training: {_f(tr.get('tokens_per_s'), ',.0f')} tokens/s "
           f"(micro_batch {tr.get('micro_batch')} x seq {tr.get('seq_len')})", ""]
    loader = sorted(res.get("loader") or [], key=lambda r: r["tokens_per_s"])
    rows = [[r["tokenizer"], r["seq_len"], r["micro_batch"], _f(r["us_per_batch"], ",.1f"),
             _f(r["tokens_per_s"] / 1e6, ",.1f"), _f(r["ratio_vs_training"], ",.0f")] for r in loader[:4]]
    out += _table(["tokenizer (slowest 4)", "seq", "batch", "us/batch", "M tokens/s", "x training"], rows)
    h100 = res.get("h100_consumption") or {}
    if res.get("streaming"):
        out += ["", f"streaming (hf:parquet stand-in, seq 2048 x 8) vs one H100 training {h100.get('preset')} at "
                    f"40% MFU: {_f(h100.get('tokens_per_s'), ',.0f')} tokens/s", ""]
        out += _table(["tokenizer", "workers", "tokens/s", "x H100 training"],
                      [[r["tokenizer"], f"{r['workers']}{' (oversubscribed)' if r.get('oversubscribed') else ''}",
                        _f(r["tokens_per_s"], ",.0f"), _f(r["ratio_vs_h100"], ".1f")] for r in res["streaming"]])
    return out + _goals(res)


def md_train(res: dict) -> list[str]:
    rows = []
    for r in res["rows"]:
        if r.get("status") != "ok":
            rows.append([r["layout"], r.get("world"), r.get("ep"), r.get("status"), "", "", "", "", "", "", ""])
            continue
        rows.append([r["layout"], r["world"], r["ep"], _f(r["tokens_per_s"], ",.0f"),
                     _f(r.get("speedup_vs_single"), ".2f"), _f(r.get("cpu_mfu"), ".1%"), _f(r["data_ms"]), _f(r["forward_ms"]),
                     _f(r["backward_ms"]), _f(r["optimizer_ms"]), _f(r["persistent_bytes"] / MiB, ".2f")])
    head = [f"tiny preset, global batch {res['micro_batch_b'] * 2} x 128, {res['steps']} steps "
            f"(median after {res['skip']}); phase ms from rank 0; persistent = params + grads + AdamW per rank; "
            f"CPU MFU = achieved FLOP/s over the measured fp32 matmul peak at the layout's threads", ""]
    return head + _table(["layout", "world", "ep", "tokens/s", "speed-up vs single", "CPU MFU", "data ms", "fwd ms",
                          "bwd ms", "opt ms", "persistent MiB/rank"], rows)


def md_peer(res: dict) -> list[str]:
    rows = [[r["impl"], _f(r["median_ms"]), _f(r.get("tokens_per_s"), ",.0f"),
             _f((r.get("peak_bytes") or 0) / MiB, ",.1f")] for r in res["rows"]]
    head = [f"preset {res.get('preset')}, {res.get('micro_batch')} x {res.get('seq_len')}, {res.get('dtype')}, "
            f"transformers {res.get('transformers')}", ""]
    return head + _table(["impl", "step ms", "tokens/s", "peak MiB"], rows) + _goals(res)


def md_titan(res: dict) -> list[str]:
    rows = [[r["impl"], _f(r["median_ms"]), _f(r.get("tokens_per_s"), ",.0f"),
             _f((r.get("peak_bytes") or 0) / MiB, ",.1f")] for r in res["rows"]]
    check = res.get("function_check") or {}
    head = [f"preset {res.get('preset')} ({res.get('layers')} layers), {res.get('micro_batch')} x {res.get('seq_len')}, "
            f"{res.get('dtype')}, torchtitan {res.get('torchtitan')}; speedup = median of {res.get('iters')} per-round "
            f"ratios: {_f(res.get('speedup_tokens_per_s'), '.3f')}x; same weights: logits differ by "
            f"{_f(check.get('logits_rms_rel_diff'), '.1e')} (RMS)", ""]
    return head + _table(["impl", "step ms", "tokens/s", "peak MiB"], rows) + _goals(res)


def md_memory(res: dict) -> list[str]:
    rows = [[r["preset"], r["world"], r["dp"], _f(r["params"] / MiB, ",.2f"), _f(r["grads"] / MiB, ",.2f"),
             _f(r["optimizer"] / MiB, ",.2f"), _f(r["persistent"] / MiB, ",.2f"),
             _f(r.get("ratio_to_ddp_over_world"), ".3f")] for r in res["rows"]]
    head = ["measured on rank 0 after one step: storages behind parameters, gradients and AdamW state", ""]
    return head + _table(["preset", "world", "dp", "params MiB", "grads MiB", "AdamW MiB", "total MiB",
                          "FSDP / (DDP/world)"], rows) + _goals(res)


def md_simulate(res: dict) -> list[str]:
    out = []
    for r in res["rows"]:
        sim, est = r["simulated"], r["estimate_cpu_kernels"]
        out += [f"{r['model']} @ {r['config']}: rank 0 of world {r['world']} ({r['dp']}, ep {r['ep']}, {r['precision']}), "
                f"simulated in {r['seconds']:.0f} s", ""]
        out += _table(["per rank at the peak", "simulated GiB", "estimate GiB"],
                      [[k, _f(sim[k] / GiB, ".2f"), _f(est[k] / GiB, ".2f")] for k in sim]) + [""]
    return out + _goals(res)


def md_ac(res: dict) -> list[str]:
    rows = [[r["shape"], r["policy"], _f(r["blocks_kept_bytes"] / MiB), _f(r["blocks_kept_fraction"], ".3f"),
             _f(r["blocks_time_ratio"], ".2f"), _f(r["step_time_ratio"], ".2f")]
            for r in res["rows"] if "blocks_kept_bytes" in r]
    reduced = [f"{name}: {s['reduction']}" for name, s in (res.get("shapes") or {}).items() if s.get("reduction")]
    head = [f"{res.get('dtype')}, fwd+bwd, median of {res.get('iters')}; the transformer blocks' part (the model "
            f"minus the model with its blocks skipped); times relative to none"
            + (f"; reduced: {'; '.join(reduced)}" if reduced else ""), ""]
    return head + _table(["shape", "policy", "saved MiB", "of none", "time ratio", "step ratio"], rows) + _goals(res)


def md_generate(res: dict) -> list[str]:
    c, r, b = res["cached"], res["recompute"], res["batched"]
    head = [f"{res['preset']} at {res['layers']} of {res['preset_layers']} layers, {res['prompt_tokens']} prompt + "
            f"{res['new_tokens']} new tokens, greedy, fp32, {res['threads']} threads; recompute timed at "
            f"{r['timed_steps']} steps, tokens equal to the cached run: {r['tokens_match']}", ""]
    rows = [["KV cache", 1, _f(c["prefill_s"], ".2f"), _f(c["decode_tokens_per_s"]), _f(res["decode_speedup"])],
            ["recompute", 1, "-", _f(r["tokens_per_s"], ".2f"), "1.0"],
            ["KV cache, ragged batch", b["rows"], _f(b["prefill_s"], ".2f"), _f(b["decode_tokens_per_s"]), "-"]]
    caches = [[x["preset"], x["attention"], _f(x["measured_bytes"], ".0f"), x["formula_bytes"], x["full_kv_bytes"],
               _f(x["compression"], ".2f")] for x in res["cache_bytes"] if x["dtype"] == "bfloat16"]
    return (head + _table(["method", "rows", "prefill s", "decode tokens/s", "speed-up vs recompute"], rows)
            + ["", "cache bytes per token per layer, bf16:", ""]
            + _table(["preset", "attention", "measured", "formula", "per-head K/V", "smaller by"], caches) + _goals(res))


def md_serve(res: dict) -> list[str]:
    rows = [[r["clients"], r["requests"], r["errors"], _f(r["requests_per_s"], ".2f"), _f(r["latency_p50_s"], ".2f"),
             _f(r["latency_p99_s"], ".2f"), _f(r["tokens_per_s"]), _f(r["tokens_per_s_vs_single"], ".2f")]
            for r in res["rows"]]
    head = [f"{res.get('checkpoint')}, {res.get('requests_per_client')} requests per client, "
            f"{res.get('max_tokens')} new tokens each", ""]
    return head + _table(["clients", "requests", "errors", "req/s", "p50 s", "p99 s", "tokens/s", "tokens/s vs 1 client"],
                         rows) + _goals(res)


def md_checkpoint(res: dict) -> list[str]:
    saves = [[r["kind"], _f(r["blocked_s"], ".3f"), _f(r["committed_s"], ".3f")] for r in res["saves"]]
    resume = [[r["layout"], _f(r["peak_rss_max"] / MiB, ",.0f"), _f(r["private_max"] / MiB), _f(r["mapped_max"] / MiB),
               _f(r["private_of_file"], ".3f")] for r in res["resume"]]
    s = res["startup"]
    file_mib = res["resume"][0]["file_bytes"] / MiB
    return (["save at world 2 (FSDP2): seconds training is held, and until committed", ""]
            + _table(["kind", "blocked s", "committed s"], saves)
            + ["", f"resume from one {file_mib:,.0f} MiB file at world 4: most any rank adds", ""]
            + _table(["layout", "peak RSS MiB", "private MiB", "mapped MiB", "private / file"], resume)
            + ["", f"start-up peak RSS per rank, expert-heavy model: world 1 {s['world1_peak'] / MiB:,.0f} MiB, "
                   f"world 4 ep 4 {s['world4_ep4_peak_max'] / MiB:,.0f} MiB ({s['ratio']:.3f}x)"] + _goals(res))


def md_loss(res: dict) -> list[str]:
    rows = [[r["dtype"], _f(r["unchunked_loss_kept_bytes"] / MiB), _f(r["chunked_loss_kept_bytes"] / MiB),
             _f(r["loss_kept_ratio"], ".3f"), _f(r["unchunked_model_kept_bytes"] / MiB),
             _f(r["chunked_model_kept_bytes"] / MiB), _f(r["time_ratio"], ".2f")] for r in res["rows"]]
    head = [f"{res['preset']} at {res['n_layers']} layers, {res['micro_batch']} x {res['seq_len']} tokens; kept = "
            "bytes saved for backward; time = chunked / unchunked fwd+bwd", ""]
    return head + _table(["dtype", "loss MiB unchunked", "chunked", "ratio", "model MiB unchunked", "chunked",
                          "time ratio"], rows) + _goals(res)


def md_profile(res: dict) -> list[str]:
    rows = res["rows"]
    head = [f"{res.get('dtype')}, {res.get('batch')} x {res.get('seq_len')} tokens, {rows[0]['n_layers']} layers, "
            f"{res.get('threads')} thread(s), self time per category over {res.get('steps')} steps", ""]
    table = [[c, *(_f(r["share"][c], ".1%") for r in rows)] for c in res["categories"]]
    table.append(["step ms", *(_f(r["step_ms"]) for r in rows)])
    return head + _table(["category", *(r["shape"] for r in rows)], table)


def md_expert_dtype(res: dict) -> list[str]:
    head = [f"{res.get('shape')} ({res.get('n_layers')} layers), {res.get('batch')} x {res.get('seq_len')} tokens, "
            f"bf16 experts {_f(res.get('speedup_bf16_experts'), '.2f')}x fp32 (median of per-step ratios); relative "
            f"loss difference at step 1 {_f(res.get('loss_rel_diff_step1'), '.1e')}, largest "
            f"{_f(res.get('loss_max_rel_diff'), '.1e')}", ""]
    return head + _table(["way", "ms / step", "tokens/s"],
                         [[r["way"], _f(r["median_ms"]), _f(r["tokens_per_s"], ",.0f")] for r in res["rows"]])


def md_compile(res: dict) -> list[str]:
    rows = [[r["way"], _f(r["median_ms"]), _f(r["tokens_per_s"], ",.0f")] for r in res["rows"]]
    head = [f"{res['preset']} at {res['n_layers']} layers, {res['micro_batch']} x {res['seq_len']}, {res['dtype']}; "
            f"compiled / eager tokens/s {res['speedup_compiled_vs_eager']:.2f}x; compile {res['compile_s']:.0f} s; "
            f"max loss difference {res['loss_max_rel_diff']:.1e}", ""]
    return head + _table(["way", "ms / step", "tokens/s"], rows) + _goals(res)


RENDER = {"moe_dispatch": md_moe, "moe_dispatch_ep2": md_ep, "data_loader": md_loader,
          "train_throughput": md_train, "memory_layouts": md_memory, "simulate": md_simulate,
          "activation_checkpointing": md_ac,
          "loss_memory": md_loss, "profile_step": md_profile, "expert_dtype": md_expert_dtype,
          "compile_speed": md_compile,
          "peer_hf": md_peer, "peer_torchtitan": md_titan, "generate": md_generate, "serve_load": md_serve,
          "checkpoint_io": md_checkpoint}


def markdown(combined: dict) -> str:
    out = [f"# dsmoe benchmarks: {combined['device']}, {combined['date']}", "",
           f"torch {combined['torch']}, {combined['host_cpu_count']} CPU cores, "
           f"{'--quick' if combined['quick'] else 'full'} presets, suite wall time {combined['wall_s']:.0f} s", ""]
    out += _table(["benchmark", "status", "wall s", "goals"],
                  [[s["key"], s["status"], _f(s["wall_s"]), _goal_summary(combined["results"].get(s["key"]))]
                   for s in combined["steps"]])
    for s in combined["steps"]:
        out += ["", f"## {s['title']}", ""]
        res = combined["results"].get(s["key"])
        if res is None:
            out.append(f"_{s['status']}_ (rc {s['returncode']}): no results." if s["status"] != "skipped"
                       else "_skipped_: " + ((s.get("output_tail") or "").strip().splitlines() or ["-"])[-1])
            continue
        try:
            out += RENDER[s["key"]](res)
        except (KeyError, TypeError, ValueError) as e:  # a format change in one benchmark's JSON
            out.append(f"_could not summarise {s['result_file']}: {e!r}_")
    if combined.get("plots"):
        out += ["", "## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in combined["plots"]]
    return "\n".join(out) + "\n"


def _goal_summary(res) -> str:
    if not res or not res.get("goals"):
        return "-"
    goals = [g for g in res["goals"] if g.get("met") is not None]
    met = sum(1 for g in goals if g["met"])
    return f"{met}/{len(goals)} met"


# ---------------------------------------------------------------- plots

def plots(combined: dict, stem: str) -> list[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("suite: matplotlib is not installed: no plots (pip install matplotlib)")
        return []
    written = []
    res = combined["results"]

    def save(fig, suffix):
        path = RESULTS_DIR / f"{stem}-{suffix}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(str(path.relative_to(REPO_ROOT)))

    if "moe_dispatch" in res:
        rows = res["moe_dispatch"]["rows"]
        shapes = list(dict.fromkeys(r["shape"] for r in rows))
        impls = list(dict.fromkeys(r["impl"] for r in rows))
        fig, ax = plt.subplots(figsize=(7, 4))
        w = 0.8 / len(impls)
        for j, impl in enumerate(impls):
            vals = [next((r["median_ms"] for r in rows if r["shape"] == s and r["impl"] == impl), 0) for s in shapes]
            ax.bar([i + j * w for i in range(len(shapes))], vals, w, label=impl)
        ax.set_xticks([i + w * (len(impls) - 1) / 2 for i in range(len(shapes))], shapes)
        ax.set_ylabel("ms (fwd+bwd)")
        ax.set_title(f"MoE layer, {res['moe_dispatch'].get('tokens')} tokens, {combined['device']}")
        ax.legend()
        save(fig, "moe_layer")
    if "moe_dispatch_ep2" in res:
        rows = res["moe_dispatch_ep2"]["rows"]
        labels = [f"{r['shape']}\n{r['tokens_per_rank']} tok/rank" for r in rows]
        fig, ax = plt.subplots(figsize=(7, 4))
        xs = range(len(rows))
        ax.bar([x - 0.2 for x in xs], [r["a2a_ms"] for r in rows], 0.4, label="bare all-to-all (x2)")
        ax.bar([x + 0.2 for x in xs], [r["dispatch_combine_ms"] for r in rows], 0.4, label="dispatch + combine")
        ax.set_xticks(list(xs), labels)
        ax.set_ylabel("ms")
        ax.set_title(f"EP dispatch vs all-to-all, world {res['moe_dispatch_ep2'].get('world_size')}")
        ax.legend()
        save(fig, "dispatch_vs_a2a")
    if "train_throughput" in res:
        rows = res["train_throughput"]["rows"]
        fig, ax = plt.subplots(figsize=(7, 4))
        names = [r["layout"] for r in rows]
        vals = [r.get("tokens_per_s") or 0 for r in rows]
        bars = ax.bar(names, vals)
        for b, r in zip(bars, rows):
            if r.get("status") != "ok":
                ax.text(b.get_x() + b.get_width() / 2, 0, r.get("status"), ha="center", va="bottom", rotation=90)
        ax.set_ylabel("tokens/s")
        ax.set_title("Training throughput, tiny preset, CPU")
        save(fig, "train_throughput")
    if "memory_layouts" in res:
        rows = res["memory_layouts"]["rows"]
        presets = list(dict.fromkeys(r["preset"] for r in rows))
        fig, axes = plt.subplots(1, len(presets), figsize=(5 * len(presets), 4), squeeze=False)
        for ax, preset in zip(axes[0], presets):
            mine = [r for r in rows if r["preset"] == preset]
            ax.bar([f"{r['dp']}\nworld {r['world']}" for r in mine], [r["persistent"] / MiB for r in mine])
            ax.set_ylabel("MiB per rank (params + grads + AdamW)")
            ax.set_title(preset)
        fig.suptitle(f"Persistent memory per rank, {combined['device']}")
        save(fig, "memory_layouts")
    if "activation_checkpointing" in res:
        rows = [r for r in res["activation_checkpointing"]["rows"] if "blocks_kept_bytes" in r]
        names = list(dict.fromkeys(r["shape"] for r in rows))
        fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False)
        for ax, name in zip(axes[0], names):
            for r in (r for r in rows if r["shape"] == name):
                ax.scatter(r["blocks_kept_fraction"], r["blocks_time_ratio"])
                ax.annotate(r["policy"], (r["blocks_kept_fraction"], r["blocks_time_ratio"]),
                            textcoords="offset points", xytext=(4, 4), fontsize=8)
            ax.set_xlabel("activation bytes kept (fraction of none)")
            ax.set_ylabel("block time (ratio to none)")
            ax.set_title(name)
        fig.suptitle(f"Activation checkpointing, {combined['device']}")
        save(fig, "activation_checkpointing")
    return written


# ---------------------------------------------------------------- main

def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = device_name(device)
    devices = list(dict.fromkeys([dev, device_name("cpu")]))
    date = _dt.date.today().isoformat()
    todo = [s for s in steps(args.quick) if not args.only or s["key"] in args.only]
    log = [run_step(s, args.timeout, devices, date) for s in todo]
    results = {}
    for s in log:
        if s["result_file"]:
            results[s["key"]] = json.loads((REPO_ROOT / s["result_file"]).read_text())
    combined = {"suite": "dsmoe-bench", "device": dev, "device_type": device, "date": date,
                "torch": torch.__version__, "host_cpu_count": os.cpu_count(), "quick": args.quick,
                "wall_s": time.perf_counter() - t0, "steps": log, "results": results, "plots": []}
    stem = f"{dev}-{date}"
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    if not args.no_plots:
        combined["plots"] = plots(combined, stem)
    combined["wall_s"] = round(time.perf_counter() - t0, 1)
    json_path = RESULTS_DIR / f"{stem}.json"
    json_path.write_text(json.dumps(combined, indent=2, default=str) + "\n")
    md = markdown(combined)
    md_path = RESULTS_DIR / f"{stem}.md"
    md_path.write_text(md)
    print("\n" + md)
    print(f"wrote {json_path.relative_to(REPO_ROOT)}, {md_path.relative_to(REPO_ROOT)}"
          + "".join(f", {p}" for p in combined["plots"]))
    return 0 if all(s["status"] in ("ok", "skipped") for s in log) else 1


if __name__ == "__main__":
    sys.exit(main())
