"""The decoder: pre-norm blocks of attention and FFN/MoE, the LM head, parameter counts and FLOPs."""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn

from dsmoe.config import Config
from dsmoe.model.attention import RMSNorm, RotaryCache, build_attention
from dsmoe.model.dispatch import Dispatcher
from dsmoe.model.loss import chunked_cross_entropy
from dsmoe.model.moe import GroupedExperts, MoE, SwiGLU, run_here


class Block(nn.Module):
    def __init__(self, cfg: Config, layer: int, dispatcher: Optional[Dispatcher]):
        super().__init__()
        self.layer = layer
        self.attn_norm = RMSNorm(cfg.model.d_model, cfg.model.norm_eps)
        self.attn = build_attention(cfg)
        self.ffn_norm = RMSNorm(cfg.model.d_model, cfg.model.norm_eps)
        self.is_moe = cfg.is_moe_layer(layer)
        self.ffn = MoE(cfg, dispatcher) if self.is_moe else SwiGLU(cfg.model.d_model, cfg.model.ffn_hidden)

    def forward(self, x: torch.Tensor, run_attention: Callable = run_here, run_ffn: Callable = run_here,
                run_local: Callable = run_here):
        """Returns (x, aux_loss, expert_counts [E] or None, dropped or None).

        `run_attention(fn, x)` and `run_ffn(fn, x, run_local)` run the two sub-layers and `run_local` the
        MoE's local pieces (see MoE.forward): a checkpointing policy recomputes some of them in backward.
        They are arguments, not separate calls, so wrappers hooked on the block's call (FSDP) still run."""
        return run_ffn(self.ffn_residual, run_attention(self.attention_residual, x), run_local)

    def attention_residual(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.attn(self.attn_norm(x))

    def ffn_residual(self, x: torch.Tensor, run_local: Callable = run_here):
        if self.is_moe:
            y, routing = self.ffn(run_local(self.ffn_norm, x), run_local)
            return x + y, routing.aux_loss, routing.counts, routing.dropped
        return x + self.ffn(self.ffn_norm(x)), None, None, None


@dataclass
class ModelOutput:
    logits: Optional[torch.Tensor]  # [B, S, V]; None when targets were given (the loss is chunked)
    loss: Optional[torch.Tensor]  # cross-entropy + balance losses (what backward sees)
    ce_loss: Optional[torch.Tensor]  # cross-entropy alone (what is logged)
    aux_loss: torch.Tensor
    expert_counts: Optional[torch.Tensor]  # [n_moe_layers, E] assignments per expert (detached)
    dropped: Optional[torch.Tensor]  # [n_moe_layers] assignments dropped by capacity


RESIDUAL_PROJS = ("wo", "w_down")  # the projections that write into the residual stream


def is_residual_proj(name: str) -> bool:
    """Whether parameter `name` ("layers.3.attn.wo.weight", "layers.3.moe.experts.w_down") is a residual
    projection. Decided by name: module swaps keep names but not attributes (torchao's
    Float8Linear.from_float builds new modules)."""
    return any(part in RESIDUAL_PROJS for part in name.split(".")[-2:])


class Transformer(nn.Module):
    def __init__(self, cfg: Config, vocab_size: Optional[int] = None,
                 dispatcher_factory: Optional[Callable[[int], Dispatcher]] = None):
        """`dispatcher_factory(layer)` supplies each MoE layer's dispatcher (default: local)."""
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size or cfg.model.vocab_size
        if not self.vocab_size:
            raise ValueError("model.vocab_size is null: pass the tokenizer's padded vocabulary size")
        d = cfg.model.d_model
        self.tok_embeddings = nn.Embedding(self.vocab_size, d)
        self.layers = nn.ModuleList(
            Block(cfg, i, dispatcher_factory(i) if dispatcher_factory and cfg.is_moe_layer(i) else None)
            for i in range(cfg.model.n_layers))
        self.norm = RMSNorm(d, cfg.model.norm_eps)
        self.output = nn.Linear(d, self.vocab_size, bias=False)
        self.tie_weights()
        self.moe_layer_ids = [i for i in range(cfg.model.n_layers) if cfg.is_moe_layer(i)]
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    def tie_weights(self) -> None:
        """Share the embedding with the output head (model.tie_embeddings); again after `to_empty`,
        which gives each module a parameter of its own."""
        if self.cfg.model.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    @torch.no_grad()
    def init_weights(self, seed: Optional[int] = None,
                     place: Optional[Callable[[torch.Tensor, torch.Tensor], None]] = None) -> None:
        """Normal(0, init_std) matrices, residual projections (wo, w_down) scaled by 1/sqrt(2 n_layers)
        (GPT-2 §2.3), norms 1, routing bias 0.

        Each parameter is drawn from its own CPU generator seeded by (seed, name), and each routed
        expert by (seed, name, global expert index), so the weights are a function of the config and
        seed alone: equal whatever world size, ep, DDP or FSDP2 built the model, and a rank draws only
        the experts it holds. `place(param, whole)` puts the whole tensor (for a routed-expert stack:
        this module's experts) into the parameter; FSDP passes one that keeps the local shard.
        Default seed: train.seed."""
        seed = self.cfg.train.seed if seed is None else seed
        place = place or (lambda param, whole: param.copy_(whole))
        std = self.cfg.model.init_std
        resid_std = std / math.sqrt(2 * self.cfg.model.n_layers)
        owners = {f"{m}.{n}" if m else n: mod for m, mod in self.named_modules() for n, _ in mod.named_parameters(
            recurse=False)}
        for module in self.modules():
            if isinstance(module, RotaryCache):
                module.reset()
            elif isinstance(module, MoE):
                module.router.expert_bias.zero_()
        for name, param in self.named_parameters():
            module = owners[name]
            if isinstance(module, RMSNorm):
                place(param, torch.ones(param.shape))
            elif isinstance(module, GroupedExperts):
                w_std = resid_std if is_residual_proj(name) else std
                rows = [_normal(param.shape[1:], w_std, seed, name, module.first + e) for e in range(param.shape[0])]
                place(param, torch.stack(rows))
            else:
                place(param, _normal(param.shape, resid_std if is_residual_proj(name) else std, seed, name))

    def forward(self, idx_BS: torch.Tensor, targets_BS: Optional[torch.Tensor] = None,
                block_fn: Optional[Callable] = None) -> ModelOutput:
        """`block_fn(block, x)` lets the trainer wrap blocks (activation checkpointing)."""
        x = self.tok_embeddings(idx_BS)
        aux = torch.zeros((), device=idx_BS.device)
        counts, dropped = [], []
        for block in self.layers:
            x, block_aux, block_counts, block_dropped = block_fn(block, x) if block_fn else block(x)
            if block_counts is not None:
                aux = aux + block_aux
                counts.append(block_counts.detach())
                dropped.append(block_dropped.detach())
        h = self.norm(x)
        logits = loss = ce = None
        if targets_BS is None:
            logits = self.output(h)
        else:  # chunked: the [tokens, vocab] logits are never kept (softmax in fp32, see loss.py)
            ce = chunked_cross_entropy(h.flatten(0, 1), self.output.weight, targets_BS.reshape(-1))
            loss = ce + aux
        return ModelOutput(logits, loss, ce, aux,
                           torch.stack(counts) if counts else None,
                           torch.stack(dropped) if dropped else None)

    def moe_modules(self) -> list[MoE]:
        return [self.layers[i].ffn for i in self.moe_layer_ids]


def _normal(shape, std: float, seed: int, name: str, index: int = -1) -> torch.Tensor:
    """Normal(0, std) of `shape` (fp32, CPU) from a generator seeded by (seed, name, index) alone."""
    digest = hashlib.sha256(f"{seed}/{name}/{index}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return torch.empty(tuple(shape)).normal_(0.0, std, generator=generator)


# ----------------------------------------------------------------------------- counts


def _category(name: str) -> str:
    if name.startswith("tok_embeddings"):
        return "embedding"
    if name.startswith("output"):
        return "lm_head"
    if name.split(".")[-2].endswith("norm"):
        return "norms"
    if ".attn." in name:
        return "attention"
    if ".ffn.router." in name:
        return "router"
    if ".ffn.experts." in name:
        return "moe_routed"
    if ".ffn.shared." in name:
        return "moe_shared"
    if ".ffn." in name:
        return "dense_ffn"
    return "other"


CATEGORIES = ("embedding", "lm_head", "attention", "dense_ffn", "moe_routed", "moe_shared", "router", "norms")


def param_breakdown(model: Transformer) -> dict:
    """Parameters per category, total and active per token (routed experts count top_k/E)."""
    counts = dict.fromkeys(CATEGORIES, 0)
    for name, p in model.named_parameters():  # tied weights appear once
        counts[_category(name)] += p.numel()
    total = sum(counts.values())
    moe = model.cfg.moe
    experts_per_rank = model.moe_modules()[0].experts.w_gate.shape[0] if model.moe_layer_ids else 0
    ep_factor = moe.n_routed_experts / experts_per_rank if experts_per_rank else 1
    routed_full = counts["moe_routed"] * ep_factor  # count every expert, wherever it lives
    total += routed_full - counts["moe_routed"]
    counts["moe_routed"] = int(routed_full)
    active_routed = routed_full * (moe.top_k / moe.n_routed_experts) if moe.n_routed_experts else 0
    active = total - routed_full + active_routed
    return {**counts, "total": int(total), "active": int(active)}


def flops_per_token(model: Transformer, seq_len: int) -> float:
    """Training FLOPs per token: 6 * N_active (without the embedding lookup) + 6*L*H*S*(d_qk + d_v)."""
    b = param_breakdown(model)
    n_active = b["active"] - b["embedding"] + (b["embedding"] if model.cfg.model.tie_embeddings else 0)
    m, a = model.cfg.model, model.cfg.attention
    if a.kind == "mla":
        qk, v = a.qk_nope_head_dim + a.qk_rope_head_dim, a.v_head_dim
    else:
        qk = v = a.head_dim or m.d_model // m.n_heads
    return 6.0 * n_active + 6.0 * m.n_layers * m.n_heads * seq_len * (qk + v)
