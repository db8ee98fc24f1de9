"""Expert-parallel token dispatch: the AllToAllDispatcher, same contract as dsmoe.model.dispatch.

    dispatch(x [T,d], topk_idx [T,K]) -> expert_x [N,d] grouped by local expert, counts [E_local], handle
    combine(expert_y [N,d], topk_weight [T,K], handle) -> y [T,d]

Expert e lives on EP rank e // (E / ep). Per layer: sort the assignments by expert once; exchange the
per-expert counts (one small all-to-all) while the rows to send are gathered (one `index_select`);
copy the counts to the host once; send the rows while the shared experts compute; combine sends them
back the same way and sums each token's k weighted rows in fp32 (dropless: one fused gather-and-sum,
`embedding_bag`; with capacity drops: a weighted scatter-add).

The grouped GEMM wants the received rows expert-major, (local expert, source rank), while an
all-to-all delivers them rank-major. Two transports:
- "blocks" (default on CPU): each (rank, expert) block is its own point-to-point message, received
  straight into its expert-major place, so no pass over the rows reorders them; on gloo a pass over
  the rows costs about as much as sending them, and this halves the dispatcher's own work.
- "reorder" (default on CUDA): one uneven all_to_all_single (NCCL's fastest path, no per-block
  messages), then a gather to expert-major and back: cheap at HBM bandwidth.
With one expert per rank rank-major is expert-major and both are a plain all-to-all.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from dsmoe.model.dispatch import Dispatcher, LocalDispatcher, LocalHandle, inverse_permutation, sort_by_expert
from dsmoe.parallel.comm import all_to_all, check_peer_splits, comm_phase, exchange_blocks, exchange_counts

__all__ = ["Dispatcher", "LocalDispatcher", "LocalHandle", "AllToAllDispatcher", "EPHandle", "make_dispatcher"]


@dataclass
class EPHandle:
    sent_row: torch.Tensor  # [S] assignment index (t*K + k) of each row sent, in send order
    token_of_row: torch.Tensor  # [S] source token of each row sent
    input_splits: list  # rows sent to each EP rank
    output_splits: list  # rows received from each EP rank
    send_blocks: list | None  # (peer, local expert, first row, rows) in send order; None: all-to-all
    recv_blocks: list | None  # the same for the expert-major rows received
    to_expert_major: torch.Tensor | None  # "reorder": [N] rank-major row of each expert-major row
    to_rank_major: torch.Tensor | None  # its inverse
    n_tokens: int
    overlap_result: object = None
    assign_order: torch.Tensor | None = None  # [T*K] sent row of each (token, k); None when some were dropped


class AllToAllDispatcher(Dispatcher):
    """Experts split over the EP group in contiguous blocks; tokens travel by uneven all-to-all."""

    syncs_host = True  # the split sizes: one device-to-host copy per layer

    def __init__(self, n_experts: int, ep_group, drops: bool = False, check_splits: bool = False,
                 transport: str | None = None):
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
        if transport not in (None, "blocks", "reorder"):
            raise ValueError(f"transport={transport!r}: choose 'blocks', 'reorder' or None (by device)")
        self.transport = transport

    def dispatch(self, x_TD, topk_idx_TK, overlap=None):
        T, K = topk_idx_TK.shape
        ep, El, E = self.ep, self.n_local_experts, self.n_experts
        # dropped (-1) assignments sort last and are not counted: they are never sent
        order, counts_E = sort_by_expert(topk_idx_TK, E)
        with comm_phase(self.timer):
            recv_counts, counts_pending = exchange_counts(counts_E, self.group, async_op=True)
        if not self.drops:  # every row is sent: gather them while the counts travel
            token_of_row = order // K
            # index_select, not x[idx]: a row-wise copy, several times faster than advanced indexing on CPU
            send_x = x_TD.index_select(0, token_of_row)
        with comm_phase(self.timer):
            counts_pending.wait()
            # The one device-to-host copy of this layer: rows per (destination rank, expert) sent, then per
            # (source rank, local expert) received; every split and block size comes from it.
            sizes = split_sizes(torch.cat([counts_E, recv_counts]), T * K)
        send_RL, recv_RL = sizes[:E], sizes[E:]
        input_splits = [sum(send_RL[r * El:(r + 1) * El]) for r in range(ep)]
        output_splits = [sum(recv_RL[r * El:(r + 1) * El]) for r in range(ep)]
        off_rank_rows = sum(input_splits) - input_splits[dist.get_rank(self.group)]
        self.bytes_sent += 2 * off_rank_rows * x_TD.shape[1] * x_TD.element_size()  # the combine returns as many
        if self.check_splits:
            check_peer_splits(input_splits, output_splits, self.group, x_TD.device)

        sent_row = order[:sum(input_splits)]  # experts are contiguous per rank: expert order = rank order
        if self.drops:
            token_of_row = sent_row // K
            send_x = x_TD.index_select(0, token_of_row)
        send_blocks = recv_blocks = to_expert_major = to_rank_major = None
        transport = self.transport or ("reorder" if x_TD.device.type == "cuda" else "blocks")
        if El > 1 and transport == "blocks":
            send_blocks, recv_blocks = _blocks(send_RL, recv_RL, ep, El)
            flight = exchange_blocks(send_x, send_blocks, recv_blocks, sum(output_splits), self.group,
                                     async_op=True, timer=self.timer)
        else:
            flight = all_to_all(send_x, input_splits, output_splits, self.group, async_op=True, timer=self.timer)
            if El > 1:
                to_expert_major, to_rank_major = _block_transpose(recv_counts.view(ep, El), sum(output_splits))
        overlap_result = overlap() if overlap is not None else None  # shared experts, while tokens fly
        # dropless (every assignment sent, known from the host-side splits): combine can gather the rows
        # back into (token, k) order and reduce them in one pass
        assign_order = inverse_permutation(order) if sum(input_splits) == T * K else None
        expert_x = flight.wait()  # times what the overlapped work did not hide
        if to_expert_major is not None:
            expert_x = expert_x.index_select(0, to_expert_major)
        handle = EPHandle(sent_row, token_of_row, input_splits, output_splits, send_blocks, recv_blocks,
                          to_expert_major, to_rank_major, T, overlap_result, assign_order)
        return expert_x, recv_counts.view(ep, El).sum(0), handle

    def combine(self, expert_y_ND, topk_weight_TK, handle: EPHandle, overlap=None):
        if handle.send_blocks is None:
            if handle.to_rank_major is not None:
                expert_y_ND = expert_y_ND.index_select(0, handle.to_rank_major)
            flight = all_to_all(expert_y_ND, handle.output_splits, handle.input_splits, self.group, async_op=True,
                                timer=self.timer)
        else:  # every block back to where it came from, in the sender's row order
            flight = exchange_blocks(expert_y_ND, handle.recv_blocks, handle.send_blocks, sum(handle.input_splits),
                                     self.group, async_op=True, timer=self.timer)
        if overlap is not None:
            handle.overlap_result = overlap()
        y_SD = flight.wait()
        if handle.assign_order is not None:
            # out[t] = sum_k w[t,k] * y[row of (t,k)] in fp32: one fused gather-and-sum over the rows as
            # they arrived (embedding_bag), no [T*K, d] temporary and no scatter-add
            T, K = topk_weight_TK.shape
            out = F.embedding_bag(handle.assign_order.view(T, K), y_SD.float(),
                                  per_sample_weights=topk_weight_TK.float(), mode="sum")
            return out.to(expert_y_ND.dtype)
        weight_S = topk_weight_TK.reshape(-1)[handle.sent_row].float()
        out = torch.zeros(handle.n_tokens, y_SD.shape[1], dtype=torch.float32, device=y_SD.device)
        # fp32 accumulation, as LocalDispatcher: a token's k expert outputs are summed in full precision
        out.index_add_(0, handle.token_of_row, y_SD.float() * weight_S[:, None])
        return out.to(expert_y_ND.dtype)


def split_sizes(counts_2E: torch.Tensor, n_assignments: int) -> list[int]:
    """Rows sent per (destination rank, expert), then received per (source rank, local expert), [2 * E]
    counts, as host integers: the layer's one device-to-host copy. The simulated rehearsal
    (dsmoe.train.simulate) swaps in balanced routing here, since fake tensors hold no counts;
    `n_assignments` (T * K) is what it splits."""
    return counts_2E.tolist()


def _blocks(send_RL: list, recv_RL: list, ep: int, El: int) -> tuple[list, list]:
    """(peer, local expert, first row, rows) blocks: sent rows are ordered (destination rank, expert);
    received rows land expert-major, (local expert, source rank), as the grouped GEMM wants them."""
    sends, row = [], 0
    for i, n in enumerate(send_RL):
        sends.append((i // El, i % El, row, n))
        row += n
    recvs, row = [], 0
    for e in range(El):
        for r in range(ep):
            n = recv_RL[r * El + e]
            recvs.append((r, e, row, n))
            row += n
    return sends, recvs


def _block_transpose(counts_RL: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather indices between rank-major rows (blocks (r, l) of counts_RL[r, l] rows, r outer) and
    expert-major rows (the same blocks, l outer), from the counts alone, on their device: no sort, no
    host copy. Returns (to_expert_major, to_rank_major), each [n] int64: expert-major row p is
    rank-major row to_expert_major[p], and rank-major row i is expert-major row to_rank_major[i]."""
    c_rm = counts_RL.reshape(-1)
    c_em = counts_RL.t().reshape(-1)
    start_rm = (torch.cumsum(c_rm, 0) - c_rm).view_as(counts_RL)  # first row of block (r, l), rank-major
    start_em = (torch.cumsum(c_em, 0) - c_em).view(counts_RL.shape[1], -1)  # the same block, expert-major
    rows = torch.arange(n, device=counts_RL.device)
    # a block keeps its row order: only its start moves
    to_em = rows + torch.repeat_interleave((start_rm.t() - start_em).reshape(-1), c_em, output_size=n)
    to_rm = rows + torch.repeat_interleave((start_em.t() - start_rm).reshape(-1), c_rm, output_size=n)
    return to_em, to_rm


def make_dispatcher(n_experts: int, mesh, drops: bool = False) -> Dispatcher:
    """LocalDispatcher when every expert is on this process (ep = 1), else the AllToAllDispatcher."""
    if mesh.ep == 1:
        return LocalDispatcher(n_experts, drops=drops)
    return AllToAllDispatcher(n_experts, mesh.ep_group, drops=drops)
