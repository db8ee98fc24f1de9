"""dsmoe against its peer, Hugging Face transformers' DeepseekV3ForCausalLM: training tokens/s and memory
on the same model, the same batch and the same optimizer.

    python benchmarks/peer_hf.py --quick                       # tiny preset (d 128, 4 layers), seq 128 x 8; < 1 min
    python benchmarks/peer_hf.py                               # v3-tiny cut to 4 layers, seq 512 x 2 (CUDA: all 12, x 16)
    python benchmarks/peer_hf.py --preset smollm2-moe-576x30 --layers 4 --seq 1024 --batch 2
    python benchmarks/peer_hf.py --device cuda --dtype bf16 --batch 16 --iters 20
    python benchmarks/peer_hf.py --check                       # only verify both compute the same function (fp32)
    python benchmarks/peer_hf.py --threads 1                   # on a shared host: one thread gives stable ratios

Needs transformers (`pip install -e ".[hf]"`); without it the script says so and exits 0.

Both models are built from one dsmoe config (a configs/models preset; `--layers N` keeps its first N
layers). The mapping to `transformers.DeepseekV3Config` is explicit (`hf_config`): the same MLA shapes
(q_lora_rank, kv_lora_rank, qk_nope/qk_rope/v head dims), the same DeepSeekMoE (n_routed_experts,
n_shared_experts, num_experts_per_tok = top_k, moe_intermediate_size = expert_hidden,
first_k_dense_replace, n_group / topk_group, norm_topk_prob, routed_scaling_factor, sigmoid scores),
d_model, layers, heads, vocabulary, tied embeddings, RoPE theta (interleaved, `rope_interleave=True`)
and the dense FFN size; no multi-token-prediction layers. Their parameter counts are asserted equal
(both keep the aux-loss-free routing bias as a buffer, not a parameter). dsmoe's weights are then
copied into the HF model (`copy_weights`: stacked experts [E,d,f] become HF's [E,2f,d] gate_up_proj
and [E,d,f] down_proj; interleaved RoPE needs no permutation, since HF's interleaved rotation permutes
q and k alike), so both start identical, route identically, and the first forward doubles as a
function check (max |logits| difference in fp32, recorded in the JSON).

HF runs with its defaults for training: `attn_implementation="sdpa"` (the same
F.scaled_dot_product_attention dsmoe calls) and `experts_implementation="grouped_mm"` (the same grouped
GEMM kernel dsmoe's GroupedExperts uses), so the comparison is library against library, not kernel
against a Python loop. The loss is each library's own (HF: `labels=y, shift_labels=y`, so both score
the same next-token targets). A step is zero_grad(set_to_none) + forward + backward + AdamW step
(dsmoe.train.optim.build_optimizer for both: same groups, lr, betas; foreach on CPU, fused on CUDA).
The batch is the bundled tiny-Shakespeare corpus through dsmoe.data (byte tokens; `--data random`
draws uniform ids over the whole vocabulary instead). Precision: fp32 on CPU, bf16 autocast on CUDA
(`--dtype` overrides). After warmup the timed steps alternate A B B A A B ... so a drifting host load
hits both alike; tokens/s is from the median step (the ratio of the best steps is reported too). On a
CPU shared with other work, two-thread ops wait for a descheduled thread and single steps vary by 2-3x;
`--threads 1` brings the spread down to a few percent.

Memory. CUDA: peak `torch.cuda.max_memory_allocated` during a step above what was allocated before it,
plus the model's own parameters and optimizer state. CPU: the bytes autograd saves for backward in one
forward (dsmoe.metrics.memory.saved_tensor_bytes: each storage counted once, parameters and buffers
excluded; for dsmoe it equals dsmoe.metrics.memory.measure_saved_activation_bytes) plus parameters,
gradients and AdamW state.

Goals: dsmoe >= 1.5x HF's training tokens/s on CPU (>= 3x on CUDA), at no more memory (ratio <= 1).
Results: benchmarks/results/peer_hf-<device>-<date>.json (peer_hf-quick-... for --quick).
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import warnings
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `python benchmarks/peer_hf.py` without installing dsmoe
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.common import device_name, print_table, time_fn, write_results  # noqa: E402
from dsmoe.config import Config, load_config  # noqa: E402
from dsmoe.metrics.memory import saved_tensor_bytes  # noqa: E402

GOAL_SPEEDUP = {"cpu": 1.5, "cuda": 3.0}  # dsmoe tokens/s over HF tokens/s
GOAL_MEMORY = 1.0  # dsmoe peak / HF peak
SEED = 1234
NAMES = ("dsmoe", "hf")
INSTALL_HINT = 'peer_hf: transformers is not installed; install it with `pip install -e ".[hf]"` ' \
               "(transformers + safetensors) and run again. Skipped."


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=None, help="configs/models preset (default: v3-tiny; tiny with --quick)")
    p.add_argument("--layers", type=int, default=None,
                   help="keep the first N layers (default: 4 for v3-tiny on CPU, else the preset's)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 512; 128 with --quick)")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default 2 on CPU, 16 on CUDA; 8 --quick)")
    p.add_argument("--iters", type=int, default=None, help="timed steps per model (default 5 on CPU, 20 on CUDA; "
                                                            "10 with --quick)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps per model first (default 1 on CPU, 3 on CUDA; 2 with --quick on CPU)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="default: bf16 autocast on CUDA, fp32 on CPU")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    p.add_argument("--data", choices=("corpus", "random"), default="corpus",
                   help="batch source: the bundled corpus (byte tokens) or uniform random ids")
    p.add_argument("--hf-experts", choices=("grouped_mm", "batched_mm", "eager"), default="grouped_mm",
                   help="HF experts_implementation (default grouped_mm, HF's own default; eager is the per-expert "
                        "loop transformers 4.x ran)")
    p.add_argument("--threads", type=int, default=None, help="CPU: torch intra-op threads")
    p.add_argument("--check", action="store_true",
                   help="only check that dsmoe and HF compute the same logits/loss/gradients (fp32), then exit")
    p.add_argument("--profile", action="store_true", help="also print the top ops of one step of each (torch.profiler)")
    p.add_argument("--quick", action="store_true", help="the tiny preset at seq 128 x 8: a smoke run of well under a minute")
    p.add_argument("--no-save", action="store_true", help="print the table only, write no JSON")
    args = p.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    gpu = args.device == "cuda"
    args.dtype = args.dtype or ("bf16" if gpu else "fp32")
    args.user_preset = args.preset is not None
    args.preset = args.preset or ("tiny" if args.quick else "v3-tiny")
    if args.layers is None and args.preset == "v3-tiny" and not gpu and not args.check:
        args.layers = 4  # the full 12 layers take minutes per step pair on a few CPU cores
    args.seq = args.seq or (128 if args.quick else 512)
    args.batch = args.batch or (8 if args.quick else (16 if gpu else 2))
    args.warmup = (3 if gpu else 1 if not args.quick else 2) if args.warmup is None else args.warmup
    args.iters = args.iters or {(False, False): 5, (False, True): 10, (True, False): 20, (True, True): 10}[(gpu, args.quick)]
    return args


# ----------------------------------------------------------------------------- the two models


def preset_path(preset: str) -> Path:
    """A configs/models preset name, or a path to a model YAML."""
    path = REPO_ROOT / "configs" / "models" / f"{preset}.yaml"
    if path.is_file():
        return path
    if Path(preset).is_file():
        return Path(preset)
    known = sorted(p.stem for p in (REPO_ROOT / "configs" / "models").glob("*.yaml"))
    raise SystemExit(f"unknown preset {preset!r}; known: {', '.join(known)}")


def make_cfg(preset: str, layers: int | None, seq: int, batch: int, device: str, vocab: int | None = None,
             extra: dict | None = None) -> Config:
    """`extra`: further overrides, {section: {field: value}}, on top of the preset."""
    over = {"train": {"device": device, "seed": SEED, "seq_len": seq, "micro_batch": batch},
            "model": {"max_seq_len": seq, **({"vocab_size": vocab} if vocab else {})}}
    for section, fields in (extra or {}).items():
        over[section] = {**over.get(section, {}), **fields}
    path = preset_path(preset)
    cfg = load_config(path, over)
    if layers is not None:
        if not 1 <= layers <= cfg.model.n_layers:
            raise SystemExit(f"--layers must be in 1..{cfg.model.n_layers} for {preset}, got {layers}")
        moe_layers = cfg.moe.moe_layers and [i for i in cfg.moe.moe_layers if i < layers]
        cfg = load_config(path, {**over, "model": {**over["model"], "n_layers": layers},
                           "moe": {**over.get("moe", {}), "moe_layers": moe_layers or None,
                                   "first_k_dense": min(cfg.moe.first_k_dense, layers)}})
    if cfg.attention.kind != "mla":
        raise SystemExit(f"preset {preset} uses {cfg.attention.kind} attention; DeepseekV3ForCausalLM is MLA only")
    if cfg.moe.moe_layers is not None:
        raise SystemExit(f"preset {preset} lists moe_layers; HF DeepseekV3 only has first_k_dense_replace")
    if cfg.moe.n_routed_experts == 0 or cfg.moe.n_shared_experts == 0 or cfg.moe.score_func != "sigmoid":
        raise SystemExit("HF DeepseekV3 needs routed + shared experts and sigmoid scores")
    if cfg.moe.capacity_factor is not None:
        raise SystemExit("HF DeepseekV3 is dropless: the preset's capacity_factor has no counterpart")
    return cfg


def vocab_of(cfg: Config) -> int:
    from dsmoe.tools.model import vocab_size_of

    return vocab_size_of(cfg)


def hf_config(cfg: Config, vocab: int, attn_implementation: str = "sdpa", experts_implementation: str = "grouped_mm"):
    """dsmoe config -> transformers.DeepseekV3Config, field by field."""
    from transformers import DeepseekV3Config

    m, a, e = cfg.model, cfg.attention, cfg.moe
    return DeepseekV3Config(
        vocab_size=vocab, hidden_size=m.d_model, num_hidden_layers=m.n_layers,
        num_attention_heads=m.n_heads, num_key_value_heads=m.n_heads,  # MLA: every head has its own K/V
        intermediate_size=m.ffn_hidden,  # the dense FFN of the first_k_dense_replace layers
        max_position_embeddings=m.max_seq_len, rms_norm_eps=m.norm_eps,
        tie_word_embeddings=m.tie_embeddings, initializer_range=m.init_std,
        rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta},
        rope_interleave=True,  # dsmoe rotates interleaved pairs (DeepSeek's layout)
        q_lora_rank=a.q_lora_rank or None, kv_lora_rank=a.kv_lora_rank,
        qk_nope_head_dim=a.qk_nope_head_dim, qk_rope_head_dim=a.qk_rope_head_dim, v_head_dim=a.v_head_dim,
        n_routed_experts=e.n_routed_experts, n_shared_experts=e.n_shared_experts,
        num_experts_per_tok=e.top_k, moe_intermediate_size=e.expert_hidden,
        first_k_dense_replace=e.first_k_dense, n_group=e.n_groups, topk_group=e.topk_groups,
        # dsmoe renormalises only when top_k > 1 (with one expert it keeps the raw sigmoid score)
        norm_topk_prob=e.norm_topk_prob and e.top_k > 1,
        routed_scaling_factor=e.routed_scaling_factor,
        num_mtp_layers=0, use_cache=False, attention_dropout=0.0,
        attn_implementation=attn_implementation, experts_implementation=experts_implementation,
    )


def build_models(cfg: Config, vocab: int, device: torch.device, attn_implementation: str = "sdpa",
                 experts_implementation: str = "grouped_mm"):
    from transformers import DeepseekV3ForCausalLM

    from dsmoe.model.transformer import Transformer

    torch.manual_seed(SEED)
    ds = Transformer(cfg, vocab_size=vocab)
    hf = DeepseekV3ForCausalLM(hf_config(cfg, vocab, attn_implementation, experts_implementation))
    n_ds = sum(p.numel() for p in ds.parameters())
    n_hf = sum(p.numel() for p in hf.parameters())
    if n_ds != n_hf:
        raise AssertionError(f"parameter counts differ: dsmoe {n_ds:,} vs HF {n_hf:,}")
    copy_weights(ds, hf)
    return ds.to(device).train(), hf.to(device).train(), n_ds


@torch.no_grad()
def copy_weights(ds: torch.nn.Module, hf: torch.nn.Module) -> None:
    """Copy every dsmoe tensor into its HF counterpart; every HF parameter must be written once."""
    hf_params = dict(hf.named_parameters(remove_duplicate=False))
    hf_tensors = {**hf_params, **dict(hf.named_buffers())}
    written: set[str] = set()

    def put(name: str, value: torch.Tensor) -> None:
        dst = hf_tensors[name]
        if dst.shape != value.shape:
            raise AssertionError(f"{name}: HF shape {tuple(dst.shape)} vs mapped dsmoe {tuple(value.shape)}")
        dst.copy_(value)
        written.add(name)

    put("model.embed_tokens.weight", ds.tok_embeddings.weight)
    put("lm_head.weight", ds.output.weight)
    put("model.norm.weight", ds.norm.weight)
    attn_map = {"wq": "q_proj", "wq_a": "q_a_proj", "q_norm": "q_a_layernorm", "wq_b": "q_b_proj",
                "wkv_a": "kv_a_proj_with_mqa", "kv_norm": "kv_a_layernorm", "wkv_b": "kv_b_proj", "wo": "o_proj"}
    for i, block in enumerate(ds.layers):
        pre = f"model.layers.{i}."
        put(pre + "input_layernorm.weight", block.attn_norm.weight)
        put(pre + "post_attention_layernorm.weight", block.ffn_norm.weight)
        for ours, theirs in attn_map.items():
            if hasattr(block.attn, ours):
                put(f"{pre}self_attn.{theirs}.weight", getattr(block.attn, ours).weight)
        ffn = block.ffn
        if not block.is_moe:
            for ours, theirs in (("w_gate", "gate_proj"), ("w_up", "up_proj"), ("w_down", "down_proj")):
                put(f"{pre}mlp.{theirs}.weight", getattr(ffn, ours).weight)
            continue
        put(pre + "mlp.gate.weight", ffn.router.weight)
        put(pre + "mlp.gate.e_score_correction_bias", ffn.router.expert_bias)
        ex = ffn.experts  # [E, d, f] (input-major) -> HF's nn.Linear layout [E, out, in]
        put(pre + "mlp.experts.gate_up_proj", torch.cat([ex.w_gate.transpose(1, 2), ex.w_up.transpose(1, 2)], 1))
        put(pre + "mlp.experts.down_proj", ex.w_down.transpose(1, 2))
        for ours, theirs in (("w_gate", "gate_proj"), ("w_up", "up_proj"), ("w_down", "down_proj")):
            put(f"{pre}mlp.shared_experts.{theirs}.weight", getattr(ffn.shared, ours).weight)
    missing = sorted(set(hf_params) - written)
    if missing:
        raise AssertionError(f"HF parameters with no dsmoe counterpart: {missing[:8]}")


def hf_grads_as_dsmoe(ds: torch.nn.Module, hf: torch.nn.Module) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(dsmoe name, dsmoe grad, HF grad mapped to dsmoe's layout) for the gradients that exist."""
    g = {n: p.grad for n, p in hf.named_parameters(remove_duplicate=False)}
    out = []
    for i, block in enumerate(ds.layers):
        if block.is_moe:
            ex, pre = block.ffn.experts, f"model.layers.{i}.mlp.experts."
            f = ex.w_gate.shape[2]
            gu = g[pre + "gate_up_proj"]
            out += [(f"layers.{i}.ffn.experts.w_gate", ex.w_gate.grad, gu[:, :f].transpose(1, 2)),
                    (f"layers.{i}.ffn.experts.w_up", ex.w_up.grad, gu[:, f:].transpose(1, 2)),
                    (f"layers.{i}.ffn.experts.w_down", ex.w_down.grad, g[pre + "down_proj"].transpose(1, 2))]
            out.append((f"layers.{i}.ffn.router.weight", block.ffn.router.weight.grad, g[f"model.layers.{i}.mlp.gate.weight"]))
        out.append((f"layers.{i}.attn.wkv_a.weight", block.attn.wkv_a.weight.grad,
                    g[f"model.layers.{i}.self_attn.kv_a_proj_with_mqa.weight"]))
    out.append(("tok_embeddings.weight", ds.tok_embeddings.weight.grad, g["model.embed_tokens.weight"]))
    return out


