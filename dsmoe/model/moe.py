"""DeepSeekMoE: router, stacked routed experts (grouped GEMM), shared experts, over a Dispatcher."""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._subclasses.fake_tensor import is_fake

from dsmoe.config import Config
from dsmoe.model.dispatch import Dispatcher, LocalDispatcher, count_per_expert
from dsmoe.model.grouped_mm import GROUPED_MM, GROUPED_MM_DTYPES, grouped_mm


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.w_gate = nn.Linear(d_model, hidden, bias=False)
        self.w_up = nn.Linear(d_model, hidden, bias=False)
        self.w_down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(self.hidden(x))

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """silu(x W_gate) * (x W_up): the input of w_down."""
        return F.silu(self.w_gate(x)) * self.w_up(x)


@dataclass
class Routing:
    topk_idx: torch.Tensor  # [T, K] long; -1 where the capacity limit dropped the assignment
    topk_weight: torch.Tensor  # [T, K] fp32 gate weights (0 where dropped)
    counts: torch.Tensor  # [E] fp32 assignments per expert before any drop (drives the bias update)
    dropped: torch.Tensor  # scalar fp32: assignments dropped by the capacity limit
    aux_loss: torch.Tensor  # scalar fp32: sequence-wise balance loss + z-loss (weighted)


def capacity_keep(topk_idx_TK: torch.Tensor, n_experts: int, capacity: int) -> torch.Tensor:
    """Keep each expert's first `capacity` assignments in token order (earlier tokens win)."""
    flat = topk_idx_TK.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = count_per_expert(flat, n_experts)
    starts = torch.cumsum(counts, 0) - counts
    rank_in_expert = torch.empty_like(flat)
    rank_in_expert[order] = torch.arange(flat.numel(), device=flat.device) - starts[flat[order]]
    return (rank_in_expert < capacity).view_as(topk_idx_TK)


class Router(nn.Module):
    """Top-k routing with fp32 scores; the aux-loss-free bias only chooses experts, never weighs them."""

    def __init__(self, cfg: Config):
        super().__init__()
        e = cfg.moe
        self.cfg = e
        self.n_experts, self.top_k = e.n_routed_experts, e.top_k
        self.weight = nn.Parameter(torch.empty(e.n_routed_experts, cfg.model.d_model))
        self.register_buffer("expert_bias", torch.zeros(e.n_routed_experts, dtype=torch.float32))

    def forward(self, x_TD: torch.Tensor, n_seqs: int) -> Routing:
        e = self.cfg
        with torch.autocast(x_TD.device.type, enabled=False):  # routing decisions in fp32, always
            logits_TE = F.linear(x_TD.float(), self.weight.float())
            scores_TE = logits_TE.sigmoid() if e.score_func == "sigmoid" else logits_TE.softmax(-1)
        choice_TE = scores_TE.detach() + self.expert_bias
        if e.n_groups > 1:
            choice_TE = self._limit_groups(choice_TE)
        topk_idx = choice_TE.topk(self.top_k, dim=-1).indices
        weight_TK = scores_TE.gather(1, topk_idx)
        if e.norm_topk_prob and self.top_k > 1:
            weight_TK = weight_TK / (weight_TK.sum(-1, keepdim=True) + 1e-20)
        weight_TK = weight_TK * e.routed_scaling_factor
        counts = count_per_expert(topk_idx, self.n_experts).float()

        dropped = torch.zeros((), device=x_TD.device)
        if e.capacity_factor is not None:
            T = x_TD.shape[0]
            capacity = max(1, math.ceil(e.capacity_factor * T * self.top_k / self.n_experts))
            keep_TK = capacity_keep(topk_idx, self.n_experts, capacity)
            dropped = (~keep_TK).sum().float()
            topk_idx = torch.where(keep_TK, topk_idx, -1)
            weight_TK = weight_TK * keep_TK

        aux = torch.zeros((), device=x_TD.device)
        if e.seq_aux_loss_coef > 0 and self.training:
            aux = aux + e.seq_aux_loss_coef * self.sequence_balance_loss(scores_TE, topk_idx, n_seqs)
        if e.z_loss_coef > 0 and self.training:
            aux = aux + e.z_loss_coef * torch.logsumexp(logits_TE, dim=-1).pow(2).mean()
        return Routing(topk_idx, weight_TK, counts, dropped, aux)

    def _limit_groups(self, choice_TE: torch.Tensor) -> torch.Tensor:
        """Keep only the topk_groups best groups (a group scores by its two best experts, as in V3)."""
        e = self.cfg
        T = choice_TE.shape[0]
        grouped = choice_TE.view(T, e.n_groups, -1)
        per_group = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)
        best_groups = per_group.topk(e.topk_groups, dim=-1).indices
        mask_TG = torch.zeros_like(per_group, dtype=torch.bool).scatter_(1, best_groups, True)
        return grouped.masked_fill(~mask_TG[..., None], float("-inf")).view(T, -1)

    def sequence_balance_loss(self, scores_TE: torch.Tensor, topk_idx_TK: torch.Tensor, n_seqs: int) -> torch.Tensor:
        """DeepSeek-V3's sequence-wise loss: sum_i f_i * P_i per sequence, averaged over sequences."""
        E, K = self.n_experts, self.top_k
        scores_BSE = scores_TE.view(n_seqs, -1, E)
        S = scores_BSE.shape[1]
        probs_BSE = scores_BSE / scores_BSE.sum(-1, keepdim=True)
        chosen = topk_idx_TK.view(n_seqs, S * K)
        hits_BE = torch.zeros(n_seqs, E, device=scores_TE.device).scatter_add_(
            1, chosen.clamp(min=0), (chosen >= 0).float())
        f_BE = hits_BE * (E / (K * S))
        return (f_BE * probs_BSE.mean(1)).sum(-1).mean()


