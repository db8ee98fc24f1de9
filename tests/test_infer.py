"""Cached inference against full recomputation; sampling options; bad input."""
import re

import pytest
import torch

from dsmoe.config import CONFIG_ROOT, load_config
from dsmoe.data.tokenizer import ByteTokenizer
from dsmoe.infer import Batch, SamplingParams, generate, generate_ids
from dsmoe.infer.cache import KVCache, cache_bytes_per_token
from dsmoe.infer.forward import dropless, forward_cached
from dsmoe.infer.sampling import filter_logits, penalize, sample
from dsmoe.infer.text import TextStream
from dsmoe.model import Transformer

VOCAB = 320  # the byte tokenizer's 257 ids padded to a multiple of 64
SHAPES = {
    "mla": [],
    # GQA with a capacity limit and softmax scores: inference must not drop tokens
    "gqa": ["--attention.kind=gqa", "--attention.n_kv_heads=2", "--moe.capacity_factor=1.0",
            "--moe.score_func=softmax", "--moe.n_shared_experts=0"],
}


def build(kind: str, *extra: str) -> Transformer:
    """The tiny preset (or its GQA variant), with a larger init so outputs vary, and a nonzero routing bias."""
    cfg = load_config(CONFIG_ROOT / "models" / "tiny.yaml", ["--model.init_std=0.1", *SHAPES[kind], *extra])
    torch.manual_seed(3)
    model = Transformer(cfg, VOCAB).eval()
    for moe in model.moe_modules():
        moe.router.expert_bias.copy_(torch.randn_like(moe.router.expert_bias) * 0.1)
    return model


def prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def full_logits(model, ids):
    """The uncached reference: one full forward, routing without the capacity limit as inference does."""
    with dropless(model):
        return model(torch.tensor([ids])).logits[0]


def recompute_greedy(model, ids, n):
    ids = list(ids)
    for _ in range(n):
        ids.append(int(full_logits(model, ids)[-1, :257].argmax()))
    return ids


@pytest.mark.parametrize("kind", SHAPES)
def test_cached_greedy_equals_recomputation_ragged_batch(kind):
    model = build(kind)
    ps = prompts([5, 23, 11, 1])
    seqs = generate(model, ps, SamplingParams(max_new_tokens=14, temperature=0, ignore_eos=True),
                    tokenizer=ByteTokenizer())
    for p, s in zip(ps, seqs):
        assert p + s.out == recompute_greedy(model, p, 14)
        assert s.finish_reason == "length"
    assert len({tuple(s.out) for s in seqs}) > 1  # the check is not vacuous: outputs differ