# ----------------------------------------------------------------------------- steps and measurements


def get_batch(cfg: Config, vocab: int, seq: int, batch: int, source: str, device) -> tuple[torch.Tensor, torch.Tensor]:
    if source == "random":
        gen = torch.Generator().manual_seed(SEED)
        rows = torch.randint(0, vocab, (batch, seq + 1), generator=gen)
        x, y = rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
    else:
        from dsmoe.data import TokenBatches, ensure_prepared, load_prepared

        directory = ensure_prepared("shakespeare", "byte", REPO_ROOT / cfg.data.cache_dir)
        _, train, _ = load_prepared(directory)
        x, y = TokenBatches(train, seq, batch, seed=SEED).batch(0)
    return x.to(device), y.to(device)


def forward_loss(name: str, model, x, y) -> torch.Tensor:
    if name == "dsmoe":
        return model(x, y).loss
    return model(input_ids=x, labels=y, shift_labels=y, use_cache=False).loss


def make_step(name: str, model, opt, x, y, autocast_dtype):
    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = forward_loss(name, model, x, y)
        loss.backward()
        opt.step()
        return loss
    return step


def state_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    params = list(model.parameters())
    optim = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    return {"param_bytes": sum(p.numel() * p.element_size() for p in params),
            "grad_bytes": sum(p.numel() * p.element_size() for p in params if p.requires_grad),
            "optim_bytes": optim}


