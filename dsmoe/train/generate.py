"""Load a checkpoint's model and tokenizer and complete a prompt."""
from __future__ import annotations

import torch

from dsmoe.config import from_dict
from dsmoe.data import get_tokenizer
from dsmoe.model import Transformer
from dsmoe.parallel.mesh import pick_device
from dsmoe.train.checkpoint import CheckpointError, is_sharded, load_checkpoint, resolve_resume
from dsmoe.train.sharded_checkpoint import to_file_state


def load_model(ckpt: str, run_dir: str = ".", device: str = "auto"):
    path = resolve_resume(ckpt, run_dir)
    if path is None:
        raise CheckpointError(f"no checkpoint in {run_dir}/checkpoints: train first or pass --ckpt PATH")
    state = to_file_state(path) if is_sharded(path) else load_checkpoint(path)
    cfg = from_dict(state["config"])
    dev = pick_device(device, 0)
    model = Transformer(cfg, int(state["data"]["vocab_size"]))
    model.load_state_dict(state["model"])
    return model.to(dev).eval(), get_tokenizer(state["data"]["tokenizer"]), cfg


def generate_from_checkpoint(ckpt: str, prompt: str, run_dir: str = ".", max_new_tokens: int = 200,
                             temperature: float = 0.8, top_k: int = 50, seed: int = 0, device: str = "auto") -> str:
    model, tok, _ = load_model(ckpt, run_dir, device)
    dev = next(model.parameters()).device
    ids = tok.encode(prompt) or [tok.eot_id]
    gen = torch.Generator(device=dev).manual_seed(seed)
    out = model.generate(torch.tensor([ids], device=dev), max_new_tokens, temperature, top_k,
                         generator=gen, vocab_limit=tok.vocab_size)
    return tok.decode(out[0, len(ids):].tolist())
