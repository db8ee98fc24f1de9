"""dsmoe against its peer, torchtitan's DeepSeek-V3 model: training step time and memory on the same model,
weights, batch and optimizer.

    python benchmarks/peer_torchtitan.py --quick          # tiny preset, 4 x 32, bf16, CPU: about a minute
    python benchmarks/peer_torchtitan.py                  # tiny at 8 x 128 on CPU; smollm2-moe-576x30 at 4 x 2048 on CUDA
    python benchmarks/peer_torchtitan.py --shape larger   # d 384, 6 layers, 16 experts of 256 top-4, 4 x 256
    python benchmarks/peer_torchtitan.py --shape smollm2-moe-576x30   # its first 4 layers, 4 x 256 on CPU
    python benchmarks/peer_torchtitan.py --preset v3-tiny --layers 2 --seq 256 --batch 2 --threads 1

`--shape` names a preset with its layers, overrides, batch and sequence (SHAPES); --preset, --layers,
--seq and --batch override it. On CPU one torch thread unless --threads.

Needs torchtitan (`pip install -e ".[peer]"`, or only what its model imports: `pip install --no-deps
torchtitan==0.3.0 tyro spmd_types==0.2.3 einops docstring_parser typeguard`); without it the script
says so and exits 0.

Both models come from one dsmoe config (benchmarks/peer_hf.make_cfg: a configs/models preset, `--layers N`
keeps its first N). torchtitan's is built with its own config builders
(`torchtitan.models.deepseek_v3.build_mla_moe_layers`, `DeepSeekV3Model.Config`): the same MLA shapes,
dense FFN and DeepSeekMoE (sigmoid scores, route_norm = norm_topk_prob, route_scale =
routed_scaling_factor, expert groups, the aux-loss-free bias as a buffer), ComplexRoPE (DeepSeek's
interleaved pairs, which dsmoe rotates too), the RMSNorm epsilon, tied embeddings, no multi-token
prediction. dsmoe's initial weights are copied in (`copy_weights`: stacked experts [E,d,f] become
torchtitan's w1_EFD / w3_EFD [E,f,d] and w2_EDF [E,d,f]; every torchtitan parameter is written once).

Attention: torchtitan 0.3 runs language models only on FlexAttention or varlen (compiled, block masks);
here its inner attention is replaced by the very SDPA call dsmoe makes (causal, V padded to the q/k head
size as dsmoe does for the flash kernels), so the two differ in everything but the attention kernel.
torchtitan's routed experts always compute in bf16; both run under bf16 autocast (torchtitan's own
single-device mixed precision), so the function check compares bf16 logits (RMS of the difference over
RMS of the logits, and the losses; a disagreement is reported as a goal not met, the timing still runs).
The loss of both is cross-entropy in fp32 over the same targets.

A step is zero_grad(set_to_none) + forward + loss + backward + AdamW (dsmoe.train.optim.build_optimizer
for both). After warmup the timed steps alternate A B, B A, ... and each round's torchtitan/dsmoe time
ratio is kept: the speedup is the median of those per-round ratios (tokens/s from the median steps too).
Memory: CUDA max_memory_allocated above the step's start plus parameters and AdamW state; CPU: the bytes
autograd saves in one forward (dsmoe.metrics.memory.saved_tensor_bytes) plus parameters, gradients and
AdamW state. Goals: dsmoe >= 1.0x torchtitan's tokens/s on CPU, >= 1.2x on CUDA, at no more memory.
Every round's ratio is kept in the JSON, with the shape: benchmarks/results/peer_torchtitan[-quick]-<device>-<date>T<time>.json
(a later run never overwrites an earlier one's rounds).
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.common import device_name, print_table, time_fn, write_results  # noqa: E402
from benchmarks.peer_hf import GOAL_MEMORY, SEED, get_batch, make_cfg, state_bytes, vocab_of  # noqa: E402
from dsmoe.metrics.memory import saved_tensor_bytes  # noqa: E402

GOAL_SPEEDUP = {"cpu": 1.0, "cuda": 1.2}  # dsmoe tokens/s over torchtitan tokens/s
NAMES = ("dsmoe", "torchtitan")
# bf16 keeps ~3 significant digits per op; a token whose top-k experts tie can route differently in deep models,
# so the logits are compared by relative RMS (the largest difference is reported too)
CHECK_LIMITS = {"logits_rms_rel": 2e-2, "loss_abs": 2e-2}
INSTALL_HINT = ('peer_torchtitan: torchtitan is not installed; install it with `pip install -e ".[peer]"` (or '
                "`pip install --no-deps torchtitan==0.3.0 tyro spmd_types==0.2.3 einops docstring_parser typeguard`) "
                "and run again. Skipped.")
TRITON_KERNELS = "torchtitan.distributed.minimal_async_ep.kernels"


# shape -> the preset, its first `layers`, overrides, and (batch, seq) on CPU and on CUDA
SHAPES = {
    "tiny": dict(preset="tiny", layers=None, extra={}, cpu=(8, 128), cuda=(8, 128)),
    "larger": dict(preset="tiny", layers=6, cpu=(4, 256), cuda=(4, 256), extra={
        "model": {"d_model": 384, "n_layers": 6, "n_heads": 6, "ffn_hidden": 1024, "vocab_size": 8192},
        "attention": {"kv_lora_rank": 128},
        "moe": {"n_routed_experts": 16, "n_shared_experts": 1, "top_k": 4, "expert_hidden": 256}}),
    "smollm2-moe-576x30": dict(preset="smollm2-moe-576x30", layers=4, extra={}, cpu=(4, 256), cuda=(4, 2048)),
}


def available() -> bool:
    return importlib.util.find_spec("torchtitan") is not None


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=tuple(SHAPES), default=None,
                   help="a preset with its layers, overrides, batch and seq (default: tiny; smollm2-moe-576x30 on CUDA)")
    p.add_argument("--preset", default=None, help="configs/models preset (default: the shape's)")
    p.add_argument("--layers", type=int, default=None, help="keep the first N layers")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 128; 32 --quick; 2048 CUDA)")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default 8; 4 --quick and CUDA)")
    p.add_argument("--iters", type=int, default=None, help="timed rounds (default 5; 3 --quick; 10 CUDA)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per model first (default 1; 3 CUDA)")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16",
                   help="autocast dtype (default bf16; torchtitan's routed experts are bf16 either way)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    p.add_argument("--threads", type=int, default=1, help="CPU: torch intra-op threads (default 1)")
    p.add_argument("--quick", action="store_true", help="tiny preset at 4 x 32: a smoke run")
    p.add_argument("--no-save", action="store_true", help="print the table only, write no JSON")
    args = p.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    gpu = args.device == "cuda"
    args.shape = args.shape or ("smollm2-moe-576x30" if gpu and not args.quick else "tiny")
    shape = SHAPES[args.shape]
    if args.preset is None:
        args.preset, args.layers = shape["preset"], args.layers or shape["layers"]
    args.extra = shape["extra"] if args.preset == shape["preset"] else {}
    batch, seq = shape["cuda" if gpu else "cpu"]
    if args.quick and args.shape == "tiny":
        batch, seq = 4, 32
    args.seq = args.seq or seq
    args.batch = args.batch or batch
    args.iters = args.iters or (3 if args.quick else 10 if gpu else 5)
    args.warmup = (3 if gpu else 1) if args.warmup is None else args.warmup
    return args


# ----------------------------------------------------------------------------- torchtitan's model


class _Unavailable(types.ModuleType):
    """Stands in for a module whose import needs a package that is absent; any use of it raises."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)

        def unavailable(*args, **kwargs):
            raise RuntimeError(f"{self.__name__}.{name} needs triton, which is not installed")
        return unavailable