@torch.no_grad()
def compare_outputs(ds, hf, x, y) -> dict:
    """fp32 logits and loss of both models on one batch (no autocast)."""
    was = ds.training, hf.training
    ds.eval(), hf.eval()
    logits, ce = ds(x).logits, ds(x, y).ce_loss  # with targets dsmoe never materialises the logits
    b = hf(input_ids=x, labels=y, shift_labels=y, use_cache=False)
    ds.train(was[0]), hf.train(was[1])
    diff = (logits.float() - b.logits.float()).abs().max().item()
    return {"logits_max_abs_diff": diff, "logits_max_abs": logits.abs().max().item(),
            "loss_dsmoe": ce.item(), "loss_hf": b.loss.item(),
            "loss_abs_diff": abs(ce.item() - b.loss.item())}


def check_shapes(args) -> int:
    """--check: same logits, loss and gradients in fp32 on a few shapes, on the CPU."""
    # (preset, layers, seq, batch, vocab override): q_lora on/off, top-1 and top-2, and v3-mini's
    # group-limited routing (8 groups, 4 used) with routed_scaling_factor 2.5 at a small vocabulary
    shapes = [("tiny", None, 64, 4, None), ("v3-tiny", 2, 64, 2, None), ("smollm2-135m-moe", 2, 64, 2, None),
              ("v3-mini", 2, 32, 1, 4096)]
    if args.user_preset and (args.preset not in {s[0] for s in shapes} or args.layers):
        n = args.layers or min(3, load_config(preset_path(args.preset)).model.n_layers)
        shapes.insert(0, (args.preset, n, 64, 2, None))
    rows, ok = [], True
    for preset, layers, seq, batch, vocab_override in shapes:
        cfg = make_cfg(preset, layers, seq, batch, "cpu", vocab_override)
        vocab = vocab_of(cfg)
        ds, hf, n = build_models(cfg, vocab, torch.device("cpu"))
        x, y = get_batch(cfg, vocab, seq, batch, "random", "cpu")
        res = compare_outputs(ds, hf, x, y)
        ds.zero_grad(set_to_none=True), hf.zero_grad(set_to_none=True)
        forward_loss("dsmoe", ds, x, y).backward()
        forward_loss("hf", hf, x, y).backward()
        grad_rel = max(((a - b).abs().max() / a.abs().max().clamp_min(1e-12)).item()
                       for _, a, b in hf_grads_as_dsmoe(ds, hf))
        good = res["logits_max_abs_diff"] < 1e-4 and res["loss_abs_diff"] < 1e-5 and grad_rel < 1e-3
        ok &= good
        label = f"{preset} ({cfg.model.n_layers}L" + (f", vocab {vocab}" if vocab_override else "") + ")"
        rows.append([label, f"{n:,}", f"{res['logits_max_abs_diff']:.2e}",
                     f"{res['loss_abs_diff']:.2e}", f"{grad_rel:.2e}", "ok" if good else "MISMATCH"])
    print_table("dsmoe vs HF DeepseekV3ForCausalLM: same weights, same function? (fp32, CPU)",
                ["preset", "params", "max |dlogits|", "|dloss|", "max grad rel diff", "verdict"], rows,
                caption="limits: logits 1e-4, loss 1e-5, gradients 1e-3 (relative to the largest entry)")
    return 0 if ok else 1


