"""Communication primitives for expert parallelism: an autograd-aware uneven all-to-all and helpers.

An uneven `all_to_all_single` whose split sizes disagree between ranks hangs instead of failing, so
every call here validates its shapes on the calling rank before entering a collective, and
`check_peer_splits` can verify the cross-rank agreement (rank r sends to s exactly what s expects from
r) with every rank raising the same error.
"""
from __future__ import annotations

import contextlib
from typing import Sequence

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
    """A collective on its way: `wait()` before reading its output (keeps the buffers alive until then).
    `work`: one torch.distributed Work, a list of them, or None (already complete)."""

    def __init__(self, work, *buffers):
        self.works = work if isinstance(work, list) else [work] if work is not None else []
        self.buffers = buffers

    def wait(self) -> None:
        for work in self.works:
            work.wait()
        self.works, self.buffers = [], ()


Block = tuple  # (group rank of the peer, tag, first row, rows): one contiguous run of rows to or from a peer


class _Route:
    """Where rows go: an uneven all_to_all_single (`splits`) or blocks of point-to-point messages
    (`blocks`); `run` moves rows forward or, for the gradient, in reverse."""

    def __init__(self, group, timer, splits=None, blocks=None, n_rows=None):
        self.group, self.timer, self.splits, self.blocks, self.n_rows = group, timer, splits, blocks, n_rows

    def run(self, x: torch.Tensor, reverse: bool, async_op: bool):
        """(out, works): `works` to wait on before reading `out` (empty unless async_op)."""
        x = x.contiguous()
        if self.splits is not None:
            ins, outs = self.splits[::-1] if reverse else self.splits
            out = x.new_empty((sum(outs), *x.shape[1:]))
            work = dist.all_to_all_single(out, x, list(outs), list(ins), group=self.group, async_op=async_op)
            return out, [work] if async_op else []
        sends, recvs = self.blocks[::-1] if reverse else self.blocks
        return _exchange(x, sends, recvs, self.n_rows[0 if reverse else 1], self.group, async_op)


def _exchange(x: torch.Tensor, sends: Sequence[Block], recvs: Sequence[Block], n_out: int, group, async_op: bool):
    """Post every block as a point-to-point message (blocks to this rank are copies); (out, works)."""
    out = x.new_empty((n_out, *x.shape[1:]))
    me = dist.get_rank(group)
    own = {tag: (start, n) for peer, tag, start, n in sends if peer == me}
    ops = []
    for peer, tag, start, n in recvs:
        if peer == me:
            src, count = own[tag]
            out[start:start + n].copy_(x[src:src + count])
        elif n:
            ops.append(dist.P2POp(dist.irecv, out[start:start + n], dist.get_global_rank(group, peer), group, tag))
    ops += [dist.P2POp(dist.isend, x[start:start + n], dist.get_global_rank(group, peer), group, tag)
            for peer, tag, start, n in sends if peer != me and n]
    works = dist.batch_isend_irecv(ops) if ops else []
    if not async_op:
        for w in works:
            w.wait()
        works = []
    return out, works


class _Link:
    """What the two autograd nodes of one asynchronous exchange share."""

    def __init__(self):
        self.works, self.buffers = [], ()  # forward exchange in flight
        self.grad, self.grad_works = None, []  # reverse exchange, launched by _Wait's backward


class _Start(torch.autograd.Function):
    """Launch the exchange. Backward: collect the reverse exchange _Wait's backward launched (what
    backward ran in between overlapped it), or run it here when the output was used without _Wait."""

    @staticmethod
    def forward(ctx, x, route, link):
        ctx.route, ctx.link = route, link
        out, works = route.run(x, reverse=False, async_op=link is not None)
        if link is not None:
            link.works, link.buffers = works, (out, x)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        link = ctx.link
        with comm_phase(ctx.route.timer):
            if link is not None and link.grad is not None:
                for w in link.grad_works:
                    w.wait()
                grad_in, link.grad, link.grad_works = link.grad, None, []
            else:
                grad_in, _ = ctx.route.run(grad_out, reverse=True, async_op=False)
        return grad_in, None, None


class _Wait(torch.autograd.Function):
    """Wait for the exchange. Backward: launch the reverse exchange and return at once; _Start's
    backward collects it."""

    @staticmethod
    def forward(ctx, out, route, link):
        ctx.route, ctx.link = route, link
        with comm_phase(route.timer):
            for w in link.works:
                w.wait()
        link.works, link.buffers = [], ()
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad_out):
        with comm_phase(ctx.route.timer):
            ctx.link.grad, ctx.link.grad_works = ctx.route.run(grad_out, reverse=True, async_op=True)
        return grad_out, None, None  # a placeholder: _Start ignores it


