"""The Dispatcher contract and the single-process LocalDispatcher.

    dispatch(x [T,d], topk_idx [T,K]) -> expert_x [N,d] grouped by local expert, counts [E_local], handle
    combine(expert_y [N,d], topk_weight [T,K], handle) -> y [T,d]

A `topk_idx` entry of -1 is an assignment dropped by the capacity limit: it is never computed and
contributes nothing. Rows of `expert_x` past `counts.sum()` are padding; an expert's output there is
ignored by `combine`. The expert-parallel AllToAllDispatcher (dsmoe.parallel.dispatch) implements the
same contract, so the MoE layer never knows where its experts live.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F


@dataclass
class LocalHandle:
    order: torch.Tensor  # [T*K] assignment index of each sorted row
    token_of_row: torch.Tensor  # [T*K] source token of each sorted row
    kept_row: Optional[torch.Tensor]  # [T*K] bool, None when nothing was dropped
    row_of_assignment: Optional[torch.Tensor]  # [T*K] sorted row of each (token, k); None when some may drop
    n_tokens: int
    overlap_result: object = None


class Dispatcher:
    """Moves each token's top-k copies to the experts' owners and the results back."""

    n_local_experts: int
    syncs_host = False  # copies data-dependent sizes to the host (compiled models run it eagerly)

    def dispatch(self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor,
                 overlap: Optional[Callable[[], object]] = None):
        """`overlap` runs while tokens are in flight (the shared experts); its result is `handle.overlap_result`."""
        raise NotImplementedError

    def combine(self, expert_y_ND: torch.Tensor, topk_weight_TK: torch.Tensor, handle,
                overlap: Optional[Callable[[], object]] = None) -> torch.Tensor:
        """`overlap` runs while the rows travel back; its result replaces `handle.overlap_result`."""
        raise NotImplementedError


def sort_by_expert(topk_idx_TK: torch.Tensor, n_experts: int):
    """Stable sort of the flattened assignments by expert; dropped (-1) ones go last.

    Returns (order, counts [E]) with no host sync.
    """
    flat = topk_idx_TK.reshape(-1)
    key = torch.where(flat < 0, n_experts, flat)
    order = torch.argsort(key, stable=True)
    return order, count_per_expert(key, n_experts + 1)[:n_experts]


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    """The inverse of a permutation: inv[perm[i]] = i (a scatter, no sort)."""
    return torch.empty_like(perm).scatter_(0, perm, torch.arange(perm.numel(), device=perm.device))


def count_per_expert(idx: torch.Tensor, n_experts: int) -> torch.Tensor:
    """bincount without its host sync (CUDA bincount reads max().item() even with minlength)."""
    flat = idx.reshape(-1)
    return torch.zeros(n_experts, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


class LocalDispatcher(Dispatcher):
    """All experts on this process: sort-based gather and a weighted scatter-add back, no host sync."""

    def __init__(self, n_experts: int, drops: bool = False):
        self.n_local_experts = n_experts
        self.drops = drops  # capacity-limited routing: padding rows exist and must be masked

    def dispatch(self, x_TD, topk_idx_TK, overlap=None):
        T, K = topk_idx_TK.shape
        order, counts = sort_by_expert(topk_idx_TK, self.n_local_experts)
        token_of_row = order // K
        kept_row = (topk_idx_TK.reshape(-1) >= 0)[order] if self.drops else None
        handle = LocalHandle(order, token_of_row, kept_row, None if self.drops else inverse_permutation(order), T)
        if overlap is not None:
            handle.overlap_result = overlap()
        expert_x = x_TD[token_of_row]
        if kept_row is not None:
            # `where`, not a multiply: grouped_mm leaves the gradient of padding rows unwritten
            expert_x = torch.where(kept_row[:, None], expert_x, 0.0)
        return expert_x, counts, handle

    def combine(self, expert_y_ND, topk_weight_TK, handle: LocalHandle, overlap=None):
        if overlap is not None:
            handle.overlap_result = overlap()
        if handle.row_of_assignment is not None:
            # out[t] = sum_k w[t,k] * y[row of (t,k)] in fp32: one fused gather-and-sum (embedding_bag)
            # instead of a weight gather, a [T*K, d] product, a zero fill and a scatter-add
            T, K = topk_weight_TK.shape
            out = F.embedding_bag(handle.row_of_assignment.view(T, K), expert_y_ND.float(),
                                  per_sample_weights=topk_weight_TK.float(), mode="sum")
            return out.to(expert_y_ND.dtype)
        weight_N = topk_weight_TK.reshape(-1)[handle.order].float()
        y_ND = expert_y_ND.float()
        if handle.kept_row is not None:
            # mask before the multiply: padding rows may hold garbage, and 0 * NaN poisons the router grad
            y_ND = torch.where(handle.kept_row[:, None], y_ND, 0.0)
        y_ND = y_ND * weight_N[:, None]
        out = torch.zeros(handle.n_tokens, y_ND.shape[1], dtype=torch.float32, device=y_ND.device)
        # fp32 accumulation: a token's k expert outputs are summed in full precision
        out.index_add_(0, handle.token_of_row, y_ND)
        return out.to(expert_y_ND.dtype)
