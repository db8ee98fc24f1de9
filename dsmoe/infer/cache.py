"""The KV cache: per layer, what attention needs of every earlier token, for B rows of up to L tokens.

MLA keeps only the compressed latent after its norm (`kv_lora_rank` values) and the shared RoPE key
(`qk_rope_head_dim` values) per token: the per-head keys and values are never materialised, because
decoding absorbs the up-projections into the query and the output (DeepSeek-V2 §2.1.3, DeepSeek-V3's
reference `inference/model.py`, attn_impl "absorb"). GQA keeps `n_kv_heads` keys (RoPE applied) and
values. Each row has its own length, so prompts of different lengths share one cache without padding
their positions: row b's next token sits at position `lengths[b]`.
"""
from __future__ import annotations

import math

import torch

from dsmoe.config import Config


def cache_shapes(cfg: Config) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Per-token shapes of a layer's two cached tensors: MLA (latent [kv_lora_rank], RoPE key
    [qk_rope_head_dim]); GQA (keys [n_kv_heads, head_dim], values [n_kv_heads, head_dim])."""
    m, a = cfg.model, cfg.attention
    if a.kind == "mla":
        return (a.kv_lora_rank,), (a.qk_rope_head_dim,)
    heads, head_dim = a.n_kv_heads or m.n_heads, a.head_dim or m.d_model // m.n_heads
    return (heads, head_dim), (heads, head_dim)


def cache_bytes_per_token(cfg: Config, element_size: int) -> int:
    """Formula: bytes one token costs in one layer's cache. MLA: (kv_lora_rank + qk_rope_head_dim) x
    element_size; GQA: 2 x n_kv_heads x head_dim x element_size."""
    first, second = cache_shapes(cfg)
    return (math.prod(first) + math.prod(second)) * element_size


def full_kv_bytes_per_token(cfg: Config, element_size: int) -> int:
    """Formula: bytes of the per-head keys and values a plain KV cache would keep instead (MLA: n_heads x
    (qk_nope + qk_rope + v_head_dim); MHA: 2 x n_heads x head_dim), per token and layer."""
    m, a = cfg.model, cfg.attention
    if a.kind == "mla":
        return m.n_heads * (a.qk_nope_head_dim + a.qk_rope_head_dim + a.v_head_dim) * element_size
    return 2 * m.n_heads * (a.head_dim or m.d_model // m.n_heads) * element_size


class KVCache:
    """`layers[i]` = (first [B, L, ...], second [B, L, ...]) as `cache_shapes` describes; `lengths` [B]
    (host, long) counts the valid tokens of each row. Positions past a row's length hold stale values
    that attention masks out and the next write replaces.

    `allocate` raises ValueError when the capacity exceeds the model's max_seq_len (its RoPE tables end
    there)."""

    def __init__(self, layers: list[tuple[torch.Tensor, torch.Tensor]], lengths: torch.Tensor):
        self.layers, self.lengths = layers, lengths

    @classmethod
    def allocate(cls, cfg: Config, batch: int, capacity: int, dtype: torch.dtype,
                 device: torch.device) -> "KVCache":
        """An empty cache of `batch` rows x `capacity` tokens for every layer of `cfg`'s model."""
        if capacity > cfg.model.max_seq_len:
            raise ValueError(f"cache capacity {capacity} exceeds model.max_seq_len {cfg.model.max_seq_len}: "
                             f"prompt + new tokens must fit the context the RoPE tables cover")
        first, second = cache_shapes(cfg)
        layers = [(torch.zeros(batch, capacity, *first, dtype=dtype, device=device),
                   torch.zeros(batch, capacity, *second, dtype=dtype, device=device))
                  for _ in range(cfg.model.n_layers)]
        return cls(layers, torch.zeros(batch, dtype=torch.long))

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]

    @property
    def capacity(self) -> int:
        return self.layers[0][0].shape[1]

    def rows(self, start: int, stop: int) -> "KVCache":
        """Rows [start, stop) as a cache sharing this one's storage (writes land here)."""
        return KVCache([(a[start:stop], b[start:stop]) for a, b in self.layers], self.lengths[start:stop])

    def move_row(self, src: int, dst: int) -> None:
        """Copy row `src` (its valid tokens and length) over row `dst`; keeps live rows contiguous."""
        n = int(self.lengths[src])
        for a, b in self.layers:
            a[dst, :n] = a[src, :n]
            b[dst, :n] = b[src, :n]
        self.lengths[dst] = n

    def nbytes(self) -> int:
        """Bytes the cache tensors occupy (every row, the whole capacity, every layer)."""
        return sum(a.nbytes + b.nbytes for a, b in self.layers)
