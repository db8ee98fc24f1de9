"""A checkpoint's model and tokenizer, ready to generate (single files and sharded directories alike)."""
from __future__ import annotations

from pathlib import Path

from dsmoe.config import Config, from_dict
from dsmoe.data import get_tokenizer
from dsmoe.data.tokenizer import Tokenizer
from dsmoe.model import Transformer
from dsmoe.parallel.mesh import pick_device
from dsmoe.train.checkpoint import CheckpointError, checkpoint_dir, is_sharded, latest_checkpoint, load_checkpoint
from dsmoe.train.sharded_checkpoint import to_file_state


def resolve_checkpoint(ckpt: str, run_dir: str | Path = ".") -> Path:
    """`auto` -> the newest complete checkpoint in `run_dir`/checkpoints; otherwise the path given.
    Raises CheckpointError (naming the newest checkpoint there, if any) when there is none."""
    if ckpt == "auto":
        path = latest_checkpoint(run_dir)
        if path is None:
            raise CheckpointError(f"no checkpoint in {checkpoint_dir(run_dir)}: train first (make train), "
                                  f"point --run-dir at a run directory, or pass --ckpt PATH")
        return path
    path = Path(ckpt)
    if not path.exists():
        newest = latest_checkpoint(run_dir)
        raise CheckpointError(f"checkpoint '{path}' does not exist"
                              + (f"; the newest in {run_dir} is {newest} (--ckpt auto takes it)" if newest
                                 else "; pass --ckpt auto --run-dir DIR to take a run's newest"))
    return path


def load_model(ckpt: str, run_dir: str | Path = ".", device: str = "auto") -> tuple[Transformer, Tokenizer, Config]:
    """(model in eval mode on `device`, its tokenizer, its config) from `ckpt` (a path or `auto`, see
    resolve_checkpoint). Raises CheckpointError for a missing, corrupt or foreign checkpoint."""
    path = resolve_checkpoint(ckpt, run_dir)
    state = to_file_state(path) if is_sharded(path) else load_checkpoint(path)
    cfg = from_dict(state["config"])
    model = Transformer(cfg, int(state["data"]["vocab_size"]))
    model.load_state_dict(state["model"])
    return model.to(pick_device(device, 0)).eval(), get_tokenizer(state["data"]["tokenizer"]), cfg
