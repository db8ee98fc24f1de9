"""Expert parallelism on gloo: one MoE layer over the AllToAllDispatcher equals the single-process layer.

Every rank builds the same full MoE (same seed) and keeps only its slice of the stacked expert
weights; each rank feeds its own tokens. The reference is the full single-process MoE run on each
rank's tokens (same routing: the router is replicated). Each process launch costs seconds, so one
launch checks every case for a world size.
"""
import pytest
import torch
import torch.distributed as dist

from dsmoe.config import load_config
from dsmoe.model import moe as moe_module
from dsmoe.model.moe import MoE
from dsmoe.parallel.comm import SplitMismatchError, all_to_all
from dsmoe.parallel.dispatch import AllToAllDispatcher
from dsmoe.parallel.mesh import init_mesh
from distributed import run_workers

E, D, B, S = 8, 16, 2, 5
CASES = ("plain", "skewed", "local_only", "drops", "empty_rank")
TRANSPORTS = ("blocks", "reorder")  # per-block messages into place / one all-to-all and a reorder


def case_cfg(case, impl="grouped"):
    moe = {"expert_impl": impl, "n_routed_experts": E, "n_shared_experts": 1, "top_k": 1 if case == "skewed" else 2,
           "expert_hidden": 8, "capacity_factor": 0.5 if case == "drops" else None}
    return load_config(None, {"train": {"seq_len": 16}, "model": {"max_seq_len": 32, "d_model": D, "n_heads": 2},
                              "moe": moe})


def rank_bias(case, r, ep):
    """The router's expert_bias on rank r; it only chooses experts, so it may differ per rank here."""
    bias = torch.zeros(E)
    if case == "skewed":
        bias[E - 1] = 10.0  # every token of every rank to the last expert: other experts and ranks get nothing
    if case == "local_only":
        El = E // ep
        bias[(r % ep) * El:(r % ep + 1) * El] = 10.0  # each rank sends only to itself
    return bias


def rank_tokens(case, r):
    g = torch.Generator().manual_seed(100 + r)
    s = 0 if case == "empty_rank" and r == 0 else S  # rank 0 has no tokens at all
    return torch.randn(B, s, D, generator=g), torch.randn(B, s, D, generator=g)  # input, upstream gradient


def close(actual, expected, what):
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5, msg=lambda m: f"{what}\n{m}")