class InFlight:
    """An exchange under way. `wait()` returns its output (differentiable). Work run between the launch
    and `wait()` overlaps the exchange, and in backward the reverse exchange overlaps that work's
    backward: autograd runs it between `wait()`'s backward, which launches the reverse exchange, and
    the launch's backward, which collects it."""

    def __init__(self, out: torch.Tensor, route: _Route, link: _Link):
        self.out, self.route, self.link = out, route, link

    def wait(self) -> torch.Tensor:
        return _Wait.apply(self.out, self.route, self.link)


def _launch(x: torch.Tensor, route: _Route, async_op: bool):
    with comm_phase(route.timer):
        if not async_op:
            return _Start.apply(x, route, None)
        link = _Link()
        return InFlight(_Start.apply(x, route, link), route, link)


def exchange_blocks(x: torch.Tensor, sends: Sequence[Block], recvs: Sequence[Block], n_out: int, group=None,
                    async_op: bool = False, timer=None):
    """Send blocks of rows of x [n, ...] to peers and receive blocks into a new [n_out, ...] tensor, each
    at its own offset: an all-to-all whose output needs no reordering afterwards.

    sends / recvs: (group rank of the peer, tag, first row, rows) per block; a peer's send and its
    receive with the same tag match (so each pair of ranks must agree on the blocks between them), and
    blocks between this rank and itself are copies. Differentiable. Returns the output, or with
    async_op an InFlight whose `wait()` returns it. Raises SplitMismatchError when the blocks overrun
    x or the output."""
    for name, blocks, rows in (("send", sends, x.shape[0]), ("receive", recvs, n_out)):
        bad = [b for b in blocks if b[2] < 0 or b[3] < 0 or b[2] + b[3] > rows]
        if bad:
            raise SplitMismatchError(f"exchange_blocks on {_where(group)}: {name} blocks {bad} (peer, tag, first "
                                     f"row, rows) fall outside the {rows} rows")
    route = _Route(group, timer, blocks=(tuple(sends), tuple(recvs)), n_rows=(x.shape[0], n_out))
    return _launch(x, route, async_op)


def comm_phase(timer):
    """Time a communication as the step timer's `moe_comm` phase (nothing without a timer)."""
    return timer.phase("moe_comm") if timer is not None else contextlib.nullcontext()


def all_to_all(x: torch.Tensor, input_splits: Sequence[int], output_splits: Sequence[int], group=None,
               async_op: bool = False, check_peers: bool = False, timer=None):
    """Send rows x[sum(input_splits[:s]) : ...] to group rank s; receive output_splits[r] rows from r.

    Differentiable; backward is the reverse exchange with the splits swapped. Returns the output, or
    with async_op an InFlight whose `wait()` returns it (work that does not need it runs meanwhile).
    `check_peers` adds the cross-rank check (one extra small collective): use it for splits that were
    not derived from exchanged counts. `timer`: a StepTimer that gets the exchanges, waits and
    backward as `moe_comm`.
    """
    validate_splits(x.shape[0], input_splits, output_splits, group)
    if check_peers:
        check_peer_splits(input_splits, output_splits, group, x.device)
    return _launch(x, _Route(group, timer, splits=(tuple(input_splits), tuple(output_splits))), async_op)


def exchange_counts(counts_E: torch.Tensor, group=None, async_op: bool = False):
    """Each rank sends rank s the counts of s's contiguous block of E/G experts.

    Returns [G * E/G] int64 on the same device: block r holds what rank r sends to this rank's experts;
    with async_op, (that tensor, a Pending to `wait()` on before reading it).
    """
    G = dist.get_world_size(group)
    if counts_E.dim() != 1 or counts_E.numel() % G:
        raise SplitMismatchError(f"exchange_counts on {_where(group)}: counts of shape {tuple(counts_E.shape)} "
                                 f"do not split evenly over the {G} ranks {_group_ranks(group)}")
    counts_E = counts_E.to(torch.int64).contiguous()
    recv = torch.empty_like(counts_E)
    work = dist.all_to_all_single(recv, counts_E, group=group, async_op=async_op)
    return (recv, Pending(work, recv, counts_E)) if async_op else recv
