"""Throughput instruments: the step's time split by phase, and MFU against a peak table or, on the CPU,
against this machine's measured matmul peak."""
from __future__ import annotations

import time
from contextlib import contextmanager
from functools import lru_cache
from typing import Optional

import torch

# Dense peak TFLOP/s (no 2:4 sparsity) per GPU and precision, from the vendors' datasheets. "tf32" is fp32
# matmuls on tensor cores (what fp32 training runs when TF32 is on); "fp32" is the CUDA-core fp32 rate (TF32
# off). Keys are matched as substrings of the device name, in this order: the more specific name first.
PEAK_TFLOPS = {
    "H200 NVL": {"bf16": 835.5, "fp16": 835.5, "fp8": 1670.5, "tf32": 417.5, "fp32": 60.0},
    "GH200": {"bf16": 989.4, "fp16": 989.4, "fp8": 1978.9, "tf32": 494.7, "fp32": 66.9},
    "H200": {"bf16": 989.4, "fp16": 989.4, "fp8": 1978.9, "tf32": 494.7, "fp32": 66.9},
    "H100 NVL": {"bf16": 835.5, "fp16": 835.5, "fp8": 1670.5, "tf32": 417.5, "fp32": 60.0},
    "H100 PCIe": {"bf16": 756.5, "fp16": 756.5, "fp8": 1513.0, "tf32": 378.0, "fp32": 51.2},
    "H100 SXM": {"bf16": 989.4, "fp16": 989.4, "fp8": 1978.9, "tf32": 494.7, "fp32": 66.9},
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "L40S": {"bf16": 362.0, "fp16": 362.0, "fp8": 733.0, "tf32": 183.0, "fp32": 91.6},
    "L4": {"bf16": 121.0, "fp16": 121.0, "fp8": 242.5, "tf32": 60.0, "fp32": 30.3},
    "A10G": {"bf16": 70.0, "fp16": 70.0, "tf32": 35.0, "fp32": 31.2},
    "RTX 4090": {"bf16": 165.2, "fp16": 165.2, "fp8": 330.3, "tf32": 82.6, "fp32": 82.6},
    "RTX 4060": {"bf16": 30.0, "fp16": 30.0, "tf32": 15.1, "fp32": 15.1},
    "V100": {"fp16": 125.0, "fp32": 15.7},
    "T4": {"fp16": 65.0, "fp32": 8.1},
}
H100_PCIE_SMS = 114  # the SXM and NVL parts have 132
H100_NVL_MIN_GIB = 90  # NVL: 94 GB of HBM3; SXM: 80 GB


def gpu_key(device_name: str, sm_count: Optional[int] = None, mem_gib: Optional[float] = None) -> Optional[str]:
    """The PEAK_TFLOPS row of a GPU, or None if it is not in the table.

    An H100 whose name does not say PCIe or NVL (drivers report the SXM part as "NVIDIA H100 80GB HBM3",
    some clouds as "NVIDIA H100") is told apart by its SM count (PCIe: 114) and memory (NVL: 94 GB)."""
    name = device_name.lower()
    if "h100" in name and "nvl" not in name and "pcie" not in name:
        if sm_count == H100_PCIE_SMS:
            return "H100 PCIe"
        return "H100 NVL" if mem_gib is not None and mem_gib >= H100_NVL_MIN_GIB else "H100 SXM"
    return next((key for key in PEAK_TFLOPS if key.lower() in name), None)


def tf32_enabled() -> bool:
    """Whether fp32 matmuls on CUDA may use TF32 tensor cores (torch's global setting, which
    dsmoe.train.precision sets with the same API)."""
    return torch.get_float32_matmul_precision() != "highest"


def peak_tflops(device_name: str, precision: str, override: Optional[float] = None) -> Optional[float]:
    """The table's dense peak TFLOP/s for this GPU and precision (bf16, fp16, fp8 or fp32); None on the CPU
    or an unknown GPU (set log.peak_tflops, or measure it: `measure_peak_tflops`).

    fp32 is rated at the TF32 tensor-core peak when TF32 is enabled (`tf32_enabled()`), else at the CUDA-core
    fp32 peak, so an fp32 run without TF32 is not reported at a tenth of its real utilisation. A name that
    leaves the H100 variant open is resolved with the visible CUDA device's SM count and memory."""
    if override:
        return override
    sm_count = mem_gib = None
    if torch.cuda.is_available() and torch.cuda.get_device_name() == device_name:
        props = torch.cuda.get_device_properties(0)
        sm_count, mem_gib = props.multi_processor_count, props.total_memory / 2**30
    key = gpu_key(device_name, sm_count, mem_gib)
    if key is None:
        return None
    peaks = PEAK_TFLOPS[key]
    if precision == "fp32" and tf32_enabled():
        return peaks.get("tf32", peaks.get("fp32"))
    return peaks.get(precision)


