"""A checkpoint's model and tokenizer, ready to generate, evaluate or export (single files and sharded
directories alike)."""
from __future__ import annotations

from pathlib import Path

from dsmoe.checkpoint import read_state, resolve
from dsmoe.config import Config, from_dict
from dsmoe.data import get_tokenizer
from dsmoe.data.tokenizer import Tokenizer
from dsmoe.model import Transformer
from dsmoe.parallel.mesh import pick_device


def load_model(ckpt: str, run_dir: str | Path = ".", device: str = "auto") -> tuple[Transformer, Tokenizer, Config]:
    """(model in eval mode on `device`, its tokenizer, its config) from `ckpt` (a path or `auto`, see
    dsmoe.checkpoint.resolve). Raises CheckpointError for a missing, corrupt or foreign checkpoint."""
    state = read_state(resolve(ckpt, run_dir), optimizer=False)
    cfg = from_dict(state["config"])
    model = Transformer(cfg, int(state["data"]["vocab_size"]))
    model.load_state_dict(state["model"])
    return model.to(pick_device(device, 0)).eval(), get_tokenizer(state["data"]["tokenizer"]), cfg