def import_titan():
    """torchtitan's DeepSeek-V3 pieces. torchtitan imports its expert-parallel Triton kernels at module import,
    although a single-process model never calls them; where triton is absent (CPU-only installs) only that
    module is replaced by a stand-in that raises when called."""
    if importlib.util.find_spec("triton") is None:
        sys.modules.setdefault(TRITON_KERNELS, _Unavailable(TRITON_KERNELS))
    from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm
    from torchtitan.models.deepseek_v3 import DeepSeekV3Model, build_mla_moe_layers

    return types.SimpleNamespace(ComplexRoPE=ComplexRoPE, Embedding=Embedding, Linear=Linear, RMSNorm=RMSNorm,
                                 DeepSeekV3Model=DeepSeekV3Model, build_mla_moe_layers=build_mla_moe_layers)


class CausalSDPA(torch.nn.Module):
    """torchtitan's inner-attention slot ([B, L, heads, head dim] in and out) filled with dsmoe's kernel call:
    causal F.scaled_dot_product_attention, V zero-padded to the q/k head size (flash kernels need them equal)."""

    def forward(self, q_BLNK, k_BLNK, v_BLNV, *, scale=None, **_):
        v_dim = v_BLNV.shape[-1]
        pad = q_BLNK.shape[-1] - v_dim
        v = F.pad(v_BLNV, (0, pad)) if pad > 0 else v_BLNV
        out_BNLK = F.scaled_dot_product_attention(q_BLNK.transpose(1, 2), k_BLNK.transpose(1, 2), v.transpose(1, 2),
                                                  is_causal=True, scale=scale)
        return out_BNLK[..., :v_dim].transpose(1, 2)