def device_label(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def mfu(tokens_per_s: float, flops_per_token: float, peak: Optional[float], n_devices: int = 1) -> Optional[float]:
    """Model FLOPs utilisation: achieved training FLOP/s over the devices' peak (None without a peak)."""
    if not peak:
        return None
    return tokens_per_s * flops_per_token / (peak * 1e12 * n_devices)


def _time_mm(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.device.type == "cuda":
        torch.cuda.synchronize(a.device)
    t0 = time.perf_counter()
    torch.mm(a, b)
    if a.device.type == "cuda":
        torch.cuda.synchronize(a.device)
    return time.perf_counter() - t0


def measure_peak_tflops(dtype: torch.dtype = torch.float32, device: str = "cpu", threads: Optional[int] = None,
                        max_n: int = 2048, budget_s: float = 1.0) -> float:
    """This machine's matmul peak in TFLOP/s: the fastest [n, n] @ [n, n] product (2 n^3 FLOPs) in `dtype`
    with `threads` torch threads on the CPU (default: the current setting). A ceiling for a CPU MFU: the
    step's achieved FLOP/s over this, at the same dtype and thread count.

    n is chosen from a 256 probe so one product takes about 50 ms (at most `max_n`; CPUs without native
    bf16 multiply it hundreds of times slower than fp32), then products are timed for `budget_s` seconds
    (at least 3, at most 20). With more than one thread, one thread is timed too and the faster counts: on
    an oversubscribed host more threads can be slower, and a peak below what the step achieves is no peak.
    Cached per arguments. Raises ValueError for a dtype torch cannot multiply on that device."""
    if max_n < 256 or budget_s <= 0:
        raise ValueError(f"max_n must be >= 256 and budget_s > 0, got max_n={max_n}, budget_s={budget_s}")
    threads = threads or torch.get_num_threads()
    one = _measured_peak(dtype, device, 1, max_n, budget_s) if device == "cpu" and threads > 1 else 0.0
    return max(one, _measured_peak(dtype, device, threads, max_n, budget_s))


@lru_cache(maxsize=None)
def _measured_peak(dtype: torch.dtype, device: str, threads: int, max_n: int, budget_s: float) -> float:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(0)

        def pair(n):
            return [torch.randn(n, n, generator=gen).to(device=device, dtype=dtype) for _ in range(2)]

        probe = pair(256)
        try:
            torch.mm(*probe)  # warm-up (kernel selection, first-touch pages)
        except RuntimeError as e:
            raise ValueError(f"cannot time {dtype} matmuls on {device}: {e}") from e
        rate = 2 * 256 ** 3 / _time_mm(*probe)
        n = int(min(max_n, max(256, (rate * 0.05 / 2) ** (1 / 3))) // 64 * 64)
        a, b = pair(n) if n != 256 else probe
        times = [_time_mm(a, b)]
        deadline = time.perf_counter() + budget_s
        while len(times) < 3 or (len(times) < 20 and time.perf_counter() < deadline):
            times.append(_time_mm(a, b))
        return 2 * n ** 3 / min(times[1:]) / 1e12
    finally:
        torch.set_num_threads(before)


class StepTimer:
    """Milliseconds per phase (data, forward, backward, optimizer, ...), summed until `take()`.

    CUDA events on a GPU (no sync until `take`), wall clock on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.pending: list[tuple[str, object, object]] = []
        self.totals: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.pending.append((name, start, end))
        else:
            t0 = time.perf_counter()
            yield
            self.add(name, (time.perf_counter() - t0) * 1e3)

    def add(self, name: str, ms: float) -> None:
        self.totals[name] = self.totals.get(name, 0.0) + ms

    def take(self) -> dict[str, float]:
        """The totals since the last take (syncs the GPU once)."""
        if self.pending:
            torch.cuda.synchronize()
            for name, start, end in self.pending:
                self.add(name, start.elapsed_time(end))
            self.pending.clear()
        out, self.totals = self.totals, {}
        return out