def update_expert_bias(router: Router, counts_E: torch.Tensor, rate: float) -> None:
    """bias += rate * sign(mean_load - load); call once per optimizer step with counts summed over ranks."""
    with torch.no_grad():
        router.expert_bias += rate * torch.sign(counts_E.mean() - counts_E)


EXPERT_DTYPES = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_warned: set = set()  # fallback reasons already warned about (once per process each)
_no_kernel: dict = {}  # (device type, dtype) -> why grouped_mm has no kernel there (the error it raised)
# RuntimeErrors aten's CUDA grouped_mm raises for what the loop can still compute (GroupedMMUtils.h,
# Blas.cpp): no kernel for this GPU (kept per device and dtype), and a misaligned operand (this call only)
NO_KERNEL_ERRORS = ("grouped mm is not supported",)
MISALIGNED_ERRORS = ("expected data_ptr to be aligned",)


def _warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"GroupedExperts runs the per-expert loop: {reason}", RuntimeWarning, stacklevel=3)


class GroupedExperts(nn.Module):
    """E SwiGLU experts with stacked weights w_gate/w_up [E, d, f] and w_down [E, f, d].

    Under expert parallelism this holds experts [first, first + E) of `n_total` (its EP rank's slice).

    impl "grouped" computes each projection as one `grouped_mm` over all experts, for every dtype
    torch's grouped GEMM takes (GROUPED_MM_DTYPES) on every device. On CUDA only bf16 on sm90/sm100
    gets a grouped kernel; elsewhere aten runs its own loop of per-expert GEMMs, copying the offsets to
    the host once per call. The T4 (sm_75, fp16) takes that path on purpose: the same GEMMs as our
    loop, written in place, and no graph break under torch.compile, for one small host copy per GEMM
    (`moe.expert_impl=loop` has one per layer instead). The loop runs, with a warning naming the reason
    once per process, only where grouped_mm cannot: no grouped_mm in this torch, a dtype it does not
    take, rows or operands that are not 16-byte aligned, or no kernel for the device (NotImplementedError,
    or CUDA's RuntimeErrors in NO_KERNEL_ERRORS / MISALIGNED_ERRORS). Any other error, an out-of-memory
    error included, propagates.

    `dtype` (moe.expert_dtype) fixes the GEMMs' dtype whatever autocast says; the weights stay in their
    own (fp32 master) dtype and the output returns in the input's dtype. None follows autocast."""

    def __init__(self, n_experts: int, d_model: int, hidden: int, impl: str = "grouped",
                 n_total: int | None = None, first: int = 0, dtype: torch.dtype | None = None):
        super().__init__()
        self.impl = impl
        self.dtype = dtype
        self.n_total, self.first = n_total or n_experts, first
        self.w_gate = nn.Parameter(torch.empty(n_experts, d_model, hidden))
        self.w_up = nn.Parameter(torch.empty(n_experts, d_model, hidden))
        self.w_down = nn.Parameter(torch.empty(n_experts, hidden, d_model))

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """x_ND: [N, d] rows grouped by expert (counts_E [E] rows each, then padding); returns [N, d]."""
        if self.dtype is not None:
            return self._forward(x_ND.to(self.dtype), counts_E, self.dtype).to(x_ND.dtype)
        dtype = torch.get_autocast_dtype(x_ND.device.type) if torch.is_autocast_enabled(x_ND.device.type) else x_ND.dtype
        return self._forward(x_ND.to(dtype), counts_E, dtype)

    def _forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        w_gate, w_up, w_down = (w.to(dtype) for w in (self.w_gate, self.w_up, self.w_down))
        if self.impl == "grouped":
            reason = self.fallback_reason(x_ND, w_gate, w_up, w_down)
            if reason is None:
                try:
                    return self._grouped(x_ND, counts_E, w_gate, w_up, w_down)
                except NotImplementedError as e:  # no kernel for this device: everything else propagates
                    _no_kernel[(x_ND.device.type, dtype)] = reason = f"grouped_mm is not implemented here ({e})"
                except RuntimeError as e:
                    msg = str(e)
                    if any(m in msg for m in NO_KERNEL_ERRORS):
                        _no_kernel[(x_ND.device.type, dtype)] = reason = f"grouped_mm is not supported here ({msg})"
                    elif any(m in msg for m in MISALIGNED_ERRORS):
                        reason = f"grouped_mm needs 16-byte aligned operands ({msg})"
                    else:
                        raise
            _warn_once(reason)
        return self._loop(x_ND, counts_E, w_gate, w_up, w_down)

    def fallback_reason(self, x_ND: torch.Tensor, *weights: torch.Tensor) -> str | None:
        """Why rows like `x_ND` (in their compute dtype) times `weights` cannot take grouped_mm; None when
        they can."""
        dev, dtype = x_ND.device.type, x_ND.dtype
        if GROUPED_MM is None:
            return f"torch {torch.__version__} has no grouped_mm (torch >= 2.8 has)"
        if dtype not in GROUPED_MM_DTYPES:
            return f"grouped_mm takes fp32, bf16 and fp16, not {dtype} (on {dev})"
        row_elems = 16 // x_ND.element_size()
        d, f = self.w_gate.shape[1:]
        if d % row_elems or f % row_elems:
            return (f"grouped_mm needs 16-byte aligned rows: d_model {d} and expert_hidden {f} must be multiples "
                    f"of {row_elems} in {dtype}")
        # a view into a larger buffer (a slice, an FSDP shard) may start off a 16-byte boundary; fake
        # tensors (torch.compile tracing, the simulated rehearsal) have no address to check
        if not torch.compiler.is_compiling() and any(not is_fake(t) and t.data_ptr() % 16 for t in (x_ND, *weights)):
            return "grouped_mm needs 16-byte aligned operands: an input starts off a 16-byte boundary"
        return _no_kernel.get((dev, dtype))

    @staticmethod
    def _grouped(x_ND, counts_E, w_gate, w_up, w_down):
        offs = torch.cumsum(counts_E, 0, dtype=torch.int32)
        h = F.silu(grouped_mm(x_ND, w_gate, offs)) * grouped_mm(x_ND, w_up, offs)
        return grouped_mm(h, w_down, offs)

    @staticmethod
    def _loop(x_ND, counts_E, w_gate, w_up, w_down):
        """Reference: one matmul chain per expert (one host sync for the counts).

        split/unbind views, not per-expert indexing: indexing makes backward build a full-size
        zero tensor per expert. An empty chunk keeps its expert in the graph (zero gradient)."""
        counts = counts_E.tolist()
        padding = x_ND.shape[0] - sum(counts)  # rows of capacity-dropped assignments
        chunks = x_ND.split(counts + [padding])
        outs = [(F.silu(xs @ g) * (xs @ u)) @ d
                for xs, g, u, d in zip(chunks, w_gate.unbind(0), w_up.unbind(0), w_down.unbind(0))]
        return torch.cat(outs + [torch.zeros_like(chunks[-1])])