def test_gqa_cached_attention_hands_sdpa_contiguous_kv(monkeypatch):
    """Strided k/v beside a mask is what CUDA's memory-efficient kernel got wrong (pytorch#112577)."""
    model = build("gqa")
    ps = prompts([7, 12], seed=2)
    sdpa, seen = torch.nn.functional.scaled_dot_product_attention, []

    def spy(q, k, v, **kw):
        seen.append((k.is_contiguous(), v.is_contiguous(), kw.get("attn_mask") is not None))
        return sdpa(q, k, v, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    cache = KVCache.allocate(model.cfg, len(ps), 24, torch.float32, torch.device("cpu"))
    padded = torch.tensor([p + [0] * (12 - len(p)) for p in ps])
    logits = forward_cached(model, padded, cache, [len(p) for p in ps])
    step = forward_cached(model, torch.tensor([[5], [9]]), cache)
    monkeypatch.undo()
    assert seen and all(seen_k and seen_v and masked for seen_k, seen_v, masked in seen), seen
    for b, p in enumerate(ps):  # and the outputs are the uncached model's
        torch.testing.assert_close(logits[b, :len(p)], full_logits(model, p), atol=1e-5, rtol=0)
        torch.testing.assert_close(step[b, -1], full_logits(model, p + [[5], [9]][b])[-1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", SHAPES)
def test_logits_at_every_position_match_full_forward(kind):
    model = build(kind)
    ps = prompts([7, 19, 12], seed=1)
    cache = KVCache.allocate(model.cfg, len(ps), 40, torch.float32, torch.device("cpu"))
    n = [len(p) for p in ps]
    padded = torch.tensor([p + [0] * (max(n) - len(p)) for p in ps])
    logits = forward_cached(model, padded, cache, n)  # ragged prefill, right-padded
    seqs = [list(p) for p in ps]
    for b, p in enumerate(ps):
        torch.testing.assert_close(logits[b, :len(p)], full_logits(model, p), atol=1e-5, rtol=0)
    g = torch.Generator().manual_seed(0)
    for chunk in (1, 1, 3, 1, 2):  # decode steps, and multi-token continuations at per-row positions
        new = torch.randint(0, 256, (len(ps), chunk), generator=g)
        logits = forward_cached(model, new, cache)
        for b in range(len(ps)):
            seqs[b] += new[b].tolist()
            torch.testing.assert_close(logits[b], full_logits(model, seqs[b])[-chunk:], atol=1e-5, rtol=0)
    assert cache.lengths.tolist() == [len(s) for s in seqs]


def test_rows_join_and_leave_between_steps():
    """A sequence added mid-decode, and the row compaction when one finishes, leave every output as alone."""
    model = build("mla")
    ps = prompts([9, 4, 15], seed=2)
    budgets = [3, 10, 6]
    alone = [recompute_greedy(model, p, k)[len(p):] for p, k in zip(ps, budgets)]
    batch = Batch(model, max_batch=3, capacity=40, vocab_limit=257)
    seqs = [batch.new_sequence(p, SamplingParams(max_new_tokens=k, temperature=0, ignore_eos=True))
            for p, k in zip(ps, budgets)]
    batch.add(seqs[:2])
    batch.step()
    batch.add(seqs[2:])
    while batch.rows:
        batch.step()
    assert [s.out for s in seqs] == alone


def test_trainer_generate_signature_uses_cache():
    model = build("mla")
    idx = torch.tensor([prompts([6], seed=4)[0]])
    out = generate_ids(model, idx, 10, temperature=0.0, top_k=0, vocab_limit=257)
    assert out[0].tolist() == recompute_greedy(model, idx[0].tolist(), 10)
    a = generate_ids(model, idx, 10, 0.8, 50, generator=torch.Generator().manual_seed(1), vocab_limit=257)
    b = generate_ids(model, idx, 10, 0.8, 50, generator=torch.Generator().manual_seed(1), vocab_limit=257)
    assert torch.equal(a, b) and a.shape == (1, 16) and int(a.max()) < 257


def test_seed_reproducible_and_batch_independent():
    model = build("mla")
    ps = prompts([8, 3, 14], seed=5)
    params = SamplingParams(max_new_tokens=12, temperature=1.0, seed=7, ignore_eos=True)
    together = [s.out for s in generate(model, ps, params)]
    alone = [generate(model, [p], params)[0].out for p in ps]
    assert together == alone
    assert generate(model, ps[:1], params)[0].out == together[0]
    other = generate(model, ps[:1], SamplingParams(max_new_tokens=12, temperature=1.0, seed=8, ignore_eos=True))
    assert other[0].out != together[0]


def test_top_k_and_top_p_restrict_support():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]]))
    kept = filter_logits(logits, torch.tensor([0, 0]), torch.tensor([0.79, 0.81])).isfinite()
    assert kept.tolist() == [[True, True, False, False], [False, True, True, True]]
    kept = filter_logits(logits, torch.tensor([1, 3]), torch.tensor([1.0, 1.0])).isfinite()
    assert kept.tolist() == [[True, False, False, False], [False, True, True, True]]
    assert filter_logits(logits, torch.tensor([0, 0]), torch.tensor([1e-6, 1e-6])).isfinite().sum(-1).tolist() == [1, 1]
    vocab = torch.randn(1, 50)
    top5 = set(vocab[0].topk(5).indices.tolist())
    nucleus_params = SamplingParams(top_p=0.5)
    nucleus = set(filter_logits(vocab, torch.tensor([0]), torch.tensor([0.5]))[0].isfinite().nonzero().flatten().tolist())
    drawn_k, drawn_p = set(), set()
    for seed in range(300):
        drawn_k.update(sample(vocab, [SamplingParams(top_k=5)], [torch.Generator().manual_seed(seed)]))
        drawn_p.update(sample(vocab, [nucleus_params], [torch.Generator().manual_seed(seed)]))
    assert drawn_k == top5 and drawn_p == nucleus


