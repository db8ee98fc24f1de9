"""One cached forward: S new tokens per row after the tokens each row already holds in the cache."""
from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from typing import Optional, Sequence

import torch

from dsmoe.infer.attention import gqa_attend, mla_attend
from dsmoe.infer.cache import KVCache
from dsmoe.model import Transformer
from dsmoe.parallel.wrap import eager_blocks


@contextmanager
def dropless(model: Transformer):
    """Route without the capacity limit while inside: inference never drops a token.

    A capacity factor bounds each expert's load per training batch; at inference it would make one
    request's output depend on what else shares its batch. Expert choice is otherwise exactly
    training's: scores + the trained aux-loss-free bias, top-k (and group limits), gate weights from the
    scores alone. The routers' settings are restored on exit."""
    routers = [moe.router for moe in model.moe_modules()]
    saved = [r.cfg for r in routers]
    for r in routers:
        if r.cfg.capacity_factor is not None:
            r.cfg = dataclasses.replace(r.cfg, capacity_factor=None)
    try:
        yield
    finally:
        for r, cfg in zip(routers, saved):
            r.cfg = cfg


@torch.no_grad()
def forward_cached(model: Transformer, tokens_BS: torch.Tensor, cache: KVCache,
                   n_new: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Logits [B, S, vocab] of `tokens_BS`, the next S tokens of each of the cache's B rows.

    Row b's tokens take positions lengths[b] .. lengths[b] + S - 1 and see every earlier token of their
    row. Afterwards lengths[b] grows by `n_new[b]` (default S): a ragged prefill right-pads its rows and
    counts only the real tokens, so the padding is overwritten later and never attended to.

    The model runs through its own `forward` (its blocks through `block_fn`), so wrappers hooked on
    module calls (FSDP2's all-gathers) and the expert-parallel dispatch run as in training; only each
    block's attention sub-layer is replaced by the cached one. Blocks compiled for training run their
    eager functions here (`eager_blocks`: no recompilation per layer). Raises ValueError when a row would pass
    the cache's capacity."""
    B, S = tokens_BS.shape
    if B != cache.batch:
        raise ValueError(f"{B} rows of tokens for a cache of {cache.batch} rows")
    T = int(cache.lengths.max()) + S
    if T > cache.capacity:
        raise ValueError(f"{T} tokens exceed the cache capacity {cache.capacity}")
    device = tokens_BS.device
    pos_BS = cache.lengths.to(device)[:, None] + torch.arange(S, device=device)
    mask_BST = torch.arange(T, device=device)[None, None, :] <= pos_BS[:, :, None]
    attend = mla_attend if model.cfg.attention.kind == "mla" else gqa_attend

    def block_fn(block, x):
        def run_attention(_, h):  # stands in for Block.attention_residual: same residual, cached attention
            return h + attend(block.attn, block.attn_norm(h), cache.layers[block.layer], pos_BS, mask_BST)
        return block(x, run_attention=run_attention)

    with dropless(model), eager_blocks(model):
        logits = model(tokens_BS, block_fn=block_fn).logits
    cache.lengths += torch.as_tensor(S if n_new is None else list(n_new), dtype=torch.long)
    return logits
