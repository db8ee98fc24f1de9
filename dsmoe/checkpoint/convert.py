"""Convert between a sharded checkpoint directory and a single-file checkpoint, both ways.

    python -m dsmoe.checkpoint.convert runs/x/checkpoints/step_0000100 ckpt.pt     # sharded -> one file
    python -m dsmoe.checkpoint.convert ckpt.pt runs/x/checkpoints/step_0000100     # one file -> sharded
    python -m dsmoe.checkpoint.convert auto ckpt.pt --run-dir runs/x                 # the run's newest

One process, no GPU, no process group; it holds the whole model and optimizer state in host memory.
Either result resumes at any layout: `torchrun ... launch/train_ddp.py --resume ckpt.pt` continues an
FSDP2 run, and `launch/train_fsdp.py --resume DIR` a DDP one. The source is verified first (its
checksum or manifest); nothing is written from a checkpoint that fails.

DCP's format_utils (dcp_to_torch_save / torch_save_to_dcp) convert DCP's own keys one to one; a dsmoe
file keys the optimizer state by parameter index (what optimizer.load_state_dict takes), carries
meta.pt's contents beside the tensors, and is read with weights_only (torch_save_to_dcp unpickles
anything): hence the mapping below.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from dsmoe.checkpoint.file import CheckpointDamaged, CheckpointError, is_sharded, load_checkpoint, save_checkpoint
from dsmoe.checkpoint.resolve import resolve
from dsmoe.checkpoint.sharded import (commit, load_meta, load_shards, read_metadata, sharded_problem, staging_dir,
                                      write_meta, write_shards)


def read_all(path: Path, prefix: str = "") -> dict:
    """Every tensor of a sharded directory whose key starts with `prefix`, whole, into this process
    (no process group needed)."""
    metadata = read_metadata(path).state_dict_metadata
    tensors = {key: torch.empty(m.size, dtype=m.properties.dtype)
               for key, m in metadata.items() if hasattr(m, "size") and key.startswith(prefix)}
    load_shards(tensors, path)
    return tensors


def param_order(cfg_dict: dict, vocab_size: int) -> tuple[list[str], list[str]]:
    """Parameter names in optimizer order, decayed then not (index i of a single-file optimizer state)."""
    from dsmoe.config import from_dict
    from dsmoe.model import Transformer
    from dsmoe.train.optim import decay_split  # the optimizer's own rule (lazy: only conversions need it)

    with torch.device("meta"):
        model = Transformer(from_dict(cfg_dict), vocab_size)
    return decay_split(model)


def to_file_state(path: Path, optimizer: bool = True) -> dict:
    """A sharded directory as the state of a single-file checkpoint (what `save_checkpoint` takes);
    without `optimizer`, the model tensors only (what inference reads)."""
    meta = load_meta(path)
    found = sharded_problem(path, meta)
    if found:
        raise CheckpointDamaged(f"checkpoint '{path}' fails verification: {found}")
    state = {k: v for k, v in meta.items() if k != "format"}
    tensors = read_all(path, "" if optimizer else "model.")
    state["model"] = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    if not optimizer:
        return state
    from dsmoe.config import from_dict
    from dsmoe.train.optim import param_groups_layout

    decay, no_decay = param_order(meta["config"], int(meta["data"]["vocab_size"]))
    index = {n: i for i, n in enumerate(decay + no_decay)}
    optim_state: dict = {}
    for key, v in tensors.items():
        if key.startswith("optimizer."):
            name, state_key = key[len("optimizer."):].rsplit(".", 1)
            optim_state.setdefault(index[name], {})[state_key] = v
    groups = param_groups_layout(len(decay), len(no_decay), from_dict(meta["config"]).train)
    state["optimizer"] = {"state": dict(sorted(optim_state.items())), "param_groups": groups}
    return state


def from_file_state(state: dict) -> tuple[dict, dict]:
    """A single-file checkpoint's state as (tensors, meta) for a sharded directory."""
    decay, no_decay = param_order(state["config"], int(state["data"]["vocab_size"]))
    order = decay + no_decay
    tensors = {f"model.{k}": v for k, v in state["model"].items()}
    for i, per_param in state["optimizer"]["state"].items():
        for key, v in per_param.items():
            tensors[f"optimizer.{order[int(i)]}.{key}"] = v
    meta = {k: v for k, v in state.items() if k not in ("model", "optimizer", "format", "checksum")}
    return tensors, meta


def save_unsharded_as_sharded(state: dict, path: Path) -> Path:
    """One process writes a single-file checkpoint's state as a sharded directory."""
    tensors, meta = from_file_state(state)
    tmp = staging_dir(path)
    write_shards(tensors, tmp, None)
    write_meta(meta, tmp)
    commit(tmp, path)
    return path


def convert(src: str | Path, dst: str | Path, run_dir: str | Path = ".") -> Path:
    """Write checkpoint `src` (a path, or `auto`: the newest in `run_dir`) as the other format at `dst`.
    Raises CheckpointError for a missing, damaged or foreign source, or an existing destination."""
    src, dst = resolve(str(src), run_dir, flag="SRC"), Path(dst)
    if dst.exists():
        raise CheckpointError(f"'{dst}' exists: choose a new destination (nothing is overwritten)")
    if is_sharded(src):
        return save_checkpoint(to_file_state(src), dst)
    return save_unsharded_as_sharded(load_checkpoint(src), dst)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="a sharded checkpoint directory or a .pt file, or auto (the newest in --run-dir)")
    parser.add_argument("dst", help="the other kind, written atomically")
    parser.add_argument("--run-dir", default=".", help="the run directory whose newest checkpoint `auto` takes")
    args = parser.parse_args(argv)
    try:
        out = convert(args.src, args.dst, args.run_dir)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
