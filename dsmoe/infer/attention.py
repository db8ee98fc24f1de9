"""Attention of new tokens over a KV cache: MLA with its up-projections absorbed, GQA over cached K/V.

Both take the attention module of a block (its weights, unchanged from training), the normed input of
S new tokens per row, the layer's cache tensors, each token's position `pos_BS` and the key mask
`mask_BST` (key t visible to token (b, s) iff t <= pos_BS[b, s]); they write the new tokens' entries
into the cache at their positions, then attend over keys [0, T).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dsmoe.model.attention import GroupedQueryAttention, MultiHeadLatentAttention, apply_rope


def _write(cache_BL: torch.Tensor, pos_BS: torch.Tensor, new_BS: torch.Tensor) -> None:
    rows_BS = torch.arange(pos_BS.shape[0], device=pos_BS.device)[:, None].expand_as(pos_BS)
    cache_BL[rows_BS, pos_BS] = new_BS.to(cache_BL.dtype)


def mla_attend(attn: MultiHeadLatentAttention, x_BSD: torch.Tensor, layer: tuple[torch.Tensor, torch.Tensor],
               pos_BS: torch.Tensor, mask_BST: torch.Tensor) -> torch.Tensor:
    """MLA in "absorb" form (DeepSeek-V2 §2.1.3; DeepSeek-V3 reference inference/model.py, attn_impl "absorb").

    Training computes k_nope = W_UK c and v = W_UV c per head from the latent c. Here
    q_nope . (W_UK c) = (W_UK^T q_nope) . c, so the query is projected into the latent space once and
    scores are taken against the cached latents directly; likewise sum_t p_t (W_UV c_t) = W_UV (sum_t p_t c_t),
    so the output is formed in the latent space and up-projected once. The cache holds c = kv_norm(latent)
    [B, L, kv_lora_rank] and the RoPE'd shared key [B, L, qk_rope_head_dim]. Returns [B, S, d_model]."""
    B, S, _ = x_BSD.shape
    H, nope, rope, v_dim, rank = attn.n_heads, attn.nope, attn.rope, attn.v_dim, attn.kv_lora_rank
    # the same projections as MultiHeadLatentAttention.forward
    q = attn.wq(x_BSD) if hasattr(attn, "wq") else attn.wq_b(attn.q_norm(attn.wq_a(x_BSD)))
    q_nope_BSHD, q_pe_BSHR = q.view(B, S, H, nope + rope).split([nope, rope], dim=-1)
    q_pe_BSHR = apply_rope(q_pe_BSHR, attn.rotary.cos, attn.rotary.sin, pos_BS)
    latent_BSC, k_pe_BSR = attn.wkv_a(x_BSD).split([rank, rope], dim=-1)
    k_pe_BSR = apply_rope(k_pe_BSR.unsqueeze(2), attn.rotary.cos, attn.rotary.sin, pos_BS).squeeze(2)
    kv_cache, pe_cache = layer
    _write(kv_cache, pos_BS, attn.kv_norm(latent_BSC))
    _write(pe_cache, pos_BS, k_pe_BSR)
    T = mask_BST.shape[-1]
    kv_BTC, pe_BTR = kv_cache[:, :T], pe_cache[:, :T]

    w_HDC = attn.wkv_b.weight.view(H, nope + v_dim, rank)  # rows per head: W_UK (nope) then W_UV (v_dim)
    q_lat_BSHC = torch.einsum("bshd,hdc->bshc", q_nope_BSHD, w_HDC[:, :nope])
    scores_BSHT = (torch.einsum("bshc,btc->bsht", q_lat_BSHC, kv_BTC)
                   + torch.einsum("bshr,btr->bsht", q_pe_BSHR, pe_BTR)) * attn.scale
    scores_BSHT = scores_BSHT.masked_fill(~mask_BST[:, :, None, :], float("-inf"))
    probs_BSHT = scores_BSHT.softmax(-1, dtype=torch.float32).to(q_lat_BSHC.dtype)
    out_lat_BSHC = torch.einsum("bsht,btc->bshc", probs_BSHT, kv_BTC.to(probs_BSHT.dtype))
    out_BSHV = torch.einsum("bshc,hvc->bshv", out_lat_BSHC, w_HDC[:, nope:])
    return attn.wo(out_BSHV.reshape(B, S, H * v_dim))


def gqa_attend(attn: GroupedQueryAttention, x_BSD: torch.Tensor, layer: tuple[torch.Tensor, torch.Tensor],
               pos_BS: torch.Tensor, mask_BST: torch.Tensor) -> torch.Tensor:
    """GQA over cached keys (RoPE applied) and values [B, L, n_kv_heads, head_dim]. Returns [B, S, d_model]."""
    B, S, _ = x_BSD.shape
    H, Hkv, hd = attn.n_heads, attn.n_kv_heads, attn.head_dim
    cos, sin = attn.rotary.cos, attn.rotary.sin
    q_BSHD = apply_rope(attn.wq(x_BSD).view(B, S, H, hd), cos, sin, pos_BS)
    k_cache, v_cache = layer
    _write(k_cache, pos_BS, apply_rope(attn.wk(x_BSD).view(B, S, Hkv, hd), cos, sin, pos_BS))
    _write(v_cache, pos_BS, attn.wv(x_BSD).view(B, S, Hkv, hd))
    T = mask_BST.shape[-1]
    # contiguous k/v: CUDA's memory-efficient kernel has returned wrong output for strided k/v beside a
    # boolean mask (pytorch#112577); the copy is of T positions, what SDPA reads anyway
    k_BHTD = k_cache[:, :T].transpose(1, 2).to(q_BSHD.dtype).contiguous()
    v_BHTD = v_cache[:, :T].transpose(1, 2).to(q_BSHD.dtype).contiguous()
    out_BHSD = F.scaled_dot_product_attention(q_BSHD.transpose(1, 2), k_BHTD, v_BHTD, attn_mask=mask_BST[:, None],
                                              enable_gqa=Hkv != H)
    return attn.wo(out_BHSD.transpose(1, 2).reshape(B, S, H * hd))