def titan_model(cfg, vocab: int, device: torch.device):
    """torchtitan's DeepSeekV3Model for a dsmoe config, parameters allocated on `device` (values: copy_weights)."""
    tt = import_titan()
    m, a, e = cfg.model, cfg.attention, cfg.moe
    init = {"weight": torch.nn.init.zeros_}  # every parameter is overwritten by copy_weights
    experts_init = dict.fromkeys(("w1_EFD", "w2_EDF", "w3_EFD"), torch.nn.init.zeros_)
    layers = tt.build_mla_moe_layers(
        n_layers=m.n_layers, n_dense_layers=e.first_k_dense, dim=m.d_model, n_heads=m.n_heads,
        q_lora_rank=a.q_lora_rank, kv_lora_rank=a.kv_lora_rank, qk_nope_head_dim=a.qk_nope_head_dim,
        qk_rope_head_dim=a.qk_rope_head_dim, v_head_dim=a.v_head_dim, mscale=1.0, dense_hidden_dim=m.ffn_hidden,
        moe_hidden_dim=e.expert_hidden, num_experts=e.n_routed_experts, num_shared_experts=e.n_shared_experts,
        router_top_k=e.top_k, router_score_func=e.score_func,
        router_num_expert_groups=e.n_groups if e.n_groups > 1 else None,
        router_num_limited_groups=e.topk_groups if e.n_groups > 1 else None,
        router_route_scale=e.routed_scaling_factor, router_route_norm=e.norm_topk_prob and e.top_k > 1,
        attn_backend="flex", moe_comm_backend="standard", non_blocking_capacity_factor=None,
        linear_init=init, norm_init={"weight": torch.nn.init.ones_}, depth_init=lambda layer: init,
        depth_experts_init=lambda layer: experts_init,
        rope=tt.ComplexRoPE.Config(dim=a.qk_rope_head_dim, max_seq_len=m.max_seq_len, theta=m.rope_theta))
    config = tt.DeepSeekV3Model.Config(
        vocab_size=vocab, dim=m.d_model, layers=layers, enable_weight_tying=m.tie_embeddings,
        tok_embeddings=tt.Embedding.Config(num_embeddings=vocab, embedding_dim=m.d_model, param_init=init),
        norm=tt.RMSNorm.Config(normalized_shape=m.d_model, param_init={"weight": torch.nn.init.ones_}),
        lm_head=tt.Linear.Config(in_features=m.d_model, out_features=vocab, param_init=init))
    with torch.device(device):
        model = config.build()
        model.init_states(buffer_device=device)
    for module in model.modules():
        if isinstance(module, torch.nn.RMSNorm):
            module.eps = m.norm_eps  # torchtitan's builders keep nn.RMSNorm's 1e-5
    for layer in model.layers.values():
        layer.attention.inner_attention = CausalSDPA()
    return model


