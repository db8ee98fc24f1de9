"""Load on the OpenAI-compatible server: N concurrent clients x M requests each, on loopback, against one
client alone; requests/s, latency percentiles, aggregate generated tokens/s and errors. Then the
inter-token latency of short streams with and without a concurrent max-length prompt, with whole-prompt
prefill and with chunked prefill.

    python benchmarks/serve_load.py --quick                # clients 1 and 4, 4 requests each, 32 tokens
    python benchmarks/serve_load.py                        # clients 1, 4 and 16, 8 requests each, 64 tokens
    python benchmarks/serve_load.py --ckpt auto --run-dir runs/tiny-shakespeare --clients 1 8 32
    python benchmarks/serve_load.py --itl-only --device cuda   # only the inter-token latency part

The server is `launch/serve.py` in a child process (its own interpreter, as deployed), bound to
127.0.0.1 on a free port, with --max-batch equal to the most clients, so every client's request can
be decoded in the same batch. Without --ckpt the benchmark trains the `tiny` preset for 2 steps on the
bundled corpus into a temporary run directory and serves that. Each client is a thread with its own
HTTP session sending its requests one after another (non-streaming `POST /v1/completions`,
temperature 0.8, a seed per request, `max_tokens` fixed); a scenario ends when every client is done
or after --timeout seconds (unfinished requests count as errors). Tokens are the server's
`usage.completion_tokens`. The ratio compares aggregate tokens/s at N clients with one client.

Inter-token latency: --streams streaming clients (default 4) each generate --itl-tokens tokens (ASCII
only and no end-of-text, through logit_bias, so every token is one streamed chunk); the gaps between
chunks, all streams pooled, give p50/p99. "With long prompt": meanwhile one more client sends a prompt of
the whole context minus one token (max_tokens 1), again and again. Each runs against a server with
--prefill-chunk 0 (the whole prompt prefilled in one step) and one with --prefill-chunk N (default 64):
chunking bounds what a long prompt adds to a step, so its p99 with the long prompt stays near the p99
without. The trained checkpoint has a 1024-token context for this (its RoPE tables reach that far).

Goals: no errors at any concurrency; with chunked prefill, p99 inter-token latency with the long prompt
at most 2x the p99 without. Results: benchmarks/results/serve_load[-quick]-<device>-<date>.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `python benchmarks/serve_load.py` without installing dsmoe
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.common import device_name, print_table, write_results  # noqa: E402

PROMPTS = ["ROMEO:", "JULIET:", "KING HENRY:", "First Citizen:\nBefore we proceed any further, hear me speak."]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="clients 1 and 4, 4 requests each, 32 tokens")
    p.add_argument("--clients", type=int, nargs="+", default=None, help="concurrency levels (1 is always run)")
    p.add_argument("--requests", type=int, default=None, help="requests per client")
    p.add_argument("--max-tokens", type=int, default=None, help="new tokens per request")
    p.add_argument("--ckpt", default=None, help="checkpoint to serve, or 'auto' with --run-dir (default: train tiny)")
    p.add_argument("--run-dir", default="runs/tiny-shakespeare")
    p.add_argument("--timeout", type=float, default=300, help="seconds per scenario before it is cut off")
    p.add_argument("--server-threads", type=int, default=None, help="OMP_NUM_THREADS of the server process")
    p.add_argument("--streams", type=int, default=4, help="inter-token latency: short streams at once")
    p.add_argument("--itl-tokens", type=int, default=None, help="inter-token latency: tokens per stream")
    p.add_argument("--prefill-chunk", type=int, default=64, help="inter-token latency: the chunked server's chunk")
    p.add_argument("--itl-only", action="store_true", help="skip the throughput scenarios")
    p.add_argument("--device", default="auto", help="the server's --device")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    args.clients = sorted({1, *(args.clients or ([4] if args.quick else [4, 16]))})
    args.requests = args.requests or (4 if args.quick else 8)
    args.max_tokens = args.max_tokens or (32 if args.quick else 64)
    args.itl_tokens = args.itl_tokens or (48 if args.quick else 128)
    return args


def train_tiny(run_dir: Path) -> str:
    """The tiny preset after 2 optimizer steps (byte tokenizer), saved by the trainer's own writer."""
    from dsmoe.config import CONFIG_ROOT, load_config
    from dsmoe.checkpoint.file import latest_checkpoint
    from dsmoe.train.trainer import Trainer

    cfg = load_config(CONFIG_ROOT / "models" / "tiny.yaml",
                      ["--train.steps=2", "--model.max_seq_len=1024", "--train.micro_batch=2",
                       "--train.seq_len=64", "--train.eval_every=0",
                       "--train.sample_every=0", "--log.rich=off", "--train.device=cpu", f"--run.dir={run_dir}",
                       f"--data.cache_dir={run_dir.parent / 'data-cache'}"])
    Trainer(cfg).fit()
    return str(latest_checkpoint(run_dir))


