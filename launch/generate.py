"""Complete a prompt with a trained checkpoint.

    python launch/generate.py --ckpt runs/tiny-shakespeare/checkpoints/step_0000300.pt --prompt "ROMEO:"
    python launch/generate.py --ckpt auto --run-dir runs/tiny-shakespeare --prompt "JULIET:" --tokens 200 --temperature 0.7
"""
import argparse
import sys

import common  # noqa: F401  (puts the checkout on sys.path)

from dsmoe.train.checkpoint import CheckpointError
from dsmoe.train.generate import generate_from_checkpoint


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint file, or 'auto' for the newest in --run-dir")
    p.add_argument("--run-dir", default="runs/tiny-shakespeare")
    p.add_argument("--prompt", default="ROMEO:")
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    try:
        text = generate_from_checkpoint(args.ckpt, args.prompt, run_dir=args.run_dir, max_new_tokens=args.tokens,
                                        temperature=args.temperature, top_k=args.top_k, seed=args.seed,
                                        device=args.device)
    except (CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(args.prompt + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