def profile_step(name: str, step, device) -> None:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        step()
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    print(f"\n-- {name}: top ops of one step by self time --")
    print(prof.key_averages().table(sort_by="self_" + key, row_limit=15))


def run(args) -> dict:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    autocast_dtype = torch.bfloat16 if args.dtype == "bf16" else None
    cfg = make_cfg(args.preset, args.layers, args.seq, args.batch, device.type)
    vocab = vocab_of(cfg)
    ds, hf, n_params = build_models(cfg, vocab, device, experts_implementation=args.hf_experts)
    x, y = get_batch(cfg, vocab, args.seq, args.batch, args.data, device)
    check = compare_outputs(ds, hf, x, y)  # identical weights: the same function, before any step

    from dsmoe.train.optim import build_optimizer

    models = {"dsmoe": ds, "hf": hf}
    opts = {k: build_optimizer(m, cfg.train) for k, m in models.items()}
    steps = {k: make_step(k, models[k], opts[k], x, y, autocast_dtype) for k in NAMES}
    tokens = args.batch * args.seq

    rows = {k: {"impl": k} for k in NAMES}
    for k in NAMES:  # activations saved for backward by one forward (same on every step)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            rows[k]["saved_activation_bytes"] = saved_tensor_bytes(lambda k=k: forward_loss(k, models[k], x, y), models[k])
    if device.type == "cpu" and autocast_dtype is None:
        from dsmoe.metrics.memory import measure_saved_activation_bytes

        rows["dsmoe"]["library_measure_bytes"] = measure_saved_activation_bytes(ds, (x, y))

    for k in NAMES:
        for _ in range(args.warmup):
            steps[k]()
    times = {k: [] for k in NAMES}
    peak_extra = dict.fromkeys(NAMES, 0)
    losses = {k: [] for k in NAMES}
    for i in range(args.iters):
        for k in (NAMES if i % 2 == 0 else NAMES[::-1]):  # A B, B A, A B ...: neither always goes first
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            loss_box = []
            times[k] += time_fn(lambda k=k: loss_box.append(steps[k]()), warmup=0, iters=1, device=device)["times_ms"]
            losses[k].append(loss_box[-1].item())
            if device.type == "cuda":
                peak_extra[k] = max(peak_extra[k], torch.cuda.max_memory_allocated(device) - before)

    for k in NAMES:
        r = rows[k]
        ts = times[k]
        r.update(median_ms=statistics.median(ts), min_ms=min(ts), iters=len(ts), times_ms=ts,
                 last_loss=losses[k][-1])
        r["tokens_per_s"] = tokens / (r["median_ms"] / 1e3)
        st = state_bytes(models[k], opts[k])
        r.update(st)
        if device.type == "cuda":
            # grads are freed by zero_grad(set_to_none) before each step, so the step's peak holds them
            r["step_peak_extra_bytes"] = peak_extra[k]
            r["peak_bytes"] = st["param_bytes"] + st["optim_bytes"] + peak_extra[k]
            r["memory_measure"] = "cuda max_memory_allocated"
        else:
            r["peak_bytes"] = st["param_bytes"] + st["grad_bytes"] + st["optim_bytes"] + r["saved_activation_bytes"]
            r["memory_measure"] = "params + grads + AdamW state + saved activations"
    speedup = rows["dsmoe"]["tokens_per_s"] / rows["hf"]["tokens_per_s"]
    speedup_min = rows["hf"]["min_ms"] / rows["dsmoe"]["min_ms"]  # best steps: less sensitive to a busy host
    mem_ratio = rows["dsmoe"]["peak_bytes"] / rows["hf"]["peak_bytes"]
    act_ratio = rows["dsmoe"]["saved_activation_bytes"] / rows["hf"]["saved_activation_bytes"]
    goal_rows = [
        {"goal": f"dsmoe tokens/s >= {GOAL_SPEEDUP[device.type]}x HF on {device.type}", "value": round(speedup, 3),
         "target": GOAL_SPEEDUP[device.type], "met": speedup >= GOAL_SPEEDUP[device.type]},
        {"goal": f"dsmoe peak memory <= {GOAL_MEMORY}x HF", "value": round(mem_ratio, 3), "target": GOAL_MEMORY,
         "met": mem_ratio <= GOAL_MEMORY},
    ]

    import transformers

    mb = 2 ** 20
    table = [[k, f"{rows[k]['median_ms']:.1f}", f"{rows[k]['min_ms']:.1f}", f"{rows[k]['tokens_per_s']:,.0f}",
              f"{rows[k]['saved_activation_bytes'] / mb:,.1f}",
              f"{(rows[k]['param_bytes'] + rows[k]['grad_bytes'] + rows[k]['optim_bytes']) / mb:,.1f}",
              f"{rows[k]['peak_bytes'] / mb:,.1f}", f"{rows[k]['last_loss']:.4f}"] for k in NAMES]
    table.append(["dsmoe / hf", f"{rows['dsmoe']['median_ms'] / rows['hf']['median_ms']:.3f}",
                  f"{rows['dsmoe']['min_ms'] / rows['hf']['min_ms']:.3f}",
                  f"{speedup:.2f}x", f"{act_ratio:.3f}", "", f"{mem_ratio:.3f}", ""])
    shape = (f"{args.preset}" + (f" [{cfg.model.n_layers}L]" if args.layers else "")
             + f", d {cfg.model.d_model}, {cfg.moe.n_routed_experts}+{cfg.moe.n_shared_experts} experts "
               f"top-{cfg.moe.top_k}, vocab {vocab}, {n_params / 1e6:.1f}M params")
    print_table(f"Training step, dsmoe vs HF transformers {transformers.__version__} DeepseekV3ForCausalLM: {shape}; "
                f"batch {args.batch} x seq {args.seq}, {args.dtype}, {device_name(device)} "
                f"(warmup {args.warmup}, median of {args.iters}, interleaved)",
                ["impl", "ms / step (median)", "min ms", "tokens/s", "saved act MiB", "params+grads+adam MiB",
                 "peak MiB", "loss (last)"], table,
                caption=f"HF: attn_implementation={hf.config._attn_implementation}, "
                        f"experts_implementation={hf.config._experts_implementation}; identical initial weights: "
                        f"max |dlogits| {check['logits_max_abs_diff']:.1e}")
    for gl in goal_rows:
        print(f"  {gl['goal']:<44} {gl['value']:>7.3f}  {'met' if gl['met'] else 'NOT met'}")

    if args.profile:
        for k in NAMES:
            profile_step(k, steps[k], device)

    return {
        "device_type": device.type, "transformers": transformers.__version__,
        "preset": args.preset, "layers": cfg.model.n_layers, "d_model": cfg.model.d_model,
        "vocab_size": vocab, "n_params": n_params, "seq_len": args.seq, "micro_batch": args.batch,
        "tokens_per_step": tokens, "dtype": args.dtype, "autocast": autocast_dtype is not None,
        "data": args.data, "warmup": args.warmup, "iters": args.iters, "quick": args.quick,
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "hf_attn_implementation": hf.config._attn_implementation,
        "hf_experts_implementation": hf.config._experts_implementation,
        "model_config": cfg.model_dict(), "function_check": check,
        "rows": list(rows.values()), "speedup_tokens_per_s": speedup, "speedup_min_step": speedup_min,
        "peak_memory_ratio": mem_ratio,
        "saved_activation_ratio": act_ratio, "goals": goal_rows,
        "all_goals_met": all(gl["met"] for gl in goal_rows),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    if importlib.util.find_spec("transformers") is None:
        print(INSTALL_HINT)
        return 0
    import transformers

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", module="transformers")
    torch.manual_seed(SEED)
    if args.check:
        return check_shapes(args)
    payload = run(args)
    if not args.no_save:
        path = write_results("peer_hf-quick" if args.quick else "peer_hf", payload, device=args.device)
        print(f"wrote {path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