@torch.no_grad()
def copy_weights(ds: torch.nn.Module, tt: torch.nn.Module) -> None:
    """Copy every dsmoe tensor into its torchtitan counterpart; every torchtitan parameter must be written once."""
    params = dict(tt.named_parameters(remove_duplicate=False))
    tensors = {**params, **dict(tt.named_buffers())}
    written: set[str] = set()

    def put(name: str, value: torch.Tensor) -> None:
        dst = tensors[name]
        if dst.shape != value.shape:
            raise AssertionError(f"{name}: torchtitan shape {tuple(dst.shape)} vs mapped dsmoe {tuple(value.shape)}")
        dst.copy_(value)
        written.add(name)

    put("tok_embeddings.weight", ds.tok_embeddings.weight)
    put("lm_head.weight", ds.output.weight)
    put("norm.weight", ds.norm.weight)
    swiglu = (("w_gate", "w1"), ("w_up", "w3"), ("w_down", "w2"))
    for i, block in enumerate(ds.layers):
        pre = f"layers.{i}."
        put(pre + "attention_norm.weight", block.attn_norm.weight)
        put(pre + "ffn_norm.weight", block.ffn_norm.weight)
        for name in ("wq", "wq_a", "q_norm", "wq_b", "wkv_a", "kv_norm", "wkv_b", "wo"):
            if hasattr(block.attn, name):
                put(f"{pre}attention.{name}.weight", getattr(block.attn, name).weight)
        ffn = block.ffn
        if not block.is_moe:
            for ours, theirs in swiglu:
                put(f"{pre}feed_forward.{theirs}.weight", getattr(ffn, ours).weight)
            continue
        put(pre + "moe.router.gate.weight", ffn.router.weight)
        put(pre + "moe.expert_bias_E", ffn.router.expert_bias)
        ex, inner = ffn.experts, pre + "moe.routed_experts.inner_experts."
        put(inner + "w1_EFD", ex.w_gate.transpose(1, 2))  # [E, d, f] -> [E, f, d]
        put(inner + "w3_EFD", ex.w_up.transpose(1, 2))
        put(inner + "w2_EDF", ex.w_down.transpose(1, 2))  # [E, f, d] -> [E, d, f]
        for ours, theirs in swiglu:
            put(f"{pre}moe.shared_experts.{theirs}.weight", getattr(ffn.shared, ours).weight)
    missing = sorted(set(params) - written)
    if missing:
        raise AssertionError(f"torchtitan parameters with no dsmoe counterpart: {missing[:8]}")


def build_models(cfg, vocab: int, device: torch.device):
    from dsmoe.model.transformer import Transformer

    torch.manual_seed(SEED)
    ds = Transformer(cfg, vocab_size=vocab).to(device)
    tt = titan_model(cfg, vocab, device)
    n_ds, n_tt = (sum(p.numel() for p in mdl.parameters()) for mdl in (ds, tt))
    if n_ds != n_tt:
        raise AssertionError(f"parameter counts differ: dsmoe {n_ds:,} vs torchtitan {n_tt:,}")
    copy_weights(ds, tt)
    return ds.train(), tt.train(), n_ds


# ----------------------------------------------------------------------------- steps and measurements


