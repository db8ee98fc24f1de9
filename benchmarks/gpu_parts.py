"""The parts of `make bench-gpu`: what benchmarks/gpu_suite.py runs, one process per part (`--part NAME`).

Each part function returns a JSON-able dict, written by the caller as soon as the part is done; each
training mode is a part of its own. Shapes: on a GPU the `smollm2-moe-576x30` preset at seq 2048 x micro-batch
8 in bf16 (45 GiB by `python -m dsmoe.estimate`, so it fits an 80 GB H100); with `--cpu` the tiny preset
cut to d 64 x 3 layers at 4 x 32 tokens, bf16 as on the GPU (torch's grouped_mm compiles only in bf16), so the
whole suite runs in about a minute on two cores.

Training modes (each a real `dsmoe.train.trainer.Trainer` run through `fit()`, so tokens/s, MFU and memory
are the trainer's own logged figures; the first log interval holds the warm-up and is left out):

- eager: bf16 autocast. Its peak CUDA memory is compared with
  `dsmoe.tools.memory.estimate_memory`, and the activation bytes one forward keeps (measured by
  `measure_saved_activation_bytes`) with the estimator's activation term.
- fp16: fp16 autocast + GradScaler, what a T4 runs (overflow-skipped steps are counted).
- fp8: `train.fp8`, torchao float8 training of the dense nn.Linear layers (cast per tensor); skipped
  without torchao or below compute capability 8.9.
- compiled: one `torch.compile` per transformer block (`train.compile`); on the CPU
  `dsmoe.parallel.wrap.compile_blocks` with the "eager" backend: dynamo's graph capture without
  inductor's minutes of C++ builds.
"""
from __future__ import annotations

import gc
import importlib.util
import json
import math
import platform
import re
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.common import device_name  # noqa: E402
from dsmoe.config import CONFIG_ROOT, load_config  # noqa: E402
from dsmoe.train.precision import FP8_MIN_CAPABILITY  # noqa: E402

MODES = ("eager", "fp16", "fp8", "compiled")
SHAPES = {
    "gpu": {"config": "smollm2-moe-576x30", "overrides": {}, "seq_len": 2048, "micro_batch": 8,
            "steps": 25, "log_every": 5, "precision": "bf16"},
    "cpu": {"config": "tiny", "seq_len": 32, "micro_batch": 4, "steps": 4, "log_every": 2, "precision": "bf16",
            "overrides": {"model": {"d_model": 64, "n_layers": 3, "n_heads": 2, "ffn_hidden": 128},
                          "moe": {"expert_hidden": 32, "n_routed_experts": 4},
                          "attention": {"kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8,
                                        "v_head_dim": 16}}},
}
GiB = 2 ** 30


def train_config(cpu: bool, precision: str, run_dir: Path, train_extra: Optional[dict] = None):
    """The config a training mode runs: the shape above, no evaluation, samples or checkpoints."""
    shape = SHAPES["cpu" if cpu else "gpu"]
    over = {section: dict(fields) for section, fields in shape["overrides"].items()}
    over["train"] = {"device": "cpu" if cpu else "cuda", "precision": precision, "seq_len": shape["seq_len"],
                     "micro_batch": shape["micro_batch"], "grad_accum": 1, "steps": shape["steps"],
                     "warmup_steps": 2, "log_every": shape["log_every"], "eval_every": 0, "sample_every": 0,
                     **(train_extra or {})}
    over["model"] = {**over.get("model", {}), "max_seq_len": shape["seq_len"]}
    over["data"] = {"source": "shakespeare", "tokenizer": "byte", "cache_dir": str(REPO_ROOT / "runs" / "data-cache")}
    over["checkpoint"] = {"every": 0, "save_final": False}
    over["log"] = {"rich": "off"}
    over["run"] = {"dir": str(run_dir)}
    return load_config(CONFIG_ROOT / "models" / f"{shape['config']}.yaml", over)


