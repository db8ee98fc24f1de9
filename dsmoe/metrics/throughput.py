"""Throughput instruments: the step's time split by phase, and MFU against a peak table."""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Optional

import torch

# dense tensor-core peak in TFLOP/s (no sparsity), by a substring of the device name and precision;
# fp32 means TF32 tensor cores where the GPU has them
PEAK_TFLOPS = {
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 494.5},
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 494.5},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0},
    "L40S": {"bf16": 362.0, "fp16": 362.0, "fp32": 183.0},
    "L4": {"bf16": 121.0, "fp16": 121.0, "fp32": 60.0},
    "A10G": {"bf16": 70.0, "fp16": 70.0, "fp32": 35.0},
    "RTX 4090": {"bf16": 165.2, "fp16": 165.2, "fp32": 82.6},
    "RTX 4060": {"bf16": 30.0, "fp16": 30.0, "fp32": 15.1},
    "V100": {"fp16": 125.0, "fp32": 15.7},
    "T4": {"fp16": 65.0, "fp32": 8.1},
}


def peak_tflops(device_name: str, precision: str, override: Optional[float] = None) -> Optional[float]:
    """The table's peak for this GPU and precision; None on CPU or an unknown GPU (set log.peak_tflops)."""
    if override:
        return override
    for key, peaks in PEAK_TFLOPS.items():  # longer names first where they share a prefix (H200 / H100)
        if key.lower() in device_name.lower():
            return peaks.get(precision)
    return None


def device_label(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def mfu(tokens_per_s: float, flops_per_token: float, peak: Optional[float], n_devices: int = 1) -> Optional[float]:
    """Model FLOPs utilisation: achieved training FLOP/s over the devices' peak (None without a peak)."""
    if not peak:
        return None
    return tokens_per_s * flops_per_token / (peak * 1e12 * n_devices)


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
