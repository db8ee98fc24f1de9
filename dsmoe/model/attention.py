"""Attention: MLA (latent KV, decoupled RoPE) and GQA/MQA/MHA, with RMSNorm and interleaved RoPE."""
from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

from dsmoe.config import Config


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x * rsqrt(mean(x^2) + eps) * weight in fp32 (bf16/fp16 variance underflows for small
        activations), returned in x's dtype. F.rms_norm: one fused op (and one backward) where torch has a
        kernel, instead of five elementwise passes."""
        return F.rms_norm(x.float(), self.weight.shape, self.weight.float(), self.eps).to(x.dtype)


def rope_tables(head_dim: int, max_seq_len: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape [max_seq_len, head_dim/2] in fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x_BSHD: torch.Tensor, cos_SD2: torch.Tensor, sin_SD2: torch.Tensor,
               positions_BS: torch.Tensor | None = None) -> torch.Tensor:
    """Rotate interleaved pairs (x0, x1), (x2, x3), ... (DeepSeek's complex-number layout).

    Token s sits at position s unless `positions_BS` [B, S] (long) gives each token its own position
    (cached decoding, where rows hold different lengths)."""
    S = x_BSHD.shape[1]
    x = x_BSHD.float().unflatten(-1, (-1, 2))
    x0, x1 = x[..., 0], x[..., 1]
    if positions_BS is None:
        cos = cos_SD2[:S, None, :]
        sin = sin_SD2[:S, None, :]
    else:
        cos = cos_SD2[positions_BS][:, :, None, :]
        sin = sin_SD2[positions_BS][:, :, None, :]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).to(x_BSHD.dtype)


class RotaryCache(nn.Module):
    """RoPE cos/sin tables as non-persistent buffers (rebuilt, never checkpointed)."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float):
        super().__init__()
        self.head_dim, self.max_seq_len, self.theta = head_dim, max_seq_len, theta
        cos, sin = rope_tables(head_dim, max_seq_len, theta)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def reset(self) -> None:
        """Recompute after materialising from the meta device."""
        self.cos, self.sin = rope_tables(self.head_dim, self.max_seq_len, self.theta, device=self.cos.device)


@torch.compiler.assume_constant_result  # torch.compile evaluates it once while tracing: no graph break
def v_padding_needed(device: torch.device, dtype: torch.dtype, B: int, S: int, H: int, qk_dim: int, v_dim: int,
                     requires_grad: bool) -> bool:
    """Whether MLA should zero-pad V [B, H, S, v_dim] to q/k's head size `qk_dim` before SDPA: True only
    when SDPA would pick its math fallback (slower, and it keeps the [B, H, S, S] weights for backward)
    for the unpadded tensors but a fused kernel for padded ones.

    Asks the installed torch's own backend selection (`torch._fused_sdp_choice`, under SDPA's enable
    flags) once per shape, so it follows whatever that torch version allows. Its rules as of torch 2.11-2.13
    (aten/src/ATen/native/transformers/sdp_utils_cpp.cpp and cuda/sdp_utils.cpp): the CPU flash kernel
    and CUDA flash attention need equal q/k/v head sizes;
    CUDA's memory-efficient kernel (fp32/fp16/bf16, sm50+) takes v != q/k, and so does cuDNN (fp16/bf16,
    sm80+, head sizes up to 128, 256 on sm90 with cuDNN >= 9.10, preferred there with cuDNN > 9.15). So
    on CPU V is padded (192 for DeepSeek-V3's 128), on CUDA it is not: padding would cost 20% more
    attention FLOPs and a padded V and output."""
    flags = (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled(),
             torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.math_sdp_enabled())
    return _v_padding_needed(torch.device(device), dtype, (B, S, H, qk_dim), v_dim, requires_grad, flags)


@functools.lru_cache(maxsize=64)
def _v_padding_needed(device, dtype, shape_BSHK, v_dim, requires_grad, flags) -> bool:
    # probes laid out as MLA's own q/k/v: [B, S, H, K] transposed to [B, H, S, K]
    q = torch.empty(shape_BSHK, device=device, dtype=dtype, requires_grad=requires_grad).transpose(1, 2)
    v = torch.empty(*shape_BSHK[:3], v_dim, device=device, dtype=dtype, requires_grad=requires_grad).transpose(1, 2)
    math_kernel = SDPBackend.MATH.value
    unpadded = torch._fused_sdp_choice(q, q, v, is_causal=True)
    padded = torch._fused_sdp_choice(q, q, q, is_causal=True)
    return unpadded == math_kernel and padded != math_kernel


class MultiHeadLatentAttention(nn.Module):
    """DeepSeek-V2/V3 MLA: K/V from a compressed latent plus one RoPE key shared across heads."""

    def __init__(self, cfg: Config):
        super().__init__()
        m, a = cfg.model, cfg.attention
        self.n_heads = m.n_heads
        self.nope, self.rope, self.v_dim = a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim
        self.kv_lora_rank = a.kv_lora_rank
        qk_dim = self.nope + self.rope
        if a.q_lora_rank > 0:
            self.wq_a = nn.Linear(m.d_model, a.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(a.q_lora_rank, m.norm_eps)
            self.wq_b = nn.Linear(a.q_lora_rank, m.n_heads * qk_dim, bias=False)
        else:
            self.wq = nn.Linear(m.d_model, m.n_heads * qk_dim, bias=False)
        self.wkv_a = nn.Linear(m.d_model, a.kv_lora_rank + self.rope, bias=False)
        self.kv_norm = RMSNorm(a.kv_lora_rank, m.norm_eps)
        self.wkv_b = nn.Linear(a.kv_lora_rank, m.n_heads * (self.nope + self.v_dim), bias=False)
        self.wo = nn.Linear(m.n_heads * self.v_dim, m.d_model, bias=False)
        self.rotary = RotaryCache(self.rope, m.max_seq_len, m.rope_theta)
        self.scale = 1.0 / math.sqrt(qk_dim)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        H = self.n_heads
        if hasattr(self, "wq"):
            q = self.wq(x_BSD)
        else:
            q = self.wq_b(self.q_norm(self.wq_a(x_BSD)))
        q_BSHK = q.view(B, S, H, self.nope + self.rope)
        q_nope, q_pe = q_BSHK.split([self.nope, self.rope], dim=-1)
        q_pe = apply_rope(q_pe, self.rotary.cos, self.rotary.sin)

        latent, k_pe = self.wkv_a(x_BSD).split([self.kv_lora_rank, self.rope], dim=-1)
        k_pe_BS1R = apply_rope(k_pe.unsqueeze(2), self.rotary.cos, self.rotary.sin)
        kv_BSHK = self.wkv_b(self.kv_norm(latent)).view(B, S, H, self.nope + self.v_dim)
        k_nope, v_BSHV = kv_BSHK.split([self.nope, self.v_dim], dim=-1)

        q_BHSK = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)
        k_BHSK = torch.cat([k_nope, k_pe_BS1R.expand(B, S, H, self.rope)], dim=-1).transpose(1, 2)
        v_BHSV = v_BSHV.transpose(1, 2)
        pad = self.nope + self.rope - self.v_dim
        if pad > 0 and v_padding_needed(q_BHSK.device, q_BHSK.dtype, B, S, H, self.nope + self.rope, self.v_dim,
                                        q_BHSK.requires_grad):
            v_BHSV = F.pad(v_BHSV, (0, pad))  # zero columns: the output's extra columns are zero, sliced off
        out_BHSV = F.scaled_dot_product_attention(q_BHSK, k_BHSK, v_BHSV, is_causal=True, scale=self.scale)
        out_BHSV = out_BHSV[..., :self.v_dim]
        return self.wo(out_BHSV.transpose(1, 2).reshape(B, S, H * self.v_dim))


class GroupedQueryAttention(nn.Module):
    """GQA: n_kv_heads key/value heads shared by groups of query heads (1 = MQA, n_heads = MHA)."""

    def __init__(self, cfg: Config):
        super().__init__()
        m, a = cfg.model, cfg.attention
        self.n_heads = m.n_heads
        self.n_kv_heads = a.n_kv_heads or m.n_heads
        self.head_dim = a.head_dim or m.d_model // m.n_heads
        self.wq = nn.Linear(m.d_model, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(m.d_model, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(m.d_model, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, m.d_model, bias=False)
        self.rotary = RotaryCache(self.head_dim, m.max_seq_len, m.rope_theta)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        q = apply_rope(self.wq(x_BSD).view(B, S, self.n_heads, self.head_dim), self.rotary.cos, self.rotary.sin)
        k = apply_rope(self.wk(x_BSD).view(B, S, self.n_kv_heads, self.head_dim), self.rotary.cos, self.rotary.sin)
        v = self.wv(x_BSD).view(B, S, self.n_kv_heads, self.head_dim)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=True, enable_gqa=self.n_kv_heads != self.n_heads)
        return self.wo(out.transpose(1, 2).reshape(B, S, self.n_heads * self.head_dim))


def build_attention(cfg: Config) -> nn.Module:
    return MultiHeadLatentAttention(cfg) if cfg.attention.kind == "mla" else GroupedQueryAttention(cfg)