def run_training(cfg, prepare: Optional[Callable] = None) -> dict:
    """Build a Trainer, let `prepare(trainer)` change it (returns a note), fit, summarise the logged rows."""
    from dsmoe.train.trainer import Trainer

    cuda = cfg.train.device.startswith("cuda")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    trainer = Trainer(cfg)
    note = prepare(trainer) if prepare else None
    build_s = time.perf_counter() - t0
    rows = [r for r in trainer.fit()["history"] if "tokens_per_s" in r]
    if not rows:
        raise RuntimeError("the training run logged no rows")
    timed = rows[1:] or rows  # the first interval holds the warm-up: allocator, kernel choice, compilation
    out = {"status": "ok", "precision": trainer.precision, "note": note, "steps": cfg.train.steps,
           "log_every": cfg.train.log_every, "timed_intervals": len(timed),
           "tokens_per_step": cfg.train.micro_batch * cfg.train.seq_len,
           "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
           "step_ms": statistics.median(r["step_time_s"] for r in timed) * 1e3,
           "first_interval_s": rows[0]["step_time_s"] * cfg.train.log_every,
           "flops_per_token": trainer.flops_per_token, "peak_tflops": trainer.peak_tflops,
           "losses": [r["loss"] for r in rows], "final_loss": rows[-1]["loss"],
           "loss_finite": all(math.isfinite(r["loss"]) for r in rows),
           "skipped_overflow": rows[-1].get("skipped_overflow", 0), "build_s": round(build_s, 2),
           "wall_s": round(time.perf_counter() - t0, 2)}
    out["achieved_tflops"] = out["tokens_per_s"] * out["flops_per_token"] / 1e12
    mfus = [r["mfu"] for r in timed if r.get("mfu") is not None]
    out["mfu"] = statistics.median(mfus) if mfus else None
    if cuda:
        out.update(mem_gb=max(r["mem_gb"] for r in rows), mem_reserved_gb=max(r["mem_reserved_gb"] for r in rows),
                   alloc_retries=rows[-1]["alloc_retries"], ooms=rows[-1]["ooms"])
    else:  # a CPU MFU: the step's FLOP/s over this machine's matmul peak at the same dtype and threads
        from dsmoe.metrics.throughput import measure_peak_tflops
        from dsmoe.train.precision import DTYPES

        peak = measure_peak_tflops(DTYPES[trainer.precision], threads=torch.get_num_threads(), budget_s=0.25)
        out.update(cpu_peak_tflops=peak, mfu=out["achieved_tflops"] / peak)
    out["trainer"] = trainer
    return out


def memory_vs_estimate(cfg, trainer, result: dict) -> dict:
    """Measured peak memory (CUDA) and saved-activation bytes against dsmoe.tools.memory.estimate_memory."""
    from dsmoe.metrics.memory import measure_saved_activation_bytes
    from dsmoe.tools.memory import estimate_memory
    from dsmoe.train.precision import autocast

    device = "cuda" if cfg.train.device.startswith("cuda") else "cpu"
    est = estimate_memory(cfg, world=1, ep=1, device=device)
    model = trainer.model
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, model.vocab_size, (cfg.train.micro_batch, cfg.train.seq_len), generator=gen)
    idx = idx.to(trainer.device)
    with autocast(trainer.precision, trainer.device):
        saved = measure_saved_activation_bytes(model, (idx, idx))
    out = {"status": "ok", "policy": est["policy"], "estimate_total_gib": est["total"] / GiB,
           "estimate_activations_gib": est["activations"] / GiB, "measured_activations_gib": saved / GiB,
           "activations_ratio": saved / est["activations"]}
    if device == "cuda":
        out.update(measured_peak_gib=result["mem_gb"], peak_ratio=result["mem_gb"] * GiB / est["total"])
    return out


def _compile_eager(trainer) -> str:
    """On the CPU: regional compilation with the "eager" backend (dynamo's capture without inductor's C++ builds)."""
    from dsmoe.parallel.wrap import compile_blocks

    compile_blocks(trainer.model, backend="eager")
    return "dsmoe.parallel.wrap.compile_blocks(backend='eager')"


def fp8_unavailable(cpu: bool) -> Optional[str]:
    if importlib.util.find_spec("torchao") is None:
        return "torchao not installed"
    if cpu or not torch.cuda.is_available():
        return "FP8 training needs a CUDA GPU"
    cap = torch.cuda.get_device_capability()
    if cap < FP8_MIN_CAPABILITY:
        return f"FP8 needs compute capability 8.9+, this GPU is sm_{cap[0]}{cap[1]}"
    return None


def train_mode(mode: str, cpu: bool, work: Path) -> dict:
    """One training mode (MODES): its summary, plus the memory comparison after the eager run."""
    shape = SHAPES["cpu" if cpu else "gpu"]
    precision, extra, prepare = shape["precision"], {}, None
    if mode == "fp16":
        precision = "fp16"
    elif mode == "fp8":
        why = fp8_unavailable(cpu)
        if why:
            return {"fp8": {"status": "skipped", "reason": why}}
        extra = {"fp8": True}
    elif mode == "compiled":
        if cpu:
            prepare = _compile_eager
        else:
            extra = {"compile": True}
    run_dir = work / f"run-{mode}"
    cfg = train_config(cpu, precision, run_dir, extra)
    if mode == "compiled":
        torch._dynamo.reset()
    result = run_training(cfg, prepare)
    if extra:
        result["note"] = ", ".join(f"train.{k}={v}" for k, v in extra.items())
    if mode == "compiled":
        from torch._dynamo.utils import counters

        result["graph_breaks"] = sum(counters["graph_break"].values())
        result["unique_graphs"] = counters["stats"]["unique_graphs"]
    trainer = result.pop("trainer")
    out = {mode: result}
    if mode == "eager":
        out["memory"] = memory_vs_estimate(cfg, trainer, result)
    del trainer
    gc.collect()
    if not cpu:
        torch.cuda.empty_cache()
    shutil.rmtree(run_dir, ignore_errors=True)
    return out


# ------------------------------------------------------------------------------------------ other parts