def test_repetition_penalty():
    out = penalize(torch.tensor([[2.0, -2.0, 1.0]]), torch.tensor([[True, True, False]]), torch.tensor([2.0]))
    assert out.tolist() == [[1.0, -4.0, 1.0]]
    model = build("mla")
    p = prompts([6], seed=6)[0]
    params = SamplingParams(max_new_tokens=10, temperature=0, repetition_penalty=1.8, ignore_eos=True)
    got = generate(model, [p], params, ByteTokenizer())[0].out
    ids = list(p)
    for _ in range(10):  # reference: full forward, penalty over prompt + output so far
        logits = full_logits(model, ids)[-1:, :257]
        seen = torch.zeros(1, 257, dtype=torch.bool)
        seen[0, ids] = True
        ids.append(int(penalize(logits, seen, torch.tensor([1.8])).argmax()))
    assert got == ids[len(p):]
    assert got != recompute_greedy(model, p, 10)[len(p):]


def test_stop_strings_and_streaming():
    model, tok = build("mla"), ByteTokenizer()
    base = SamplingParams(max_new_tokens=30, temperature=0, ignore_eos=True)
    full = generate(model, ["ab"], base, tok)[0].text
    stop = next(full[i:i + 2] for i in range(4, len(full)) if "\ufffd" not in full[i:i + 2])
    pieces = []
    seq = generate(model, ["ab"], SamplingParams(max_new_tokens=30, temperature=0, ignore_eos=True,
                                                stop=("zzzz", stop)), tok, on_text=lambda i, t: pieces.append(t))[0]
    assert seq.finish_reason == "stop" and seq.text == full[:full.find(stop)]
    assert "".join(pieces) == seq.text
    # a piece that might begin a stop string is held back until it cannot
    stream = TextStream(tok, stop=("XY",))
    assert stream.update(tok.encode("abX"), final=False) == ("ab", False)
    assert stream.update(tok.encode("abXZ"), final=False) == ("XZ", False)
    assert stream.update(tok.encode("abXZ\u00e9"[:-1]) + list("\u00e9".encode())[:1], final=False) == ("", False)
    assert stream.update(tok.encode("abXZXY!"), final=False) == ("", True)


def test_end_of_text_stops():
    model, tok = build("mla"), ByteTokenizer()
    p = prompts([5], seed=9)[0]
    first = recompute_greedy(model, p, 1)[-1]
    seq = generate(model, [p], SamplingParams(max_new_tokens=5, temperature=0), tok, )[0]
    assert seq.out[:1] == [first]
    batch = Batch(model, 1, tokenizer=tok, eos_id=first)  # the first greedy token is end-of-text here
    s = batch.new_sequence(p, SamplingParams(max_new_tokens=5, temperature=0))
    batch.add([s])
    assert s.finish_reason == "stop" and s.out == [] and not batch.rows


