"""Expert-parallel token dispatch: the AllToAllDispatcher, same contract as dsmoe.model.dispatch.

    dispatch(x [T,d], topk_idx [T,K]) -> expert_x [N,d] grouped by local expert, counts [E_local], handle
    combine(expert_y [N,d], topk_weight [T,K], handle) -> y [T,d]

Expert e lives on EP rank e // (E / ep). Per layer: exchange the per-expert counts (one small
all-to-all), copy the split sizes to the host once, send the token rows with an uneven all-to-all
(the shared experts compute meanwhile), reorder the received rows from rank-major to expert-major for
the grouped GEMM; combine reverses it and does the weighted fp32 scatter-add onto the tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from dsmoe.model.dispatch import Dispatcher, LocalDispatcher, LocalHandle, sort_by_expert
from dsmoe.parallel.comm import all_to_all, check_peer_splits, exchange_counts

__all__ = ["Dispatcher", "LocalDispatcher", "LocalHandle", "AllToAllDispatcher", "EPHandle", "make_dispatcher"]


@dataclass
class EPHandle:
    sent_row: torch.Tensor  # [S] assignment index (t*K + k) of each row sent, in send order
    token_of_row: torch.Tensor  # [S] source token of each row sent
    input_splits: list  # rows sent to each EP rank
    output_splits: list  # rows received from each EP rank
    to_expert_major: torch.Tensor  # [N] received row (rank-major) placed at each expert-major position
    n_tokens: int
    overlap_result: object = None


class AllToAllDispatcher(Dispatcher):
    """Experts split over the EP group in contiguous blocks; tokens travel by uneven all-to-all."""

    def __init__(self, n_experts: int, ep_group, drops: bool = False, check_splits: bool = False):
        if ep_group is None:
            raise ValueError("AllToAllDispatcher needs an EP process group (mesh.ep_group); "
                             "with parallel.ep=1 use LocalDispatcher (make_dispatcher picks it)")
        self.ep = dist.get_world_size(ep_group)
        if n_experts % self.ep:
            raise ValueError(f"moe.n_routed_experts={n_experts} is not divisible by the EP group size {self.ep}: "
                             f"choose parallel.ep dividing {n_experts} or a multiple of {self.ep} experts")
        self.n_experts, self.group, self.drops = n_experts, ep_group, drops
        self.n_local_experts = n_experts // self.ep
        # splits come from exchanged counts, so they agree by construction; the peer check costs one
        # more small collective and host copy per layer, for debugging only
        self.check_splits = check_splits

    def dispatch(self, x_TD, topk_idx_TK, overlap=None):
        T, K = topk_idx_TK.shape
        ep, El = self.ep, self.n_local_experts
        # dropped (-1) assignments sort last and are not counted: they are never sent
        order, counts_E = sort_by_expert(topk_idx_TK, self.n_experts)
        recv_counts_RL = exchange_counts(counts_E, self.group).view(ep, El)  # [source rank, local expert]
        # The one device-to-host copy of this layer: every split size comes from this single tensor.
        sizes = torch.cat([counts_E.view(ep, El).sum(1), recv_counts_RL.sum(1)]).tolist()
        input_splits, output_splits = sizes[:ep], sizes[ep:]
        if self.check_splits:
            check_peer_splits(input_splits, output_splits, self.group, x_TD.device)

        sent_row = order[:sum(input_splits)]  # experts are contiguous per rank: expert order = rank order
        token_of_row = sent_row // K
        recv_x, pending = all_to_all(x_TD[token_of_row], input_splits, output_splits, self.group, async_op=True)
        overlap_result = overlap() if overlap is not None else None  # shared experts, while tokens fly
        # rank-major (source rank, local expert) -> expert-major (local expert, source rank); a stable
        # sort of each received row's local expert, computed while the exchange runs
        local_expert_N = torch.arange(ep * El, device=x_TD.device) % El
        local_expert_N = torch.repeat_interleave(local_expert_N, recv_counts_RL.reshape(-1),
                                                 output_size=sum(output_splits))  # output_size: no host sync
        to_expert_major = torch.argsort(local_expert_N, stable=True)
        pending.wait()
        handle = EPHandle(sent_row, token_of_row, input_splits, output_splits, to_expert_major, T, overlap_result)
        return recv_x[to_expert_major], recv_counts_RL.sum(0), handle

    def combine(self, expert_y_ND, topk_weight_TK, handle: EPHandle):
        # undo the reorder (an index op: autograd scatters the gradient back), then return to the sources
        y_rank_major = torch.empty_like(expert_y_ND).index_copy(0, handle.to_expert_major, expert_y_ND)
        y_SD, _ = all_to_all(y_rank_major, handle.output_splits, handle.input_splits, self.group)
        weight_S = topk_weight_TK.reshape(-1)[handle.sent_row].float()
        out = torch.zeros(handle.n_tokens, y_SD.shape[1], dtype=torch.float32, device=y_SD.device)
        # fp32 accumulation, as LocalDispatcher: a token's k expert outputs are summed in full precision
        out.index_add_(0, handle.token_of_row, y_SD.float() * weight_S[:, None])
        return out.to(expert_y_ND.dtype)


def make_dispatcher(n_experts: int, mesh, drops: bool = False) -> Dispatcher:
    """LocalDispatcher when every expert is on this process (ep = 1), else the AllToAllDispatcher."""
    if mesh.ep == 1:
        return LocalDispatcher(n_experts, drops=drops)
    return AllToAllDispatcher(n_experts, mesh.ep_group, drops=drops)