def env(cpu: bool) -> dict:
    """The machine, the software, and the peak the MFU figures are taken against."""
    from dsmoe.metrics.throughput import gpu_key, peak_tflops, tf32_enabled

    out = {"status": "ok", "device": device_name("cpu" if cpu else "cuda"), "torch": torch.__version__,
           "python": platform.python_version(), "cuda_available": torch.cuda.is_available(),
           "tf32": tf32_enabled()}
    for pkg in ("torchao", "torchtitan", "transformers", "triton"):
        found = importlib.util.find_spec(pkg) is not None
        out[pkg] = _version(pkg) if found else None
    if not cpu:
        props = torch.cuda.get_device_properties(0)
        name = torch.cuda.get_device_name(0)
        out.update(gpu=name, capability="sm_%d%d" % torch.cuda.get_device_capability(0), cuda=torch.version.cuda,
                   sm_count=props.multi_processor_count, memory_gib=props.total_memory / GiB,
                   peak_row=gpu_key(name, props.multi_processor_count, props.total_memory / GiB),
                   peak_bf16_tflops=peak_tflops(name, "bf16"), peak_fp8_tflops=peak_tflops(name, "fp8"))
    return out


def _version(pkg: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg)
    except PackageNotFoundError:
        return "unknown"


def moe_layer(cpu: bool) -> dict:
    """One MoE layer vs the dense FFN of equal active FLOPs, grouped GEMM vs the per-expert loop
    (benchmarks/moe_dispatch.py, both of its shapes on a GPU)."""
    from benchmarks import moe_dispatch

    argv = (["--device", "cpu", "--dtype", "fp32", "--tokens", "64", "--iters", "1", "--warmup", "0",
             "--shapes", "smollm2-moe-576x30"] if cpu else
            ["--device", "cuda", "--dtype", "bf16", "--tokens", "16384", "--iters", "20", "--warmup", "3"])
    return {"status": "ok", **moe_dispatch.run_single(moe_dispatch.parse_args(argv + ["--no-save"]))}


def cuda_tests_command(work: Path) -> list[str]:
    """`pytest -m cuda -v` over the test files that mark tests `cuda` (not the whole suite: collecting it would
    import packages the GPU machine lacks): one line per test as it ends, which `CudaTestLog` reads. Without a
    GPU every one skips."""
    files = sorted(str(f.relative_to(REPO_ROOT)) for f in (REPO_ROOT / "tests").glob("test_*.py")
                   if "mark.cuda" in f.read_text())
    return [sys.executable, "-m", "pytest", "-m", "cuda", *files, "-v", "-p", "no:cacheprovider"]


# `pytest -v`'s line for a test as it ends: "tests/test_cuda.py::test_x[bf16] PASSED    [ 20%]"
TEST_LINE = re.compile(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
OUTCOMES = {"PASSED": "passed", "XPASS": "passed", "FAILED": "failed", "ERROR": "failed", "SKIPPED": "skipped",
            "XFAIL": "skipped"}


class CudaTestLog:
    """The CUDA tests' outcomes as pytest's lines arrive, rewritten to `path` after each test, so a run
    killed at its cap keeps every test that finished (and names the one that was running)."""

    def __init__(self, path: Path):
        self.path = path
        self.outcomes: dict[str, str] = {}  # test id -> passed / failed / skipped (a teardown error: failed)
        self.running: Optional[str] = None
        self.write("running")

    def line(self, text: str) -> bool:
        """Reads one line of pytest's output; True when it ended a test."""
        m = TEST_LINE.match(text)
        if m:
            self.outcomes[m.group(1)] = "failed" if self.outcomes.get(m.group(1)) == "failed" else OUTCOMES[m.group(2)]
            self.running = None
            self.write("running")
        elif "::" in text and not text.endswith("\n"):  # the last, unfinished line: a test that was cut off
            self.running = text.split()[0]
        return m is not None

    def finish(self, returncode, output: str) -> dict:
        """The final record: ok when pytest exited 0 (or 5, nothing collected) with no failure."""
        failed = any(v == "failed" for v in self.outcomes.values())
        status = "timeout" if returncode == "timeout" else "ok" if returncode in (0, 5) and not failed else "failed"
        return self.write(status, returncode, output[-1500:])

    def write(self, status: str, returncode=None, output_tail: str = "") -> dict:
        counts = {k: sum(v == k for v in self.outcomes.values()) for k in ("passed", "failed", "skipped")}
        result = {"status": status, "returncode": returncode, **counts, "tests": self.outcomes,
                  "failures": [k for k, v in self.outcomes.items() if v == "failed"], "cut_off": self.running,
                  "output_tail": output_tail}
        self.path.write_text(json.dumps(result, indent=2) + "\n")
        self.result = result
        return result


def peer(cpu: bool) -> dict:
    """dsmoe vs torchtitan's DeepSeek-V3 (benchmarks/peer_torchtitan.py), skipped without torchtitan."""
    from benchmarks import peer_torchtitan

    if not peer_torchtitan.available():
        return {"status": "skipped", "reason": "torchtitan not installed"}
    argv = (["--quick", "--device", "cpu", "--layers", "2", "--seq", "16", "--batch", "2", "--iters", "1",
             "--warmup", "0"] if cpu else ["--device", "cuda"])
    return {"status": "ok", **peer_torchtitan.run(peer_torchtitan.parse_args(argv + ["--no-save"]))}
