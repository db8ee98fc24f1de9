"""On a CUDA GPU: bf16 and fp16 + GradScaler training against fp32, grouped vs loop experts per dtype, compiled vs
eager, fp32 + TF32 compiled, cached GQA decoding, pinned async-save buffers, the trainer's CUDA memory counters,
activation checkpointing. Marked `cuda` and skipped without a GPU;
`pytest -m cuda` (part of `make bench-gpu`) runs them there.

The fp32 references run with TF32 off (IEEE fp32 matmuls: `train.tf32=false`, and "highest" around every
test), so the tolerances below measure bf16 / fp16 alone.
"""
import dataclasses
import math

import pytest
import torch

from conftest import host_copies_of_two_async_saves, rel_err, small_config
from dsmoe.config import TrainConfig, load_config
from dsmoe.train.trainer import Trainer

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CUDA = "--train.device=cuda"
IEEE = "--train.tf32=false"  # the trainer would otherwise turn TF32 on for fp32 on sm_80+
# Over 6 steps of the small model (2 x 4 x 32 tokens per step, AdamW): the largest relative loss difference
# of any step, and the relative L2 distance of the final parameters, from the fp32 run.
MIXED_TOL = {"bf16": {"loss": 5e-3, "params": 3e-2}, "fp16": {"loss": 2e-3, "params": 1e-2}}
# grouped_mm vs the per-expert loop on one MoE layer: outputs and gradients, relative to their largest entry
GROUPED_TOL = {"fp32": 1e-5, "bf16": 2e-2, "fp16": 2e-3}
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.fixture(autouse=True)
def _ieee_fp32():
    """fp32 references without TF32; restored afterwards."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(before)


def fit(tmp_path, data_cache, name, *overrides):
    """Train the small model on the GPU; (per-step losses, final fp32 state on the CPU, logged rows, trainer)."""
    t = Trainer(small_config(tmp_path / name, data_cache, CUDA, IEEE, *overrides))
    rows = [r for r in t.fit()["history"] if "loss" in r]
    state = {k: v.detach().float().cpu() for k, v in t.model.state_dict().items()}
    return [r["loss"] for r in rows], state, rows, t


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_step_tracks_fp32(tmp_path, data_cache, precision):
    ref_losses, ref_state, _, _ = fit(tmp_path, data_cache, "fp32", "--train.precision=fp32")
    losses, state, rows, t = fit(tmp_path, data_cache, precision, f"--train.precision={precision}")
    assert t.precision == precision and len(losses) == len(ref_losses) == 6
    assert rows[-1].get("skipped_overflow", 0) == 0  # GradScaler found no overflow: every step was taken
    worst = max(abs(a - b) / b for a, b in zip(losses, ref_losses))
    assert worst <= MIXED_TOL[precision]["loss"], (losses, ref_losses)
    assert rel_err(state, ref_state) <= MIXED_TOL[precision]["params"]
    assert losses[-1] < losses[0]


class _OpLog(torch.utils._python_dispatch.TorchDispatchMode):
    """Names of the aten ops that ran."""

    def __init__(self):
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_grouped_experts_match_loop_per_dtype(dtype):
    from dsmoe.model.moe import MoE

    def layer(impl):
        cfg = load_config(None, {"model": {"d_model": 128}, "moe": {"expert_hidden": 256, "n_routed_experts": 8,
                                                                    "top_k": 2, "expert_impl": impl}})
        torch.manual_seed(0)
        moe = MoE(cfg)
        for p in moe.parameters():
            torch.nn.init.normal_(p, 0.0, 0.02)
        return moe.cuda()

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 256, 128, generator=gen).cuda()
    g = torch.randn(2, 256, 128, generator=gen).cuda()
    results = {}
    for impl in ("loop", "grouped"):
        moe, xi = layer(impl), x.clone().requires_grad_(True)
        log = _OpLog()
        with log, torch.autocast("cuda", dtype=DTYPES[dtype], enabled=DTYPES[dtype] is not None):
            y = moe(xi)[0]
        (y.float() * g).sum().backward()
        results[impl] = [y.float(), xi.grad, moe.experts.w_gate.grad, moe.experts.w_down.grad, moe.router.weight.grad]
        results[impl + "_ops"] = log.ops
    # torch's grouped GEMM ran (aten's, or dsmoe's op around it), and only for the grouped impl
    assert any("grouped_mm" in op for op in results["grouped_ops"])
    assert not any("grouped_mm" in op for op in results["loop_ops"])
    for a, b in zip(results["grouped"], results["loop"]):
        assert (a - b).abs().max() <= GROUPED_TOL[dtype] * b.abs().max()


def test_compiled_matches_eager(tmp_path, data_cache):
    if "compile" not in {f.name for f in dataclasses.fields(TrainConfig)}:
        pytest.skip("this config has no train.compile")
    eager, _, _, _ = fit(tmp_path, data_cache, "eager", "--train.precision=fp32")
    compiled, _, _, _ = fit(tmp_path, data_cache, "compiled", "--train.precision=fp32", "--train.compile=true")
    assert max(abs(a - b) / b for a, b in zip(compiled, eager)) <= 1e-4, (compiled, eager)


def test_memory_counters_in_the_log(tmp_path, data_cache):
    torch.cuda.reset_peak_memory_stats()
    _, _, rows, t = fit(tmp_path, data_cache, "mem", "--train.precision=bf16", "--train.steps=2")
    n_params = sum(p.numel() for p in t.model.parameters())
    last = rows[-1]
    # after an AdamW step the peak holds fp32 parameters, gradients and both moments: 16 bytes per parameter
    assert 16 * n_params <= last["mem_gb"] * 2**30 <= last["mem_reserved_gb"] * 2**30
    assert last["alloc_retries"] == 0 and last["ooms"] == 0
    assert last["mfu"] is None or 0 < last["mfu"] < 1


@pytest.mark.parametrize("policy", ["full", "selective"])
def test_activation_checkpointing_on_cuda(tmp_path, data_cache, policy):
    from dsmoe.metrics.memory import measure_saved_activation_bytes
    from dsmoe.parallel.wrap import block_fn_for

    base, _, _, t = fit(tmp_path, data_cache, "none", "--train.precision=fp32")
    ckpt, _, _, tc = fit(tmp_path, data_cache, policy, "--train.precision=fp32",
                         f"--parallel.activation_checkpointing={policy}")
    # recomputation replays the same kernels; atomic adds in CUDA kernels (index_add_) leave last-bit differences
    assert max(abs(a - b) / b for a, b in zip(ckpt, base)) <= 1e-4, (ckpt, base)
    idx = torch.randint(0, t.model.vocab_size, (4, 32), device="cuda")
    kept_none = measure_saved_activation_bytes(t.model, idx)
    kept = measure_saved_activation_bytes(tc.model, idx, block_fn_for(tc.cfg.parallel))
    assert kept < kept_none


def test_fp32_with_tf32_compiles_and_trains(tmp_path, data_cache):
    """TF32 set through set_float32_matmul_precision: inductor reads the legacy flags it keeps consistent."""
    t = Trainer(small_config(tmp_path / "tf32", data_cache, CUDA, "--train.precision=fp32", "--train.tf32=true",
                             "--train.compile=true", "--train.steps=3"))
    assert torch.get_float32_matmul_precision() == "high" and torch.backends.cuda.matmul.allow_tf32
    losses = [r["loss"] for r in t.fit()["history"] if "loss" in r]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gqa_cached_decoding_matches_the_full_forward_on_cuda(dtype):
    """Cached GQA attention hands SDPA contiguous k/v beside a boolean mask (pytorch#112577's case)."""
    from dsmoe.infer.cache import KVCache
    from dsmoe.infer.forward import dropless, forward_cached
    from dsmoe.model import Transformer

    cfg = load_config(None, {"attention": {"kind": "gqa", "n_kv_heads": 2}, "model": {"init_std": 0.1}})
    torch.manual_seed(0)
    model = Transformer(cfg, 320).cuda().eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (2, 24), generator=gen).cuda()
    cache = KVCache.allocate(cfg, 2, 32, dtype, torch.device("cuda"))
    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        cached = torch.cat([forward_cached(model, ids[:, :16], cache)] +
                           [forward_cached(model, ids[:, i:i + 1], cache) for i in range(16, 24)], 1)
        with torch.no_grad(), dropless(model):
            full = model(ids).logits
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert (cached.float() - full.float()).abs().max() <= tol * full.float().abs().max()


def test_async_saves_reuse_one_pinned_host_copy(tmp_path, data_cache):
    """The second save copies into the first one's pinned host buffers: no re-pinning per save."""
    t = Trainer(small_config(tmp_path / "async", data_cache, CUDA, "--train.steps=1", "--checkpoint.async_save=true"))
    t.fit()
    buffers = host_copies_of_two_async_saves(t)
    assert buffers[0] and buffers[1].keys() == buffers[0].keys()
    assert t.checkpoints.stager._state_dict_stager.pin_memory  # pinned on CUDA
