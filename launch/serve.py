"""Serve a checkpoint over an OpenAI-compatible HTTP API, with a web page to try it.

    pip install -e ".[serve]"                                    # FastAPI + uvicorn
    python launch/serve.py --ckpt auto --run-dir runs/tiny-shakespeare          # http://127.0.0.1:8000/
    python launch/serve.py --ckpt runs/tiny-shakespeare/checkpoints/step_0000300.pt --port 8080 --max-batch 32

    curl -s http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"prompt": "ROMEO:", "max_tokens": 64, "temperature": 0.8, "seed": 1}'
    curl -sN http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"prompt": "JULIET:", "max_tokens": 64, "stream": true}'
    curl -s http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"messages": [{"role": "user", "content": "Who art thou?"}], "max_tokens": 32}'
    curl -s http://127.0.0.1:8000/v1/models;  curl -s http://127.0.0.1:8000/health

Requests in flight are decoded together (up to --max-batch rows; the rest wait and join between decode
steps); prompts are prefilled --prefill-chunk tokens per step. Port 0 takes a free port; the line
"serving ... on http://HOST:PORT" says which, printed once the socket listens. There is no
authentication: keep the default loopback host unless the network is trusted.
"""
import argparse
import socket
import sys

import common  # noqa: F401  (puts the checkout on sys.path)

from dsmoe.infer import Batch
from dsmoe.checkpoint import CheckpointError, resolve
from dsmoe.checkpoint.load import load_model


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint file or sharded directory, or 'auto' for the newest in --run-dir")
    p.add_argument("--run-dir", default="runs/tiny-shakespeare")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 = any free port")
    p.add_argument("--max-batch", type=int, default=16, help="requests decoded together (KV-cache rows)")
    p.add_argument("--prefill-chunk", type=int, default=512,
                   help="prompt tokens prefilled per decode step: a long prompt delays the other requests by one "
                        "chunk per step, not its whole prefill (0 = whole prompts at once)")
    p.add_argument("--max-waiting", type=int, default=256, help="queued requests beyond which new ones get 503")
    p.add_argument("--name", default=None, help="model id in the API (default: the preset name)")
    p.add_argument("--device", default="auto")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import uvicorn

        from dsmoe.infer.server import create_app
    except ImportError as e:
        print(f"error: {e.name} is not installed: pip install -e \".[serve]\"", file=sys.stderr)
        return 2
    try:
        path = resolve(args.ckpt, args.run_dir)
        print(f"checkpoint: {path}" + (f" (the newest in {args.run_dir})" if args.ckpt == "auto" else ""), flush=True)
        model, tok, cfg = load_model(str(path), args.run_dir, args.device)
        batch = Batch(model, args.max_batch, tokenizer=tok, prefill_chunk=args.prefill_chunk or None)
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    name = args.name or cfg.model.name
    app = create_app(batch, name, args.max_waiting)
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as e:
        print(f"error: cannot listen on {args.host}:{args.port} ({e.strerror}): pick another --port (0 = any free one)",
              file=sys.stderr)
        return 2
    sock.listen(2048)  # listening before the address is printed: a client reading it can connect at once
    host, port = sock.getsockname()[:2]
    print(f"serving {name} on http://{host}:{port}/ (max batch {args.max_batch}, {batch.device})", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