def test_cache_bytes_match_the_formula():
    for kind in SHAPES:
        model = build(kind)
        cfg, a = model.cfg, model.cfg.attention
        cache = KVCache.allocate(cfg, 3, 50, torch.float32, torch.device("cpu"))
        per_token_layer = cache.nbytes() / (3 * 50 * cfg.model.n_layers)
        assert per_token_layer == cache_bytes_per_token(cfg, 4)
        if kind == "mla":
            assert per_token_layer == (a.kv_lora_rank + a.qk_rope_head_dim) * 4
        else:
            assert per_token_layer == 2 * a.n_kv_heads * (cfg.model.d_model // cfg.model.n_heads) * 4


def test_capacity_restored_after_inference():
    model = build("gqa")
    router = model.moe_modules()[0].router
    before = router.cfg
    generate(model, [[1, 2, 3]], SamplingParams(max_new_tokens=2, temperature=0))
    assert router.cfg is before and before.capacity_factor == 1.0


def test_bad_input_errors():
    model, tok = build("mla"), ByteTokenizer()
    ctx = model.cfg.model.max_seq_len
    with pytest.raises(ValueError, match="context of 256"):
        generate(model, [[1] * (ctx + 1)], SamplingParams(max_new_tokens=1))
    with pytest.raises(ValueError, match="at most 6 new tokens"):
        generate(model, [[1] * (ctx - 6)], SamplingParams(max_new_tokens=7))
    for field, value in [("max_new_tokens", 0), ("temperature", -0.5), ("top_p", 0.0), ("top_k", -1),
                         ("repetition_penalty", 0.0), ("max_new_tokens", 2.5), ("seed", "x")]:
        with pytest.raises(ValueError, match=field):
            SamplingParams(**{field: value})
    with pytest.raises(ValueError, match="need a tokenizer"):
        generate(model, ["hello"])
    with pytest.raises(ValueError, match="need a tokenizer"):
        generate(model, [[1, 2]], SamplingParams(stop=("x",)))
    with pytest.raises(ValueError, match="prompt ids"):
        generate(model, [[VOCAB]], tokenizer=tok)
    with pytest.raises(ValueError, match="empty"):
        generate(model, [[]])
    with pytest.raises(ValueError, match="max_seq_len"):
        KVCache.allocate(model.cfg, 1, ctx + 1, torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match="max_seq_len"):
        generate_ids(model, torch.tensor([[1] * 10]), ctx)


def test_chunked_prefill_equals_whole_prompts():
    """Prompts prefilled 4 tokens per step, a short one packed with others, a decoding row leaving while a
    long prompt is still prefilling: every output and prompt log-probability as with whole prompts."""
    model = build("mla")
    ps = prompts([3, 30, 17, 2, 9], seed=11)
    budgets = [2, 6, 5, 9, 4]
    batch = Batch(model, max_batch=4, capacity=48, vocab_limit=257, prefill_chunk=4)
    seqs = [batch.new_sequence(p, SamplingParams(max_new_tokens=k, temperature=0, ignore_eos=True, logprobs=2,
                                                 prompt_logprobs=True)) for p, k in zip(ps, budgets)]
    batch.add(seqs[:4])
    assert not any(s.out for s in seqs) and len(batch.prefilling) == 4  # add only queues them
    steps = 0
    while batch.busy or steps == 0:
        if batch.free and seqs[4] not in batch.prefilling + batch.rows and not seqs[4].finished:
            batch.add(seqs[4:])  # joins when the first row leaves, while the long prompt still prefills
            assert seqs[1] in batch.prefilling
        batch.step()
        steps += 1
    assert steps > 30 // 4  # the long prompt took several steps
    for p, k, s in zip(ps, budgets, seqs):
        assert s.out == recompute_greedy(model, p, k)[len(p):]
        logp = full_logits(model, p + s.out).log_softmax(-1)
        ids = torch.tensor(p + s.out)
        want = logp[:-1].gather(-1, ids[1:, None])[:, 0]
        got = torch.tensor(s.prompt_logprobs + s.logprobs[:len(s.out) - 1])
        torch.testing.assert_close(got, want[:len(got)], atol=1e-5, rtol=0)
        assert all(len(t) == 2 for t in s.top_logprobs)


def test_top_p_keeps_exactly_the_nucleus_at_the_boundary():
    """3,000 cases whose top_p equals the mass of the k most likely tokens exactly (float64 reference: the
    sorted probabilities summed in order): the nucleus is those k tokens, never one more."""
    g = torch.Generator().manual_seed(0)
    wrong = 0
    for case in range(3000):
        V = 8 + case % 40
        logits = (torch.randn(V, generator=g) * [0.3, 1.0, 3.0][case % 3]).float()
        probs = logits.sort(descending=True).values.double().softmax(-1).tolist()
        k = 1 + case % (V - 1)
        top_p = 0.0
        for p in probs[:k]:
            top_p += p
        if not 0 < top_p <= 1:
            continue
        kept = int(filter_logits(logits[None], torch.tensor([0]), torch.tensor([top_p], dtype=torch.float64))
                   .isfinite().sum())
        wrong += kept != k
    assert wrong == 0


def test_presence_frequency_penalties_and_logit_bias_match_a_reference():
    model = build("mla")
    p = prompts([6], seed=12)[0]
    bias = ((ord("a"), 2.0), (ord("b"), -100.0))
    params = SamplingParams(max_new_tokens=12, temperature=0, presence_penalty=0.8, frequency_penalty=1.3,
                            logit_bias=bias, ignore_eos=True)
    got = generate(model, [p], params, ByteTokenizer())[0].out
    ids, counts = list(p), torch.zeros(257)
    for _ in range(12):  # OpenAI's formula over the output only, after the bias
        logits = full_logits(model, ids)[-1, :257].clone()
        for t, b in bias:
            logits[t] += b
        logits -= 0.8 * (counts > 0) + 1.3 * counts
        ids.append(int(logits.argmax()))
        counts[ids[-1]] += 1
    assert got == ids[len(p):] and ord("b") not in got
    assert got != recompute_greedy(model, p, 12)[len(p):]


def test_a_row_that_fails_sampling_fails_alone():
    model = build("mla")
    ps = prompts([5, 8, 3], seed=13)
    params = [SamplingParams(max_new_tokens=10, temperature=1.0, seed=s, ignore_eos=True) for s in (1, 2, 3)]
    alone = [generate(model, [p], q)[0].out for p, q in zip(ps, params)]
    batch = Batch(model, max_batch=3)
    seqs = [batch.new_sequence(p, q) for p, q in zip(ps, params)]
    broken = batch.new_sequence(ps[1], SamplingParams(max_new_tokens=10, frequency_penalty=1.0, ignore_eos=True))
    broken.counts.fill_(float("nan"))  # its logits become NaN inside the step
    batch.add(seqs[:1] + [broken] + seqs[2:])
    while batch.busy:
        batch.step()
    assert broken.finish_reason == "error" and broken.out == []
    assert [seqs[0].out, seqs[2].out] == [alone[0], alone[2]]
    assert sample(torch.tensor([[0.0, float("nan")], [1.0, 0.0]]), [SamplingParams(), SamplingParams(temperature=0)],
                  [torch.Generator(), torch.Generator()]) == [None, 0]


def test_settings_the_sampler_cannot_take_are_refused_by_name():
    for field, value, hint in [("temperature", 1e-45, "0 (greedy)"), ("repetition_penalty", 1e-45, "0.01"),
                               ("seed", 2 ** 64, "integer in"), ("presence_penalty", 3, "[-2, 2]"),
                               ("logprobs", 21, "[0, 20]"), ("temperature", float("inf"), "finite"),
                               ("logit_bias", ((1, 101.0),), "[-100, 100]")]:
        with pytest.raises(ValueError, match=rf"^{field}=.*{re.escape(hint)}"):
            SamplingParams(**{field: value})
    batch = Batch(build("mla"), 1, vocab_limit=257)
    with pytest.raises(ValueError, match=r"^top_k=.*at most the vocabulary's 257"):
        batch.new_sequence([1], SamplingParams(top_k=2 ** 63))