def check_case(mesh, case, transport="blocks"):
    rank, world, ep = mesh.rank, mesh.world, mesh.ep
    cfg = case_cfg(case)
    torch.manual_seed(0)
    # The reference runs the per-expert loop: with capacity drops, grouped_mm leaves the padding rows'
    # outputs uninitialised and LocalDispatcher.combine multiplies before masking, so the single-process
    # router gradient can pick up NaN (0 * garbage). The EP path sends no padding rows.
    full = MoE(case_cfg(case, impl="loop"))
    for p in full.parameters():
        torch.nn.init.normal_(p, 0, 0.3)
    El = E // ep
    e0, e1 = mesh.ep_rank * El, (mesh.ep_rank + 1) * El

    dispatcher = AllToAllDispatcher(E, mesh.ep_group, drops=cfg.moe.capacity_factor is not None, transport=transport)
    assert dispatcher.n_local_experts == El
    moe = MoE(cfg, dispatcher)
    state = full.state_dict()
    for name in ("w_gate", "w_up", "w_down"):
        state[f"experts.{name}"] = state[f"experts.{name}"][e0:e1]
    moe.load_state_dict(state)
    moe.router.expert_bias.copy_(rank_bias(case, rank, ep))
    x, gy = rank_tokens(case, rank)
    x.requires_grad_()
    y, routing = moe(x)
    (y * gy).sum().backward()

    # reference: the full layer on every rank's tokens; grads of replicated weights summed over the world,
    # expert grads summed over my EP group (the all-to-all backward brings exactly those ranks' tokens)
    my_group = range(rank - mesh.ep_rank, rank - mesh.ep_rank + ep)
    expert_ref = {n: torch.zeros_like(p[e0:e1]) for n, p in full.experts.named_parameters()}
    replicated_ref = {n: torch.zeros_like(p) for n, p in full.named_parameters() if not n.startswith("experts.")}
    for r in range(world):
        full.zero_grad()
        full.router.expert_bias.copy_(rank_bias(case, r, ep))
        xr, gyr = rank_tokens(case, r)
        xr.requires_grad_()
        yr, routing_r = full(xr)
        (yr * gyr).sum().backward()
        if r == rank:
            close(y, yr, f"{case} ep={ep} rank {rank}: output")
            close(x.grad, xr.grad, f"{case} ep={ep} rank {rank}: input grad")
            assert torch.equal(routing.topk_idx, routing_r.topk_idx)
        for n, p in full.named_parameters():
            if n in replicated_ref:
                replicated_ref[n] += p.grad
            elif r in my_group:
                expert_ref[n.removeprefix("experts.")] += p.grad[e0:e1]

    # Replicated weights (router, shared expert) see only this rank's tokens here; data parallelism
    # would average them over ranks, so compare the sum of the per-rank grads with the reference sum.
    for n, p in moe.named_parameters():
        if n.startswith("experts."):
            close(p.grad, expert_ref[n.removeprefix("experts.")], f"{case} ep={ep} rank {rank}: grad {n}")
        else:
            grad = p.grad.clone()
            dist.all_reduce(grad)
            close(grad, replicated_ref[n], f"{case} ep={ep} rank {rank}: summed grad {n}")

    # the case really is what its name says
    if case == "skewed" and e1 < E:
        assert moe.experts.w_gate.grad.abs().sum() == 0  # got no tokens: zero gradient, still in the graph
    if case == "local_only":
        assert (routing.topk_idx // El == mesh.ep_rank).all()
    if case == "drops":
        assert routing.dropped > 0 and (routing.topk_idx < 0).any()
    assert moe.router.weight.grad is not None
    return case


def _ep_worker(rank, world, eps):
    done = []
    for ep in eps:
        mesh = init_mesh(device="cpu", ep=ep)  # the harness already started the group: builds groups only
        assert mesh.ep_group is not None and dist.get_world_size(mesh.ep_group) == ep
        done += [(ep, check_case(mesh, case, t)) for case in CASES for t in TRANSPORTS]
    assert not moe_module._warned  # the EP side really ran the grouped GEMM: no fallback to the loop
    return done


@pytest.mark.parametrize("world,eps", [(2, (2,)), (4, (4, 2))])
def test_ep_layer_equals_single_process(world, eps):
    """ep = world, and at world 4 also edp x ep = 2 x 2; every case in one launch per world size."""
    results = run_workers(_ep_worker, world, args=(eps,))
    assert all(r == [(ep, c) for ep in eps for c in CASES for _ in TRANSPORTS] for r in results)


def _comm_worker(rank, world):
    group = dist.group.WORLD
    msgs = {}
    # an uneven exchange with autograd: rank r sends r*(s+1) rows to s (rank 0 sends nothing)
    in_splits = [rank * (s + 1) for s in range(world)]
    out_splits = [r * (rank + 1) for r in range(world)]
    x = (100.0 * rank + torch.arange(sum(in_splits) * 3, dtype=torch.float32).view(-1, 3)).requires_grad_()
    out = all_to_all(x, in_splits, out_splits, group, async_op=True).wait()
    expected = []
    for r in range(world):
        start = sum(r * (s + 1) for s in range(rank))
        src = 100.0 * r + torch.arange(sum(r * (s + 1) for s in range(world)) * 3, dtype=torch.float32).view(-1, 3)
        expected.append(src[start:start + r * (rank + 1)])
    torch.testing.assert_close(out, torch.cat(expected))
    (0.5 * out.pow(2)).sum().backward()  # each row lands once, so the gradient brought back is the row itself
    torch.testing.assert_close(x.grad, x.detach())

    # rows != sum(input splits): raised on this rank before any collective; the other rank calls nothing
    if rank == 1:
        with pytest.raises(SplitMismatchError) as e:
            all_to_all(torch.zeros(4, 3), [2, 3], [2, 2], group)
        msgs["local"] = str(e.value)
    # rank 1 expects 3 rows from rank 0, which sends 2: every rank raises the same error from the
    # split check (one small all_gather); the data collective never starts, so nobody hangs
    with pytest.raises(SplitMismatchError) as e:
        all_to_all(torch.zeros(4, 3), [2, 2], [2, 2] if rank == 0 else [3, 2], group, check_peers=True)
    msgs["peer"] = str(e.value)
    with pytest.raises(ValueError) as e:
        AllToAllDispatcher(5, group)
    msgs["experts"] = str(e.value)
    with pytest.raises(ValueError) as e:
        AllToAllDispatcher(4, group, transport="nvshmem")
    msgs["transport"] = str(e.value)
    dist.barrier()  # every rank got here: nothing is stuck in a collective
    return msgs


def test_comm_exchange_and_split_errors():
    msgs = run_workers(_comm_worker, 2)
    assert "rank 1" in msgs[1]["local"] and "4 rows" in msgs[1]["local"] and "sum to 5" in msgs[1]["local"]
    for m in msgs:
        assert "rank 0 sends 2 rows to rank 1, which expects 3" in m["peer"]
        assert "sends 2 rows to rank 0" not in m["peer"]  # the consistent pairs are not blamed
        assert "n_routed_experts=5" in m["experts"] and "EP group size 2" in m["experts"]
        assert "'blocks', 'reorder'" in m["transport"]


def _bucket_worker(rank, world):
    from dsmoe.parallel.expert_state import ExpertShards
    from dsmoe.parallel.mesh import Mesh
    from test_compile import batch, small_model

    mesh = Mesh(rank=rank, world=world, ep=1, edp_group=dist.group.WORLD)  # edp = 2: every rank all experts
    out = {}
    for cap in (None, 1e-3, 25.0):  # after backward (no hooks); a bucket per tensor; one bucket
        model = small_model()
        shards = ExpertShards.of(model, mesh, 8)
        last = {"now": False}
        if cap is not None:
            shards.reduce_in_backward(lambda: last["now"], bucket_mb=cap)
        gen = torch.Generator().manual_seed(rank)
        in_flight = []
        for micro in range(2):  # gradient accumulation: reduce on the last micro-step only
            last["now"] = micro == 1
            model(*batch(gen)).loss.backward()
            in_flight.append(len(shards._buckets.inflight) if cap is not None else 0)
        shards.reduce_grads()
        out[cap] = ([p.grad.clone() for p in shards.params], in_flight)
    return out


def test_expert_gradients_reduced_in_buckets_during_backward_equal_the_reduction_after():
    for r in run_workers(_bucket_worker, 2):
        ref, _ = r[None]
        for cap, launched in ((1e-3, 3), (25.0, 1)):  # w_gate, w_up, w_down of the one MoE layer
            grads, in_flight = r[cap]
            assert in_flight == [0, launched]  # nothing on the first micro-step, all during the last backward
            for g, h in zip(grads, ref):
                assert torch.equal(g, h)


def _overlap_worker(rank, world):
    from dsmoe.parallel import comm

    mesh = init_mesh(device="cpu", ep=world)
    events = []
    run = comm._Route.run

    def logged(self, x, reverse, async_op):
        events.append(("exchange", "backward" if reverse else "forward", "async" if async_op else "sync"))
        return run(self, x, reverse, async_op)

    comm._Route.run = logged
    torch.manual_seed(0)
    moe = MoE(case_cfg("plain"), AllToAllDispatcher(E, mesh.ep_group))
    for name in ("w_gate", "w_up", "w_down"):
        getattr(moe.shared, name).weight.register_post_accumulate_grad_hook(lambda p, name=name: events.append(name))
    x, gy = rank_tokens("plain", rank)
    y, _ = moe(x.requires_grad_())
    events.append("backward")
    (y * gy).sum().backward()
    return events


def test_reverse_exchanges_overlap_the_shared_experts_backward():
    """Backward launches each reverse exchange, then computes a part of the shared experts, then collects
    it: the combine's with the down projection, the dispatch's with the gate and up projections."""
    for events in run_workers(_overlap_worker, 2):
        back = events[events.index("backward") + 1:]
        assert back[0] == ("exchange", "backward", "async") and back[1] == "w_down"
        i = back.index(("exchange", "backward", "async"), 1)
        assert sorted(back[i + 1:i + 3]) == ["w_gate", "w_up"], back
        assert events[:2] == [("exchange", "forward", "async")] * 2  # dispatch and combine overlap forward work
