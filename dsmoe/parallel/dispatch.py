"""Expert-parallel token dispatch: the AllToAllDispatcher, same contract as dsmoe.model.dispatch.

    dispatch(x [T,d], topk_idx [T,K]) -> expert_x [N,d] grouped by local expert, counts [E_local], handle
    combine(expert_y [N,d], topk_weight [T,K], handle) -> y [T,d]

Expert e lives on EP rank e // (E / ep). Per layer: exchange the per-expert counts (one small
all-to-all), copy the split sizes to the host once, send the token rows with an uneven all-to-all
(the shared experts compute meanwhile), reorder the received rows from rank-major to expert-major for
the grouped GEMM (skipped with one expert per rank); combine reverses it and sums each token's k
weighted rows in fp32 (dropless: a gather to (token, k) order and one batched matmul; with capacity
drops: a weighted scatter-add). Row moves are `index_select` gathers: on CPU, advanced indexing and
`index_copy` are several times slower.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from dsmoe.model.dispatch import Dispatcher, LocalDispatcher, LocalHandle, sort_by_expert
from dsmoe.parallel.comm import all_to_all, check_peer_splits, comm_phase, exchange_counts

__all__ = ["Dispatcher", "LocalDispatcher", "LocalHandle", "AllToAllDispatcher", "EPHandle", "make_dispatcher"]


@dataclass
class EPHandle:
    sent_row: torch.Tensor  # [S] assignment index (t*K + k) of each row sent, in send order
    token_of_row: torch.Tensor  # [S] source token of each row sent
    input_splits: list  # rows sent to each EP rank
    output_splits: list  # rows received from each EP rank
    to_expert_major: torch.Tensor | None  # [N] received row (rank-major) at each expert-major position
    to_rank_major: torch.Tensor | None  # [N] its inverse; both None with one expert per rank (no reorder)
    n_tokens: int
    overlap_result: object = None
    assign_order: torch.Tensor | None = None  # [T*K] sent row of each (token, k); None when some were dropped


class AllToAllDispatcher(Dispatcher):
    """Experts split over the EP group in contiguous blocks; tokens travel by uneven all-to-all."""

    syncs_host = True  # the split sizes: one device-to-host copy per layer

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
        self.first_expert = dist.get_rank(ep_group) * self.n_local_experts  # this rank holds [first, first + El)
        # splits come from exchanged counts, so they agree by construction; the peer check costs one
        # more small collective and host copy per layer, for debugging only
        self.check_splits = check_splits
        self.bytes_sent = 0  # to other ranks, dispatch + combine, since the trainer last read it
        self.timer = None  # a StepTimer: exchanges and waits are timed as its `moe_comm` phase

    def dispatch(self, x_TD, topk_idx_TK, overlap=None):
        T, K = topk_idx_TK.shape
        ep, El = self.ep, self.n_local_experts
        # dropped (-1) assignments sort last and are not counted: they are never sent
        order, counts_E = sort_by_expert(topk_idx_TK, self.n_experts)
        with comm_phase(self.timer):
            recv_counts_RL = exchange_counts(counts_E, self.group).view(ep, El)  # [source rank, local expert]
            # The one device-to-host copy of this layer: every split size comes from this single tensor.
            sizes = split_sizes(torch.cat([counts_E.view(ep, El).sum(1), recv_counts_RL.sum(1)]), T * K)
        input_splits, output_splits = sizes[:ep], sizes[ep:]
        off_rank_rows = sum(input_splits) - input_splits[dist.get_rank(self.group)]
        self.bytes_sent += 2 * off_rank_rows * x_TD.shape[1] * x_TD.element_size()  # the combine returns as many
        if self.check_splits:
            check_peer_splits(input_splits, output_splits, self.group, x_TD.device)

        sent_row = order[:sum(input_splits)]  # experts are contiguous per rank: expert order = rank order
        token_of_row = sent_row // K
        # index_select, not x[idx]: a row-wise copy, several times faster than advanced indexing on CPU
        send_x = x_TD.index_select(0, token_of_row)
        recv_x, pending = all_to_all(send_x, input_splits, output_splits, self.group, async_op=True, timer=self.timer)
        overlap_result = overlap() if overlap is not None else None  # shared experts, while tokens fly
        to_expert_major = to_rank_major = None  # one expert per rank: rank-major is expert-major
        if El > 1:
            # rank-major (source rank, local expert) -> expert-major (local expert, source rank); a stable
            # sort of each received row's local expert, computed while the exchange runs
            local_expert_N = torch.arange(ep * El, device=x_TD.device) % El
            local_expert_N = torch.repeat_interleave(local_expert_N, recv_counts_RL.reshape(-1),
                                                     output_size=sum(output_splits))  # output_size: no host sync
            to_expert_major = torch.argsort(local_expert_N, stable=True)
            to_rank_major = _inverse(to_expert_major)
        # dropless (every assignment sent, known from the host-side splits): combine can gather the rows
        # back into (token, k) order and reduce them with one batched matmul
        assign_order = _inverse(order) if sum(input_splits) == T * K else None
        with comm_phase(self.timer):  # what the overlapped work did not hide
            pending.wait()
        handle = EPHandle(sent_row, token_of_row, input_splits, output_splits, to_expert_major, to_rank_major, T,
                          overlap_result, assign_order)
        expert_x = recv_x if to_expert_major is None else recv_x.index_select(0, to_expert_major)
        return expert_x, recv_counts_RL.sum(0), handle

    def combine(self, expert_y_ND, topk_weight_TK, handle: EPHandle):
        # undo the reorder (a gather by the inverse permutation: index_copy is far slower on CPU; autograd
        # scatters the gradient back), then return to the sources
        y_rank_major = expert_y_ND if handle.to_rank_major is None else \
            expert_y_ND.index_select(0, handle.to_rank_major)
        y_SD, _ = all_to_all(y_rank_major, handle.output_splits, handle.input_splits, self.group, timer=self.timer)
        if handle.assign_order is not None:
            # out[t] = sum_k w[t,k] * y[t,k]: a [1,K] x [K,d] fp32 matmul per token, accumulated in fp32
            # (autocast off: it would run it in bf16). One read of the rows, no [T*K, d] temporary
            # for the weighted rows and no scatter-add.
            T, K = topk_weight_TK.shape
            y_TKD = y_SD.index_select(0, handle.assign_order).view(T, K, y_SD.shape[1]).float()
            with torch.autocast(y_SD.device.type, enabled=False):
                out = torch.bmm(topk_weight_TK.float().unsqueeze(1), y_TKD).squeeze(1)
            return out.to(expert_y_ND.dtype)
        weight_S = topk_weight_TK.reshape(-1)[handle.sent_row].float()
        out = torch.zeros(handle.n_tokens, y_SD.shape[1], dtype=torch.float32, device=y_SD.device)
        # fp32 accumulation, as LocalDispatcher: a token's k expert outputs are summed in full precision
        out.index_add_(0, handle.token_of_row, y_SD.float() * weight_S[:, None])
        return out.to(expert_y_ND.dtype)


def split_sizes(sizes_2R: torch.Tensor, n_assignments: int) -> list[int]:
    """Rows sent to, then received from, each EP rank ([2 * ep] counts) as host integers: the layer's one
    device-to-host copy. The simulated rehearsal (dsmoe.tools.simulate) swaps in balanced routing here,
    since fake tensors hold no counts; `n_assignments` (T * K) is what it splits."""
    return sizes_2R.tolist()


def _inverse(perm: torch.Tensor) -> torch.Tensor:
    """The inverse of a permutation: inv[perm[i]] = i (a scatter, no sort)."""
    return torch.empty_like(perm).scatter_(0, perm, torch.arange(perm.numel(), device=perm.device))


def make_dispatcher(n_experts: int, mesh, drops: bool = False) -> Dispatcher:
    """LocalDispatcher when every expert is on this process (ep = 1), else the AllToAllDispatcher."""
    if mesh.ep == 1:
        return LocalDispatcher(n_experts, drops=drops)
    return AllToAllDispatcher(n_experts, mesh.ep_group, drops=drops)