def run_here(fn: Callable, *args):
    """The default way to run a piece of a layer: just call it."""
    return fn(*args)


class MoE(nn.Module):
    """Shared experts + routed experts; tokens reach the routed experts through a Dispatcher."""

    def __init__(self, cfg: Config, dispatcher: Dispatcher | None = None):
        super().__init__()
        e = cfg.moe
        self.router = Router(cfg)
        self.dispatcher = dispatcher or LocalDispatcher(e.n_routed_experts, drops=e.capacity_factor is not None)
        self.experts = GroupedExperts(self.dispatcher.n_local_experts, cfg.model.d_model, e.expert_hidden,
                                      e.expert_impl, n_total=e.n_routed_experts,
                                      first=getattr(self.dispatcher, "first_expert", 0),
                                      dtype=EXPERT_DTYPES[e.expert_dtype])
        self.shared = SwiGLU(cfg.model.d_model, e.n_shared_experts * e.expert_hidden) if e.n_shared_experts else None

    def forward(self, x_BSD: torch.Tensor, run_local: Callable = run_here) -> tuple[torch.Tensor, Routing]:
        """`run_local(fn, *args)` runs the pieces that stay on this rank (router, routed experts, shared
        experts), so a checkpointing policy can recompute them without the dispatch and combine between
        them, which hold the expert-parallel collectives and their host sync."""
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        routing = run_local(self.router, x_TD, B)
        if torch.is_autocast_enabled(x_TD.device.type):  # move and gather tokens in the compute dtype
            x_TD = x_TD.to(torch.get_autocast_dtype(x_TD.device.type))
        route = _route_eager if self.dispatcher.syncs_host else _route
        y_TD = route(self, x_TD, routing, run_local, x_BSD.dtype)
        return y_TD.view(B, S, D), routing


def _route(moe: MoE, x_TD: torch.Tensor, routing: Routing, run_local: Callable, dtype: torch.dtype) -> torch.Tensor:
    """Dispatch, routed experts, combine, plus the shared experts: [T, d]. Their gate and up
    projections run while the tokens travel to the experts, the down projection while the results
    travel back (in backward, the reverse exchanges overlap those projections' backward)."""
    shared = moe.shared
    hidden_fn = (lambda: run_local(shared.hidden, x_TD)) if shared is not None else None
    expert_x, counts, handle = moe.dispatcher.dispatch(x_TD, routing.topk_idx, overlap=hidden_fn)
    expert_y = run_local(moe.experts, expert_x, counts)
    down_fn = (lambda: run_local(shared.w_down, handle.overlap_result)) if shared is not None else None
    y_TD = moe.dispatcher.combine(expert_y, routing.topk_weight, handle, overlap=down_fn).to(dtype)
    if shared is not None:
        y_TD = y_TD + handle.overlap_result
    return y_TD


# Under torch.compile a dispatcher that copies split sizes to the host (expert parallelism) runs the
# whole route eagerly: one graph break at the sync, and the row counts that change every step never
# reach a compiled graph (each new count would recompile it).
_route_eager = torch.compiler.disable(_route)
