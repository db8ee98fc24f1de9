"""The speed work keeps the numbers: fused RMSNorm, bf16 expert GEMMs under fp32 training, and the
step profile that attributes every op to a category."""
import sys
from pathlib import Path

import pytest
import torch

from dsmoe.config import load_config
from dsmoe.model import Transformer
from dsmoe.model.attention import RMSNorm
from dsmoe.train.optim import build_optimizer

REPO_ROOT = Path(__file__).resolve().parents[1]


def tiny_cfg(**moe):
    tree = {"train": {"seq_len": 16}, "model": {"max_seq_len": 32, "d_model": 32, "n_heads": 2, "n_layers": 2,
                                                "vocab_size": 64},
            "moe": {"n_routed_experts": 4, "n_shared_experts": 1, "top_k": 2, "expert_hidden": 16,
                    "first_k_dense": 0, **moe}}
    return load_config(None, tree)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_equals_the_fp32_formula_with_its_gradients(dtype):
    torch.manual_seed(0)
    norm = RMSNorm(24, eps=1e-6)
    torch.nn.init.normal_(norm.weight, 1.0, 0.2)
    x = torch.randn(3, 5, 24).mul(1e-3).to(dtype).requires_grad_()  # small: bf16 variance would underflow
    x32 = x.detach().float().requires_grad_()
    ref = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight.detach().float()
    y = norm(x)
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), ref.to(dtype).float(), rtol=1e-6, atol=1e-6)
    g = torch.randn_like(ref)
    y.backward(g.to(dtype))
    ref.backward(g.to(dtype).float())
    torch.testing.assert_close(x.grad.float(), x32.grad.to(dtype).float(), rtol=1e-5, atol=1e-5)


def _train(cfg, steps=3):
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights(seed=0)
    opt = build_optimizer(model, cfg.train)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        batch = torch.randint(0, 64, (2, 17), generator=gen)
        loss = model(batch[:, :-1], batch[:, 1:]).loss
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if "experts.w_" in n}
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return model, losses, grads


def test_bf16_expert_gemms_train_fp32_master_weights_within_tolerance_of_fp32():
    seen = []
    import dsmoe.model.moe as moe_mod
    real = moe_mod.GroupedExperts._grouped

    def spy(x, *rest):
        seen.append(x.dtype)
        return real(x, *rest)

    moe_mod.GroupedExperts._grouped = staticmethod(spy)
    try:
        model, bf16_losses, grads = _train(tiny_cfg(expert_dtype="bf16"))
    finally:
        moe_mod.GroupedExperts._grouped = staticmethod(real)
    assert seen and set(seen) == {torch.bfloat16}  # the expert GEMMs ran in bf16
    for name, g in grads.items():  # gradients reach the fp32 master weights
        assert g.dtype == torch.float32 and g.abs().sum() > 0, name
    assert all(p.dtype == torch.float32 for p in model.parameters())
    _, fp32_losses, _ = _train(tiny_cfg())
    assert bf16_losses != fp32_losses  # bf16 rounding happened
    for a, b in zip(bf16_losses, fp32_losses):  # bf16 has 8 mantissa bits: 2^-8 relative per GEMM
        assert abs(a - b) / b < 5e-3, (bf16_losses, fp32_losses)


def test_expert_dtype_rejects_an_unknown_dtype():
    with pytest.raises(Exception, match="expert_dtype"):
        tiny_cfg(expert_dtype="int8")


def test_profile_attributes_every_region_and_keeps_all_self_time():
    sys.path.insert(0, str(REPO_ROOT))
    from benchmarks.profile_step import categorize, regions

    cfg = tiny_cfg()
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights(seed=0)
    opt = build_optimizer(model, cfg.train)
    batch = torch.randint(0, 64, (2, 17))
    with regions():
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(batch[:, :-1], batch[:, 1:]).loss
            loss.backward()
            with torch.autograd.profiler.record_function("region::optimizer"):
                opt.step()
    events = prof.events()
    totals = categorize(events)
    for cat in ("GEMM", "casts", "routing", "permutation", "norms", "rope", "loss", "optimizer"):
        assert totals[cat] > 0, (cat, dict(totals))
    by_cat = sum(v for k, v in totals.items() if not k.startswith("cast@"))
    assert by_cat == pytest.approx(sum(e.self_cpu_time_total for e in events))
    assert sum(v for k, v in totals.items() if k.startswith("cast@")) == pytest.approx(totals["casts"])
    assert RMSNorm.forward.__name__ == "forward" and not hasattr(RMSNorm.forward, "__wrapped__")  # restored


def test_dropless_combine_equals_the_scatter_add_path_with_gradients():
    """LocalDispatcher's fused combine (embedding_bag) against its scatter-add path (the one capacity
    drops take), on the same routing with nothing dropped: values and gradients within fp32 rounding."""
    from dsmoe.model.dispatch import LocalDispatcher

    torch.manual_seed(0)
    T, K, E, d = 37, 3, 5, 8
    x = torch.randn(T, d)
    idx = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    w0 = torch.rand(T, K)
    outs = []
    for drops in (False, True):
        disp = LocalDispatcher(E, drops=drops)
        w = w0.clone().requires_grad_()
        expert_x, counts, handle = disp.dispatch(x, idx)
        expert_y = (expert_x * 2 + 1).requires_grad_()
        y = disp.combine(expert_y, w, handle)
        y.backward(torch.arange(T * d, dtype=torch.float32).view(T, d).sin())
        outs.append((y.detach(), w.grad, expert_y.grad, counts))
    fused, reference = outs
    for a, b in zip(fused, reference):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
