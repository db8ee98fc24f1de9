"""Communication primitives for expert parallelism: an autograd-aware uneven all-to-all and helpers.

An uneven `all_to_all_single` whose split sizes disagree between ranks hangs instead of failing, so
every call here validates its shapes on the calling rank before entering a collective, and
`check_peer_splits` can verify the cross-rank agreement (rank r sends to s exactly what s expects from
r) with every rank raising the same error.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch
import torch.distributed as dist


class SplitMismatchError(RuntimeError):
    """Split sizes of an uneven all-to-all disagree with the tensor or with another rank."""


def _group_ranks(group) -> list[int]:
    return dist.get_process_group_ranks(group or dist.group.WORLD)


def _where(group) -> str:
    ranks = _group_ranks(group)
    return f"rank {dist.get_rank()} (index {dist.get_rank(group)} of group ranks {ranks})"


def validate_splits(n_rows: int, input_splits: Sequence[int], output_splits: Sequence[int], group) -> None:
    """Local checks, before any collective: one split per group member, none negative, rows = sum(inputs)."""
    G = dist.get_world_size(group)
    ranks = _group_ranks(group)
    for name, splits in (("input_split_sizes", input_splits), ("output_split_sizes", output_splits)):
        if len(splits) != G:
            raise SplitMismatchError(f"all_to_all on {_where(group)}: {name} has {len(splits)} entries, "
                                     f"need one per rank of the group ({G}: ranks {ranks})")
        bad = [f"rank {ranks[i]}: {n}" for i, n in enumerate(splits) if n < 0]
        if bad:
            raise SplitMismatchError(f"all_to_all on {_where(group)}: negative {name} ({', '.join(bad)})")
    if n_rows != sum(input_splits):
        raise SplitMismatchError(
            f"all_to_all on {_where(group)}: the input has {n_rows} rows but input_split_sizes "
            f"{list(input_splits)} (rows for ranks {ranks}) sum to {sum(input_splits)}")


def check_peer_splits(input_splits: Sequence[int], output_splits: Sequence[int], group,
                      device: torch.device | str = "cpu") -> None:
    """Cross-rank check: what rank r sends to rank s equals what s expects from r.

    One small all_gather of every rank's split lists (and a host copy), so every rank sees every
    mismatch and raises the same error: no rank is left waiting in the data collective. Call it with
    splits that passed `validate_splits` (equal lengths on every rank).
    """
    G, ranks = dist.get_world_size(group), _group_ranks(group)
    mine = torch.tensor([list(input_splits), list(output_splits)], dtype=torch.int64, device=device)
    every = [torch.empty_like(mine) for _ in range(G)]
    dist.all_gather(every, mine, group=group)
    sends_GG, expects_GG = torch.stack(every).transpose(0, 1).tolist()  # [r][s]: r sends to s, r expects from s
    bad = [f"rank {ranks[r]} sends {sends_GG[r][s]} rows to rank {ranks[s]}, which expects {expects_GG[s][r]}"
           for r in range(G) for s in range(G) if sends_GG[r][s] != expects_GG[s][r]]
    if bad:
        raise SplitMismatchError("uneven all_to_all split sizes disagree between ranks: " + "; ".join(bad))


class Pending:
    """An in-flight all-to-all: `wait()` before reading its output (keeps both buffers alive until then)."""

    def __init__(self, work, *buffers):
        self.work, self.buffers = work, buffers

    def wait(self) -> None:
        if self.work is not None:
            self.work.wait()
        self.work, self.buffers = None, ()


class _AllToAll(torch.autograd.Function):
    """Uneven all_to_all_single; backward is the reverse exchange with the splits swapped."""

    @staticmethod
    def forward(ctx, x, input_splits, output_splits, group, pending: Optional[list], timer):
        ctx.input_splits, ctx.output_splits, ctx.group, ctx.timer = input_splits, output_splits, group, timer
        x = x.contiguous()
        out = x.new_empty((sum(output_splits), *x.shape[1:]))
        work = dist.all_to_all_single(out, x, list(output_splits), list(input_splits), group=group,
                                      async_op=pending is not None)
        if pending is not None:
            pending.append(Pending(work, out, x))
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grad_out = grad_out.contiguous()
        grad_in = grad_out.new_empty((sum(ctx.input_splits), *grad_out.shape[1:]))
        with comm_phase(ctx.timer):
            dist.all_to_all_single(grad_in, grad_out, list(ctx.input_splits), list(ctx.output_splits), group=ctx.group)
        return grad_in, None, None, None, None, None


def comm_phase(timer):
    """Time a communication as the step timer's `moe_comm` phase (nothing without a timer)."""
    return timer.phase("moe_comm") if timer is not None else contextlib.nullcontext()


def all_to_all(x: torch.Tensor, input_splits: Sequence[int], output_splits: Sequence[int], group=None,
               async_op: bool = False, check_peers: bool = False, timer=None):
    """Send rows x[sum(input_splits[:s]) : ...] to group rank s; receive output_splits[r] rows from r.

    Differentiable. Returns (out, pending): with async_op, call `pending.wait()` before reading `out`
    (work that does not need `out` can run meanwhile); without it, pending is None.
    `check_peers` adds the cross-rank check (one extra small collective): use it for splits that were
    not derived from exchanged counts. `timer`: a StepTimer that gets this exchange and its backward
    as `moe_comm` (the async launch only; time the wait yourself).
    """
    validate_splits(x.shape[0], input_splits, output_splits, group)
    if check_peers:
        check_peer_splits(input_splits, output_splits, group, x.device)
    pending: Optional[list] = [] if async_op else None
    with comm_phase(timer):
        out = _AllToAll.apply(x, tuple(input_splits), tuple(output_splits), group, pending, timer)
    return out, (pending[0] if async_op else None)


def exchange_counts(counts_E: torch.Tensor, group=None) -> torch.Tensor:
    """Each rank sends rank s the counts of s's contiguous block of E/G experts.

    Returns [G * E/G] int64 on the same device: block r holds what rank r sends to this rank's experts.
    """
    G = dist.get_world_size(group)
    if counts_E.dim() != 1 or counts_E.numel() % G:
        raise SplitMismatchError(f"exchange_counts on {_where(group)}: counts of shape {tuple(counts_E.shape)} "
                                 f"do not split evenly over the {G} ranks {_group_ranks(group)}")
    counts_E = counts_E.to(torch.int64).contiguous()
    recv = torch.empty_like(counts_E)
    dist.all_to_all_single(recv, counts_E, group=group)
    return recv