def loss_of(name: str, model, x, y) -> torch.Tensor:
    if name == "dsmoe":
        return model(x, y).loss
    return F.cross_entropy(model(x).float().flatten(0, 1), y.flatten())  # torchtitan's loss: fp32 CE


def make_step(name: str, model, opt, x, y, dtype):
    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
            loss = loss_of(name, model, x, y)
        loss.backward()
        opt.step()
        return loss
    return step


@torch.no_grad()
def compare_outputs(ds, tt, x, y, dtype) -> dict:
    """Logits and loss of both on one batch under the benchmark's autocast, before any step."""
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
        logits, loss = ds(x).logits.float(), ds(x, y).ce_loss.item()  # with targets dsmoe keeps no logits
        b = tt(x).float()
        loss_tt = F.cross_entropy(b.flatten(0, 1), y.flatten()).item()
    diff = (logits - b).abs().max().item()
    scale = logits.abs().max().item()
    out = {"logits_max_abs_diff": diff, "logits_max_abs": scale, "logits_rel_diff": diff / scale,
           "logits_rms_rel_diff": ((logits - b).norm() / logits.norm()).item(),
           "loss_dsmoe": loss, "loss_torchtitan": loss_tt, "loss_abs_diff": abs(loss - loss_tt), "limits": CHECK_LIMITS}
    out["agree"] = (out["logits_rms_rel_diff"] <= CHECK_LIMITS["logits_rms_rel"]
                    and out["loss_abs_diff"] <= CHECK_LIMITS["loss_abs"])
    return out


