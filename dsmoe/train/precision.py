"""Compute precision by hardware: bf16 on sm_80+, fp16 + GradScaler on T4-class GPUs, fp32 on CPU."""
from __future__ import annotations

import contextlib

import torch

from dsmoe.config import ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(requested: str, device: torch.device) -> str:
    if device.type != "cuda":
        return "fp32" if requested == "auto" else requested
    major, minor = torch.cuda.get_device_capability(device)
    if requested == "auto":
        # decide on compute capability: T4 reports is_bf16_supported() but emulates bf16 ~17x slower
        return "bf16" if major >= 8 else "fp16"
    if requested == "bf16" and major < 8:
        raise ConfigError(f"train.precision=bf16 on a sm_{major}{minor} GPU ({torch.cuda.get_device_name(device)}) "
                          f"runs emulated bf16 matmuls ~17x slower: use train.precision=fp16 (or auto)")
    if requested == "fp32" and major >= 8:
        # fp32 matmuls on TF32 tensor cores (10-bit mantissa inputs, fp32 accumulate): ~8x the plain fp32
        # rate; MFU then rates against the TF32 peak (dsmoe.metrics.throughput)
        torch.backends.cuda.matmul.fp32_precision = "tf32"
    return requested


def autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")
