"""Convert between a sharded checkpoint directory and a single-file checkpoint, both ways.

    python -m dsmoe.train.convert runs/x/checkpoints/step_0000100 ckpt.pt     # sharded -> one file
    python -m dsmoe.train.convert ckpt.pt runs/x/checkpoints/step_0000100     # one file -> sharded

One process, no GPU, no process group; it holds the whole model and optimizer state in host memory.
Either result resumes at any layout: `torchrun ... launch/train_ddp.py --resume ckpt.pt` continues an
FSDP2 run, and `launch/train_fsdp.py --resume DIR` a DDP one.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dsmoe.train.checkpoint import CheckpointError, is_sharded, load_checkpoint, save_checkpoint
from dsmoe.train.sharded_checkpoint import save_unsharded_as_sharded, to_file_state


def convert(src: str | Path, dst: str | Path) -> Path:
    src, dst = Path(src), Path(dst)
    if not src.exists():
        raise CheckpointError(f"'{src}' does not exist: pass a step_N.pt file or a step_N/ directory")
    if dst.exists():
        raise CheckpointError(f"'{dst}' exists: choose a new destination (nothing is overwritten)")
    if is_sharded(src):
        return save_checkpoint(to_file_state(src), dst)
    return save_unsharded_as_sharded(load_checkpoint(src), dst)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="a sharded checkpoint directory or a .pt file")
    parser.add_argument("dst", help="the other kind, written atomically")
    args = parser.parse_args(argv)
    try:
        out = convert(args.src, args.dst)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