def scenario(url: str, clients: int, requests_each: int, max_tokens: int, timeout: float) -> dict:
    """`clients` threads, each sending `requests_each` requests in turn; latencies, tokens and errors."""
    import requests

    latencies, tokens, errors = [], [], []
    lock = threading.Lock()
    stop_at = time.monotonic() + timeout

    def client(c: int) -> None:
        with requests.Session() as http:
            for i in range(requests_each):
                left = stop_at - time.monotonic()
                if left <= 0:
                    with lock:
                        errors.append("cut off by --timeout")
                    continue
                body = {"prompt": PROMPTS[(c + i) % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 0.8,
                        "seed": 1000 * c + i}
                t0 = time.perf_counter()
                try:
                    r = http.post(f"{url}/v1/completions", json=body, timeout=left)
                    ok = r.status_code == 200
                    n = r.json()["usage"]["completion_tokens"] if ok else 0
                except Exception as e:  # any failure is an error of the run, recorded, not raised
                    ok, n, r = False, 0, e
                with lock:
                    if ok:
                        latencies.append(time.perf_counter() - t0)
                        tokens.append(n)
                    else:
                        errors.append(str(getattr(r, "text", r))[:200])

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = sorted(latencies) or [float("nan")]
    return {"clients": clients, "requests": clients * requests_each, "completed": len(latencies),
            "errors": len(errors), "error_samples": errors[:3], "wall_s": wall,
            "requests_per_s": len(latencies) / wall, "tokens": sum(tokens), "tokens_per_s": sum(tokens) / wall,
            "latency_p50_s": statistics.median(lat), "latency_p99_s": lat[min(len(lat) - 1, int(0.99 * len(lat)))],
            "latency_mean_s": statistics.fmean(lat)}


def itl_scenario(url: str, streams: int, tokens: int, context: int, with_long: bool, timeout: float) -> dict:
    """Gaps between streamed tokens of `streams` concurrent streams, with or without a client sending
    max-length prompts meanwhile; p50/p99 in seconds, long prompts served, errors."""
    import requests

    ascii_only = {str(t): -100 for t in range(128, 257)}  # no multi-byte characters, no end-of-text
    gaps, errors, longs = [], [], []
    lock, done = threading.Lock(), threading.Event()

    def stream(c: int) -> None:
        body = {"prompt": PROMPTS[c % len(PROMPTS)], "max_tokens": tokens, "temperature": 0.8, "seed": c,
                "stream": True, "logit_bias": ascii_only}
        mine, last = [], None
        try:
            with requests.post(f"{url}/v1/completions", json=body, stream=True, timeout=timeout) as r:
                for line in r.iter_lines():
                    if not line.startswith(b"data: {"):
                        continue
                    now = time.perf_counter()
                    event = json.loads(line[6:])
                    if "error" in event:
                        raise RuntimeError(event["error"]["message"])
                    if event["choices"] and event["choices"][0]["text"]:
                        if last is not None:
                            mine.append(now - last)
                        last = now
        except Exception as e:  # recorded, not raised: a benchmark reports its errors
            with lock:
                errors.append(str(e)[:200])
        with lock:
            gaps.extend(mine)

    def long_prompts() -> None:
        with requests.Session() as http:
            while not done.is_set():
                r = http.post(f"{url}/v1/completions", json={"prompt": [97] * (context - 1), "max_tokens": 1},
                              timeout=timeout)
                (longs if r.status_code == 200 else errors).append(r.status_code)

    threads = [threading.Thread(target=stream, args=(c,)) for c in range(streams)]
    feeder = threading.Thread(target=long_prompts) if with_long else None
    if feeder:
        feeder.start()
        time.sleep(0.2)  # the first long prompt is being prefilled when the streams start
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    if feeder:
        feeder.join()
    g = sorted(gaps) or [float("nan")]
    return {"long_prompt": with_long, "streams": streams, "tokens": tokens, "gaps": len(gaps),
            "itl_p50_s": statistics.median(g), "itl_p99_s": g[min(len(g) - 1, int(0.99 * len(g)))],
            "long_prompts_served": len(longs), "errors": len(errors), "error_samples": errors[:3]}


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import requests  # noqa: F401

        import dsmoe.infer.server  # noqa: F401  (fastapi, uvicorn)
    except ImportError as e:
        print(f"serve_load: {e.name} is not installed: pip install -e \".[serve]\" requests. Skipped.")
        return 0
    from dsmoe.infer.process import served

    import torch

    env = {"OMP_NUM_THREADS": str(args.server_threads)} if args.server_threads else None
    device = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    rows, itl = [], []
    with tempfile.TemporaryDirectory(prefix="dsmoe-serve-load-") as tmp:
        ckpt = args.ckpt or train_tiny(Path(tmp) / "run")
        extra = ["--run-dir", args.run_dir] if args.ckpt == "auto" else []
        common_args = ["--max-batch", str(max(*args.clients, args.streams + 1)), "--device", args.device, *extra]
        if not args.itl_only:
            with served(ckpt, *common_args, env=env) as url:
                scenario(url, 1, 1, 4, args.timeout)  # warm-up
                rows = [scenario(url, n, args.requests, args.max_tokens, args.timeout) for n in args.clients]
        for chunk in (0, args.prefill_chunk):
            with served(ckpt, *common_args, "--prefill-chunk", str(chunk), env=env) as url:
                import requests

                context = requests.get(f"{url}/v1/models", timeout=30).json()["data"][0]["max_model_len"]
                itl_scenario(url, 1, 4, context, False, args.timeout)  # warm-up
                for with_long in (False, True):
                    itl.append({"prefill_chunk": chunk, "context": context,
                                **itl_scenario(url, args.streams, args.itl_tokens, context, with_long, args.timeout)})
    payload = {"device_type": device, "quick": args.quick, "checkpoint": args.ckpt or "tiny, 2 training steps",
               "requests_per_client": args.requests, "max_tokens": args.max_tokens,
               "server_threads": args.server_threads, "rows": rows, "inter_token_latency": itl, "goals": []}
    if rows:
        single = rows[0]["tokens_per_s"]
        for r in rows:
            r["tokens_per_s_vs_single"] = r["tokens_per_s"] / single if single else None
        print_table(f"Serving on loopback: {args.requests} requests per client, {args.max_tokens} new tokens each, "
                    f"{device_name(device)}",
                    ["clients", "requests", "errors", "req/s", "p50 s", "p99 s", "tokens/s", "tokens/s vs 1 client"],
                    [[r["clients"], r["requests"], r["errors"], f"{r['requests_per_s']:.2f}",
                      f"{r['latency_p50_s']:.2f}", f"{r['latency_p99_s']:.2f}", f"{r['tokens_per_s']:.1f}",
                      f"{r['tokens_per_s_vs_single']:.2f}x"] for r in rows])
        errors = sum(r["errors"] for r in rows)
        payload["goals"].append({"goal": "no errors under load", "shape": f"up to {max(args.clients)} clients",
                                 "value": errors, "target": 0, "met": errors == 0})
    print_table(f"Inter-token latency: {args.streams} streams x {args.itl_tokens} tokens, with and without a "
                f"concurrent max-length prompt, {device_name(device)}",
                ["prefill chunk", "long prompt", "p50 ms", "p99 ms", "long prompts", "errors"],
                [[r["prefill_chunk"] or "whole", "yes" if r["long_prompt"] else "no", f"{1e3 * r['itl_p50_s']:.1f}",
                  f"{1e3 * r['itl_p99_s']:.1f}", r["long_prompts_served"], r["errors"]] for r in itl])
    chunked = {r["long_prompt"]: r["itl_p99_s"] for r in itl if r["prefill_chunk"]}
    ratio = chunked[True] / chunked[False]
    payload["goals"].append({"goal": "a max-length prompt barely delays other streams (chunked prefill)",
                             "shape": f"p99 inter-token latency with / without, chunk {args.prefill_chunk}",
                             "value": ratio, "target": 2.0, "met": ratio <= 2.0})
    whole = {r["long_prompt"]: r["itl_p99_s"] for r in itl if not r["prefill_chunk"]}
    print(f"p99 inter-token latency with a max-length prompt / without: whole-prompt prefill "
          f"{whole[True] / whole[False]:.2f}x, chunk {args.prefill_chunk} {ratio:.2f}x")
    errors = sum(r["errors"] for r in rows + itl)
    if not args.no_save:
        path = write_results("serve_load-quick" if args.quick else "serve_load", payload, device=device)
        print(f"wrote {path.relative_to(REPO_ROOT)}")
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