def run(args) -> dict:
    device = torch.device(args.device)
    if args.threads and device.type == "cpu":
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.dtype == "bf16" else None
    cfg = make_cfg(args.preset, args.layers, args.seq, args.batch, device.type, extra=args.extra)
    vocab = vocab_of(cfg)
    ds, tt, n_params = build_models(cfg, vocab, device)
    x, y = get_batch(cfg, vocab, args.seq, args.batch, "random", device)
    check = compare_outputs(ds, tt, x, y, dtype)
    if not check["agree"]:  # still timed: the goal rows say the comparison is not of the same function
        print(f"peer_torchtitan: WARNING: dsmoe and torchtitan disagree on the same weights: {check}")

    from dsmoe.train.optim import build_optimizer

    models = {"dsmoe": ds, "torchtitan": tt}
    opts = {k: build_optimizer(mdl, cfg.train) for k, mdl in models.items()}
    steps = {k: make_step(k, models[k], opts[k], x, y, dtype) for k in NAMES}
    rows = {k: {"impl": k} for k in NAMES}
    for k in NAMES:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            rows[k]["saved_activation_bytes"] = saved_tensor_bytes(lambda k=k: loss_of(k, models[k], x, y), models[k])
        for _ in range(args.warmup):
            steps[k]()
    times = {k: [] for k in NAMES}
    peak_extra = dict.fromkeys(NAMES, 0)
    for i in range(args.iters):
        for k in (NAMES if i % 2 == 0 else NAMES[::-1]):  # neither always goes first
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            times[k] += time_fn(steps[k], warmup=0, iters=1, device=device)["times_ms"]
            if device.type == "cuda":
                peak_extra[k] = max(peak_extra[k], torch.cuda.max_memory_allocated(device) - before)
    tokens = args.batch * args.seq
    for k in NAMES:
        r, st = rows[k], state_bytes(models[k], opts[k])
        r.update(st, median_ms=statistics.median(times[k]), min_ms=min(times[k]), times_ms=times[k])
        r["tokens_per_s"] = tokens / (r["median_ms"] / 1e3)
        if device.type == "cuda":  # grads are freed by zero_grad(set_to_none), so the step's peak holds them
            r["peak_bytes"] = st["param_bytes"] + st["optim_bytes"] + peak_extra[k]
        else:
            r["peak_bytes"] = st["param_bytes"] + st["grad_bytes"] + st["optim_bytes"] + r["saved_activation_bytes"]
    ratios = [b / a for a, b in zip(times["dsmoe"], times["torchtitan"])]  # per round: torchtitan / dsmoe time
    speedup = statistics.median(ratios)
    mem_ratio = rows["dsmoe"]["peak_bytes"] / rows["torchtitan"]["peak_bytes"]
    goal = GOAL_SPEEDUP[device.type]
    goals = [{"goal": f"dsmoe tokens/s >= {goal}x torchtitan on {device.type}", "value": round(speedup, 3),
              "target": goal, "met": speedup >= goal},
             {"goal": f"dsmoe peak memory <= {GOAL_MEMORY}x torchtitan", "value": round(mem_ratio, 3),
              "target": GOAL_MEMORY, "met": mem_ratio <= GOAL_MEMORY},
             {"goal": "same function: logits RMS and loss within the limits", "value": check["logits_rms_rel_diff"],
              "target": CHECK_LIMITS["logits_rms_rel"], "met": check["agree"]}]
    mib = 2 ** 20
    print_table(f"Training step, dsmoe vs torchtitan DeepSeekV3Model: {args.shape} ({args.preset} preset, "
                f"d {cfg.model.d_model}, {cfg.model.n_layers} layers, {cfg.moe.n_routed_experts} experts top-{cfg.moe.top_k}, "
                f"{n_params / 1e6:.1f}M params), batch {args.batch} x seq {args.seq}, {args.dtype}, {device_name(device)} "
                f"(warmup {args.warmup}, {args.iters} interleaved rounds)",
                ["impl", "ms / step (median)", "min ms", "tokens/s", "saved act MiB", "peak MiB"],
                [[k, f"{rows[k]['median_ms']:.1f}", f"{rows[k]['min_ms']:.1f}", f"{rows[k]['tokens_per_s']:,.0f}",
                  f"{rows[k]['saved_activation_bytes'] / mib:,.1f}", f"{rows[k]['peak_bytes'] / mib:,.1f}"]
                 for k in NAMES] + [["dsmoe speedup (median of round ratios)", "", "", f"{speedup:.3f}x", "",
                                     f"{mem_ratio:.3f}"]],
                caption=f"same weights: logits differ by {check['logits_rms_rel_diff']:.1e} (RMS) and "
                        f"{check['logits_rel_diff']:.1e} (max) of theirs, loss by {check['loss_abs_diff']:.1e}")
    for g in goals:
        print(f"  {g['goal']:<44} {g['value']:>7.3f}  {'met' if g['met'] else 'NOT met'}")
    from importlib.metadata import version

    return {"device_type": device.type, "torchtitan": version("torchtitan"), "shape": args.shape, "preset": args.preset,
            "overrides": args.extra, "d_model": cfg.model.d_model, "n_routed_experts": cfg.moe.n_routed_experts,
            "top_k": cfg.moe.top_k, "expert_hidden": cfg.moe.expert_hidden,
            "layers": cfg.model.n_layers, "n_params": n_params, "vocab_size": vocab, "seq_len": args.seq,
            "micro_batch": args.batch, "tokens_per_step": tokens, "dtype": args.dtype, "warmup": args.warmup,
            "iters": args.iters, "quick": args.quick, "attention": "SDPA causal in both (torchtitan's slot filled)",
            "threads": torch.get_num_threads() if device.type == "cpu" else None, "function_check": check,
            "rows": list(rows.values()), "round_ratios": ratios, "speedup_tokens_per_s": speedup,
            "peak_memory_ratio": mem_ratio, "goals": goals, "all_goals_met": all(g["met"] for g in goals)}


def main(argv=None) -> int:
    args = parse_args(argv)
    if not available():
        print(INSTALL_HINT)
        return 0
    payload = run(args)
    if not args.no_save:
        path = write_results("peer_torchtitan-quick" if args.quick else "peer_torchtitan", payload, device=args.device,
                             timestamped=True)
        print(f"wrote {path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
