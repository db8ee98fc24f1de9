"""The model against naive references: attention, RoPE, router, grouped experts, presets."""
import math

import pytest
import torch
import torch.nn.functional as F

from dsmoe.config import CONFIG_ROOT, load_config
from dsmoe.model import Transformer, param_breakdown
from dsmoe.model.attention import GroupedQueryAttention, MultiHeadLatentAttention, apply_rope, rope_tables
from dsmoe.model.moe import MoE, Router, capacity_keep, update_expert_bias
from dsmoe.params import breakdown


def cfg_with(**sections):
    tree = {"train": {"seq_len": 16}, "model": {"max_seq_len": 32}}
    for k, v in sections.items():
        tree.setdefault(k, {}).update(v)
    return load_config(None, tree)


def naive_attention(q_BHSK, k_BHSK, v_BHSV, scale):
    scores = (q_BHSK @ k_BHSK.transpose(-1, -2)) * scale
    S = scores.shape[-1]
    mask = torch.ones(S, S, dtype=torch.bool).tril()
    return scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v_BHSV


def naive_rope(x_BSHD, theta):
    """Interleaved pairs rotated as complex numbers, computed independently of apply_rope."""
    B, S, H, D = x_BSHD.shape
    xc = torch.view_as_complex(x_BSHD.float().reshape(B, S, H, D // 2, 2).contiguous())
    inv = 1.0 / theta ** (torch.arange(0, D, 2).float() / D)
    rot = torch.polar(torch.ones(S, D // 2), torch.outer(torch.arange(S).float(), inv))
    return torch.view_as_real(xc * rot[None, :, None, :]).reshape(B, S, H, D)


@pytest.mark.parametrize("q_lora", [0, 24])
def test_mla_equals_naive_reference(q_lora):
    cfg = cfg_with(attention={"kind": "mla", "q_lora_rank": q_lora, "kv_lora_rank": 16,
                              "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 6},
                   model={"d_model": 32, "n_heads": 4})
    attn = MultiHeadLatentAttention(cfg)
    for p in attn.parameters():
        torch.nn.init.normal_(p, 0, 0.3)
    x = torch.randn(2, 10, 32)
    B, S, H = 2, 10, 4
    q = attn.wq(x) if q_lora == 0 else attn.wq_b(attn.q_norm(attn.wq_a(x)))
    q = q.view(B, S, H, 12)
    q = torch.cat([q[..., :8], naive_rope(q[..., 8:], 10000.0)], -1)
    ckv = attn.wkv_a(x)
    k_pe = naive_rope(ckv[..., 16:].unsqueeze(2), 10000.0).expand(B, S, H, 4)
    kv = attn.wkv_b(attn.kv_norm(ckv[..., :16])).view(B, S, H, 14)
    k = torch.cat([kv[..., :8], k_pe], -1)
    out = naive_attention(q.transpose(1, 2), k.transpose(1, 2), kv[..., 8:].transpose(1, 2), 1 / math.sqrt(12))
    ref = attn.wo(out.transpose(1, 2).reshape(B, S, H * 6))
    torch.testing.assert_close(attn(x), ref, rtol=1e-5, atol=1e-5)


def test_mla_padded_and_unpadded_v_give_equal_outputs_and_gradients(monkeypatch):
    from dsmoe.model import attention

    cfg = cfg_with(attention={"kind": "mla", "q_lora_rank": 0, "kv_lora_rank": 16, "qk_nope_head_dim": 8,
                              "qk_rope_head_dim": 4, "v_head_dim": 8}, model={"d_model": 32, "n_heads": 2})
    mla = MultiHeadLatentAttention(cfg)
    for p in mla.parameters():
        torch.nn.init.normal_(p, 0, 0.2)
    x = torch.randn(2, 16, 32)
    results = []
    for pad in (True, False):
        monkeypatch.setattr(attention, "v_padding_needed", lambda *args, pad=pad: pad)
        mla.zero_grad()
        xi = x.clone().requires_grad_()
        y = mla(xi)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        results.append((y, xi.grad, [p.grad.clone() for p in mla.parameters()]))
    (y1, gx1, gp1), (y2, gx2, gp2) = results
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx1, gx2, rtol=1e-5, atol=1e-6)
    for a, b in zip(gp1, gp2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_v_is_padded_only_where_sdpa_would_otherwise_take_its_math_kernel():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from dsmoe.model.attention import v_padding_needed

    cpu = torch.device("cpu")
    assert v_padding_needed(cpu, torch.float32, 2, 16, 4, 24, 16, True)  # CPU flash needs equal head sizes
    assert v_padding_needed(cpu, torch.bfloat16, 2, 16, 4, 24, 16, False)
    with sdpa_kernel(SDPBackend.MATH):  # flash disabled: math either way, padding would only cost
        assert not v_padding_needed(cpu, torch.float32, 2, 16, 4, 24, 16, True)


@pytest.mark.parametrize("n_kv", [1, 2, 4])
def test_gqa_equals_naive_reference(n_kv):
    cfg = cfg_with(attention={"kind": "gqa", "n_kv_heads": n_kv}, model={"d_model": 32, "n_heads": 4})
    attn = GroupedQueryAttention(cfg)
    x = torch.randn(2, 10, 32)
    B, S, H, D = 2, 10, 4, 8
    q = naive_rope(attn.wq(x).view(B, S, H, D), 10000.0)
    k = naive_rope(attn.wk(x).view(B, S, n_kv, D), 10000.0).repeat_interleave(H // n_kv, dim=2)
    v = attn.wv(x).view(B, S, n_kv, D).repeat_interleave(H // n_kv, dim=2)
    out = naive_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 1 / math.sqrt(D))
    ref = attn.wo(out.transpose(1, 2).reshape(B, S, H * D))
    torch.testing.assert_close(attn(x), ref, rtol=1e-5, atol=1e-5)


def test_gqa_with_all_kv_heads_is_mha():
    """n_kv_heads = n_heads (explicit) and null (default MHA) are the same module."""
    a = GroupedQueryAttention(cfg_with(attention={"kind": "gqa", "n_kv_heads": 4}, model={"d_model": 32, "n_heads": 4}))
    b = GroupedQueryAttention(cfg_with(attention={"kind": "gqa"}, model={"d_model": 32, "n_heads": 4}))
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 9, 32)
    torch.testing.assert_close(a(x), b(x))


def test_rope_depends_only_on_relative_position():
    cos, sin = rope_tables(8, 64, 10000.0)
    q, k = torch.randn(8), torch.randn(8)

    def at(v, pos):
        x = torch.zeros(1, pos + 1, 1, 8)
        x[0, pos, 0] = v
        return apply_rope(x, cos, sin)[0, pos, 0]

    d1 = at(q, 10) @ at(k, 7)
    d2 = at(q, 33) @ at(k, 30)
    d3 = at(q, 10) @ at(k, 8)
    torch.testing.assert_close(d1, d2, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(d1, d3, rtol=1e-3)


# ----------------------------------------------------------------------------- router

def moe_cfg(**moe):
    base = {"n_routed_experts": 8, "n_shared_experts": 1, "top_k": 2, "expert_hidden": 16}
    base.update(moe)
    return cfg_with(moe=base, model={"d_model": 16, "n_heads": 2})


def test_bias_changes_choice_but_not_gate_weights():
    router = Router(moe_cfg(norm_topk_prob=False))
    torch.nn.init.normal_(router.weight, 0, 1)
    x = torch.randn(64, 16)
    before = router(x, 1)
    router.expert_bias[3] = 100.0  # expert 3 now always chosen
    after = router(x, 1)
    assert (after.topk_idx == 3).any(-1).all()
    assert not torch.equal(before.topk_idx, after.topk_idx)
    scores = torch.sigmoid(x @ router.weight.T)
    torch.testing.assert_close(after.topk_weight, scores.gather(1, after.topk_idx))


def test_normalisation_and_scaling():
    router = Router(moe_cfg(norm_topk_prob=True, routed_scaling_factor=2.5))
    torch.nn.init.normal_(router.weight, 0, 1)
    r = router(torch.randn(32, 16), 1)
    torch.testing.assert_close(r.topk_weight.sum(-1), torch.full((32,), 2.5))


def test_softmax_scores_without_norm():
    router = Router(moe_cfg(score_func="softmax", norm_topk_prob=False, top_k=3))
    torch.nn.init.normal_(router.weight, 0, 1)
    x = torch.randn(20, 16)
    r = router(x, 1)
    probs = (x @ router.weight.T).softmax(-1)
    torch.testing.assert_close(r.topk_weight, probs.topk(3, -1).values)


def test_group_limited_routing_stays_in_best_groups():
    router = Router(moe_cfg(n_groups=4, topk_groups=2, top_k=4))
    torch.nn.init.normal_(router.weight, 0, 1)
    x = torch.randn(200, 16)
    r = router(x, 1)
    scores = torch.sigmoid(x @ router.weight.T).view(200, 4, 2)
    best = scores.topk(2, -1).values.sum(-1).topk(2, -1).indices  # two best groups per token
    groups_used = r.topk_idx // 2
    assert all(set(groups_used[t].tolist()) <= set(best[t].tolist()) for t in range(200))


def test_capacity_keeps_earliest_tokens_and_counts_the_rest():
    idx = torch.tensor([[0, 1], [0, 2], [0, 1], [3, 0]])
    keep = capacity_keep(idx, 4, capacity=2)
    expected = torch.tensor([[True, True], [True, True], [False, True], [True, False]])
    assert torch.equal(keep, expected)
    router = Router(moe_cfg(capacity_factor=0.5))
    router.weight.data.zero_()
    router.weight.data[0] = 1.0  # every token prefers expert 0
    r = router(torch.ones(16, 16), 1)
    capacity = math.ceil(0.5 * 16 * 2 / 8)
    assert (r.topk_idx == 0).sum() == capacity
    assert r.dropped.item() == 16 * 2 - (r.topk_idx >= 0).sum().item()
    assert (r.topk_weight[r.topk_idx < 0] == 0).all()


def test_sequence_balance_loss_hand_computed():
    router = Router(moe_cfg(n_routed_experts=2, top_k=1, seq_aux_loss_coef=1.0))
    scores = torch.tensor([[0.6, 0.2], [0.5, 0.5], [0.1, 0.3], [0.8, 0.2]])
    idx = torch.tensor([[0], [0], [1], [0]])
    # one sequence of 4: f = E/(K*S) * hits = 2/4 * [3, 1]; P = mean of row-normalised scores
    probs = scores / scores.sum(-1, keepdim=True)
    expected = (torch.tensor([1.5, 0.5]) * probs.mean(0)).sum()
    torch.testing.assert_close(router.sequence_balance_loss(scores, idx, 1), expected)


def test_bias_update_moves_load_toward_mean():
    router = Router(moe_cfg(n_routed_experts=4))
    counts = torch.tensor([10.0, 2.0, 4.0, 4.0])
    update_expert_bias(router, counts, 0.1)
    torch.testing.assert_close(router.expert_bias, torch.tensor([-0.1, 0.1, 0.1, 0.1]))
    torch.nn.init.normal_(router.weight, 0, 0.1)
    x = torch.randn(512, 16)
    router.weight.data[0] += 0.5  # expert 0 overloaded
    spread = []
    for _ in range(50):
        c = router(x @ torch.eye(16), 1).counts
        spread.append((c.max() - c.min()).item())
        update_expert_bias(router, c, 0.02)
    assert spread[-1] < spread[0]


# ----------------------------------------------------------------------------- experts

@pytest.mark.parametrize("capacity", [None, 0.6])
def test_grouped_experts_equal_loop_in_output_and_every_gradient(capacity):
    cfg = moe_cfg(capacity_factor=capacity, expert_hidden=16)
    grouped = MoE(cfg)
    for p in grouped.parameters():
        torch.nn.init.normal_(p, 0, 0.2)
    loop_cfg = moe_cfg(capacity_factor=capacity, expert_hidden=16, expert_impl="loop")
    loop = MoE(loop_cfg)
    loop.load_state_dict(grouped.state_dict())
    x = torch.randn(2, 12, 16)
    # steer routing so experts 6 and 7 receive nothing
    grouped.router.expert_bias[6:] = -100.0
    loop.router.expert_bias[6:] = -100.0
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    outs = []
    for mod, xi in zip((grouped, loop), xs):
        y, routing = mod(xi)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outs.append((y, routing))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=1e-5, atol=1e-6)
    for (n, p), (_, q) in zip(grouped.named_parameters(), loop.named_parameters()):
        assert p.grad is not None, n
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=n)
    assert grouped.experts.w_gate.grad[6:].abs().sum() == 0  # no tokens: zero gradient, still present
    assert grouped.router.weight.grad.abs().sum() > 0


def _experts_and_rows(dtype=torch.float32):
    from dsmoe.model.moe import GroupedExperts

    ex = GroupedExperts(4, 16, 16).to(dtype)
    for w in ex.parameters():
        torch.nn.init.normal_(w, 0, 0.2)
    return ex, torch.randn(12, 16, dtype=dtype), torch.tensor([3, 0, 5, 2])  # 2 padding rows


def test_grouped_gemm_out_of_memory_propagates(monkeypatch):
    from dsmoe.model import moe as moe_mod

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(moe_mod, "grouped_mm", out_of_memory)
    monkeypatch.setattr(moe_mod, "_warned", set())
    ex, x, counts = _experts_and_rows()
    with pytest.raises(torch.OutOfMemoryError):
        ex(x, counts)
    assert not moe_mod._warned and not moe_mod._no_kernel  # no silent switch to the loop


def test_grouped_gemm_other_runtime_errors_propagate(monkeypatch):
    from dsmoe.model import moe as moe_mod

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(moe_mod, "grouped_mm", broken)
    monkeypatch.setattr(moe_mod, "_warned", set())
    monkeypatch.setattr(moe_mod, "_no_kernel", {})
    ex, x, counts = _experts_and_rows()
    with pytest.raises(RuntimeError, match="illegal memory access"):
        ex(x, counts)
    assert not moe_mod._warned and not moe_mod._no_kernel


# the errors aten raises where grouped_mm cannot run, and the words the warning then carries
KERNEL_ERRORS = {
    "no_kernel": (NotImplementedError("Could not run 'aten::_grouped_mm' with arguments from the 'XLA' backend"),
                  "not implemented"),
    "cuda_unsupported": (RuntimeError("grouped mm is not supported on your system"), "not supported"),
    "cuda_misaligned": (RuntimeError("expected data_ptr to be aligned to 16 bytes"), "aligned"),
}


@pytest.mark.parametrize("why", ["dtype", "misaligned_view", *KERNEL_ERRORS])
def test_a_fallback_to_the_loop_warns_once_with_its_reason_and_equals_the_loop(why, monkeypatch):
    from dsmoe.model import moe as moe_mod

    monkeypatch.setattr(moe_mod, "_warned", set())
    monkeypatch.setattr(moe_mod, "_no_kernel", {})
    if why in KERNEL_ERRORS:
        def no_grouped_mm(*args, **kwargs):
            raise KERNEL_ERRORS[why][0]
        monkeypatch.setattr(moe_mod, "grouped_mm", no_grouped_mm)
    ex, x, counts = _experts_and_rows(torch.float64 if why == "dtype" else torch.float32)  # fp64: no grouped_mm
    if why == "misaligned_view":  # rows starting 4 bytes into their buffer, as a slice of a larger one can
        x = torch.cat([x.new_zeros(1), x.flatten()])[1:].view_as(x)
        assert x.data_ptr() % 16 and ex.fallback_reason(x) is not None
    with pytest.warns(RuntimeWarning) as record:
        outs = [ex(x, counts) for _ in range(3)]
    loop = ex._loop(x, counts, ex.w_gate, ex.w_up, ex.w_down)
    msgs = [str(w.message) for w in record if "per-expert loop" in str(w.message)]
    assert len(msgs) == 1, msgs
    words = {"dtype": "torch.float64", "misaligned_view": "aligned"}.get(why) or KERNEL_ERRORS[why][1]
    assert words in msgs[0], msgs
    for out in outs:
        torch.testing.assert_close(out[:10], loop[:10], rtol=0, atol=0)


def test_moe_equals_dense_per_token_reference():
    """The sorted dispatch + combine equals computing each token's experts directly."""
    cfg = moe_cfg(top_k=3)
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, 0, 0.2)
    x = torch.randn(1, 10, 16)
    y, r = moe(x)
    ex = moe.experts
    ref = moe.shared(x[0])
    for t in range(10):
        for k in range(3):
            e = r.topk_idx[t, k]
            h = F.silu(x[0, t] @ ex.w_gate[e]) * (x[0, t] @ ex.w_up[e])
            ref[t] = ref[t] + r.topk_weight[t, k] * (h @ ex.w_down[e])
    torch.testing.assert_close(y[0], ref, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- presets

PRESETS = sorted(p.stem for p in (CONFIG_ROOT / "models").glob("*.yaml"))


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_builds_on_meta(name):
    cfg = load_config(CONFIG_ROOT / "models" / f"{name}.yaml")
    b = breakdown(cfg)
    assert b["total"] == sum(b[c] for c in ("embedding", "lm_head", "attention", "dense_ffn", "moe_routed",
                                            "moe_shared", "router", "norms"))
    assert 0 < b["active"] <= b["total"]


def test_preset_sizes_match_their_sources():
    """The parameter counts the source projects state (see the README's preset table)."""
    def total(name):
        return breakdown(load_config(CONFIG_ROOT / "models" / f"{name}.yaml"))["total"]
    assert abs(total("smollm2-135m-moe") / 373.03e6 - 1) < 0.01
    assert abs(total("v3-tiny") / 0.14e9 - 1) < 0.03
    assert abs(total("v3-mini") / 5.69e9 - 1) < 0.01


def test_tiny_forward_backward():
    cfg = load_config(CONFIG_ROOT / "models" / "tiny.yaml", ["--train.seq_len=32"])
    model = Transformer(cfg, vocab_size=320)
    x = torch.randint(0, 320, (2, 32))
    assert model(x).logits.shape == (2, 32, 320)
    out = model(x, torch.roll(x, -1, 1))
    assert math.isfinite(out.loss.item()) and abs(out.ce_loss.item() - math.log(320)) < 0.5
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing
    assert out.expert_counts.shape == (3, 8)
    assert torch.all(out.expert_counts.sum(-1) == 2 * 32 * 2)
    assert param_breakdown(model)["total"] == sum(p.numel() for p in model.parameters())
