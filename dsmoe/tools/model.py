"""The model one rank holds, built on the meta device: its vocabulary, parameter counts and FLOPs.

One builder (`meta_model`) and one vocabulary rule (`vocab_size_of`) serve the memory estimator, the
parameter breakdown (`python -m dsmoe.params`), the dry-run plan and the simulated rehearsal.
"""
from __future__ import annotations

from typing import Optional

import torch

from dsmoe.config import Config
from dsmoe.data.tokenizer import ByteTokenizer, get_tokenizer, padded_vocab_size
from dsmoe.model.dispatch import LocalDispatcher
from dsmoe.model.transformer import Transformer, flops_per_token, param_breakdown

# Real vocabularies (end-of-text included) of the tiktoken encodings, so that sizing a model needs no BPE
# files (tiktoken downloads them); other names ask the tokenizer itself.
TIKTOKEN_VOCAB = {"gpt2": 50257, "r50k_base": 50257, "p50k_base": 50281, "cl100k_base": 100277,
                  "o200k_base": 200019}


def vocab_size_of(cfg: Config) -> int:
    """model.vocab_size, or the tokenizer's vocabulary padded by `padded_vocab_size` (the trainer's rule)."""
    if cfg.model.vocab_size:
        return cfg.model.vocab_size
    tok = cfg.data.tokenizer
    if tok == "byte":
        n = ByteTokenizer.vocab_size
    else:
        n = TIKTOKEN_VOCAB.get(tok.removeprefix("tiktoken:")) or get_tokenizer(tok).vocab_size
    return padded_vocab_size(n)


def meta_model(cfg: Config, ep: int = 1, vocab: Optional[int] = None, dispatcher_factory=None) -> Transformer:
    """The model as one rank of an `ep`-way expert-parallel run holds it (E/ep routed experts per MoE
    layer), on the meta device: shapes without memory.

    `dispatcher_factory(layer)`: the dispatchers of a real layout (the simulated rehearsal passes the
    trainer's); by default stand-in LocalDispatchers of E/ep experts, which give the same shapes."""
    E = cfg.moe.n_routed_experts
    if dispatcher_factory is None and ep > 1:
        def dispatcher_factory(layer):
            return LocalDispatcher(E // ep)
    with torch.device("meta"):
        return Transformer(cfg, vocab_size=vocab or vocab_size_of(cfg), dispatcher_factory=dispatcher_factory)


def breakdown(cfg: Config) -> dict:
    """Parameters per category, total, active per token, and training FLOPs per token (see param_breakdown)."""
    model = meta_model(cfg)
    return {**param_breakdown(model), "flops_per_token": flops_per_token(model, cfg.train.seq_len)}


def fmt_count(n: float) -> str:
    """1234567 -> '1.23M'."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))
