"""Activation-checkpointing policies compute exactly what `none` does, keep less, and (selective) never
repeat the expert-parallel all-to-alls.

Single process: bit-identical loss and gradients for every policy, and the saved-bytes ordering. World 2
(one launch runs every job): DDP, FSDP2 and ep=2 train with the same losses under selective and moe_only
as under none; under ep=2, selective runs exactly none's all-to-alls while full and moe_only rerun them.
"""
import contextlib
import dataclasses

import pytest
import torch
import torch.distributed as dist

from conftest import small_config
from distributed import run_workers
from dsmoe.metrics.memory import measure_saved_activation_bytes, saved_tensor_bytes
from dsmoe.model.transformer import Transformer
from dsmoe.parallel.wrap import block_fn_for, selective_checkpoint
from dsmoe.train.trainer import Trainer

POLICIES = ["none", "full", "every_n", "moe_only", "attention_only", "selective"]
VOCAB = 320
STEPS = ["--train.steps=2"]  # x grad_accum 2 = 4 micro-batches


def with_policy(cfg, policy):
    return dataclasses.replace(cfg.parallel, activation_checkpointing=policy)


@pytest.fixture(scope="module")
def model_and_batch(tmp_path_factory):
    """small_config's model (a dense block, then two MoE blocks), capacity-limited so the drop path runs too."""
    d = tmp_path_factory.mktemp("ac")
    cfg = small_config(d, d, "--moe.capacity_factor=1.0")
    torch.manual_seed(0)
    model = Transformer(cfg, VOCAB)
    gen = torch.Generator().manual_seed(1)
    B, S = cfg.train.micro_batch, cfg.train.seq_len
    batch = (torch.randint(0, VOCAB, (B, S), generator=gen), torch.randint(0, VOCAB, (B, S), generator=gen))
    return cfg, model, batch


def loss_and_grads(model, batch, block_fn, precision):
    model.zero_grad(set_to_none=True)
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    with amp:
        out = model(*batch, block_fn=block_fn)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("policy", POLICIES[1:])
def test_policy_gives_the_loss_and_gradients_of_none(model_and_batch, policy, precision):
    """Recomputation reruns the same CPU kernels on the same inputs: bit-identical, not merely close."""
    cfg, model, batch = model_and_batch
    ref_loss, ref_grads = loss_and_grads(model, batch, None, precision)
    loss, grads = loss_and_grads(model, batch, block_fn_for(with_policy(cfg, policy)), precision)
    assert torch.equal(loss, ref_loss)
    for name, g in grads.items():
        assert torch.equal(g, ref_grads[name]), name


def test_each_policy_keeps_less_than_none(model_and_batch):
    cfg, model, batch = model_and_batch
    kept = {p: measure_saved_activation_bytes(model, batch, block_fn_for(with_policy(cfg, p))) for p in POLICIES}
    assert kept["full"] < kept["every_n"] < kept["none"]
    assert kept["full"] < kept["selective"] < kept["none"]
    assert kept["moe_only"] < kept["none"] and kept["attention_only"] < kept["none"]


def test_saved_bytes_count_the_selective_cache():
    """Selective checkpointing keeps its matmul outputs outside autograd's saved tensors: counted too."""
    layer = torch.nn.Linear(64, 32, bias=False)
    x = torch.randn(16, 64, requires_grad=True)
    kept = saved_tensor_bytes(lambda: selective_checkpoint(lambda a: torch.relu(layer(a)), x).sum(), layer)
    assert kept == x.nbytes + 16 * 32 * 4  # the checkpoint's input and the cached matmul output, not the relu's


# ----------------------------------------------------------------------------- world 2


def run_job(rank, world, cache, run_dir, overrides):
    """Train; count every all-to-all this rank enters: all_to_all_single (the count exchange, which precedes
    each dispatch's host sync, so equal counts also mean no repeated sync) and the token exchanges, sent
    as batches of point-to-point messages (batch_isend_irecv) on CPU."""
    calls = [0]
    originals = {name: getattr(dist, name) for name in ("all_to_all_single", "batch_isend_irecv")}

    def counting(fn):
        def call(*args, **kwargs):
            calls[0] += 1
            return fn(*args, **kwargs)
        return call

    for name, fn in originals.items():
        setattr(dist, name, counting(fn))
    try:
        history = Trainer(small_config(run_dir, cache, *overrides)).fit()["history"]
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
    return {"losses": [r["loss"] for r in history if "loss" in r], "a2a_calls": calls[0],
            "a2a_mb": [r["a2a_mb_per_step"] for r in history if "a2a_mb_per_step" in r]}


def jobs_worker(rank, world, cache, jobs):
    return {name: run_job(rank, world, cache, run_dir, overrides) for name, (run_dir, overrides) in jobs.items()}


@pytest.fixture(scope="module")
def world2(tmp_path_factory, data_cache):
    root = tmp_path_factory.mktemp("ac-w2")
    layouts = {"ddp": [], "fsdp": ["--parallel.dp=fsdp"], "ep2": ["--parallel.ep=2"]}
    policies = {"ddp": ["none", "selective", "moe_only"], "fsdp": ["none", "selective"],
                "ep2": ["none", "selective", "moe_only", "full"]}
    jobs = {f"{layout}-{p}": (root / f"{layout}-{p}", STEPS + layouts[layout] + [f"--parallel.activation_checkpointing={p}"])
            for layout in layouts for p in policies[layout]}
    return run_workers(jobs_worker, 2, (data_cache, jobs), timeout=300)


@pytest.mark.parametrize("name", ["ddp-selective", "ddp-moe_only", "fsdp-selective", "ep2-selective", "ep2-moe_only",
                                  "ep2-full"])
def test_distributed_training_under_a_policy_equals_none(world2, name):
    ref = name.split("-")[0] + "-none"
    for rank, got in enumerate(world2):
        assert len(got[name]["losses"]) == 2
        assert got[name]["losses"] == got[ref]["losses"], f"rank {rank}"


def test_selective_never_repeats_the_all_to_alls(world2):
    n_moe, micro_batches = 2, 4
    for got in world2:
        # per MoE layer and micro-batch: counts, tokens there and back; backward: both token exchanges again
        assert got["ep2-none"]["a2a_calls"] == 5 * n_moe * micro_batches
        assert got["ep2-selective"]["a2a_calls"] == got["ep2-none"]["a2a_calls"]
        assert got["ep2-selective"]["a2a_mb"] == got["ep2-none"]["a2a_mb"]
        # full and moe_only recompute every MoE layer in backward: its three forward exchanges again
        for policy in ("full", "moe_only"):
            assert got[f"ep2-{policy}"]["a2a_calls"] == 8 * n_moe * micro_batches
            assert all(a > b for a, b in zip(got[f"ep2-{policy}"]["a2a_mb"], got["ep2-none"]["a2a_mb"]))
        assert got["ddp-none"]["a2a_calls"] == 0
