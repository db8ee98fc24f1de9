"""Compute precision by hardware: bf16 on sm_80+, fp16 + GradScaler on T4-class GPUs, fp32 on CPU."""
from __future__ import annotations

import contextlib

import torch

from dsmoe.config import ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(requested: str, device: torch.device, tf32: bool = True) -> str:
    """The precision `requested` (train.precision) resolves to on `device`; sets fp32's matmul precision
    on sm_80+ (TF32 unless `tf32` is False). Raises ConfigError for bf16 below sm_80."""
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
        # rate; MFU then rates against the TF32 peak (dsmoe.metrics.throughput). One API only: this one
        # keeps the legacy flags (which inductor reads) and the per-backend fp32_precision consistent;
        # setting fp32_precision alone makes get_float32_matmul_precision() raise
        torch.set_float32_matmul_precision("high" if tf32 else "highest")
    return requested


def eval_precision(trained: str, device: torch.device) -> str:
    """The precision to evaluate a checkpoint trained in `trained` on `device`: the training one, except
    bf16 on a GPU without bf16 tensor cores (T4, sm_75), which evaluates in fp32 rather than in emulated
    bf16 (~17x slower) or fp16 (activations a bf16 run never kept inside fp16's range can overflow)."""
    if trained == "bf16" and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 8:
        return "fp32"
    return resolve_precision(trained, device)


def autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


FP8_MIN_CAPABILITY = (8, 9)  # Ada (RTX 40xx) and Hopper have fp8 tensor cores


def apply_fp8(model: torch.nn.Module, device: torch.device) -> int:
    """`train.fp8`: torchao's float8 training (tensorwise scaling) on the dense nn.Linear layers whose
    sizes are multiples of 16; the LM head, the router (not an nn.Linear) and the routed experts' grouped GEMMs stay in the
    autocast dtype. Call it before FSDP sharding. Returns the number of converted layers.

    Raises ConfigError off CUDA, below compute capability 8.9 (T4, A100) or without torchao."""
    if device.type != "cuda":
        raise ConfigError("train.fp8 needs a CUDA GPU with fp8 tensor cores (compute capability 8.9+: H100, "
                          "RTX 40xx); on this device use train.precision=bf16 or fp32 and train.fp8=false")
    cap = torch.cuda.get_device_capability(device)
    if cap < FP8_MIN_CAPABILITY:
        raise ConfigError(f"train.fp8 needs compute capability 8.9+, {torch.cuda.get_device_name(device)} is "
                          f"sm_{cap[0]}{cap[1]}: set train.fp8=false (fp16 on T4, bf16 on A100)")
    try:
        from torchao.float8 import convert_to_float8_training
    except ImportError:
        raise ConfigError("train.fp8 needs torchao: pip install torchao (or set train.fp8=false)") from None

    def keep(module: torch.nn.Module, fqn: str) -> bool:
        return isinstance(module, torch.nn.Linear) and fqn != "output" and \
            module.in_features % 16 == 0 and module.out_features % 16 == 0

    convert_to_float8_training(model, module_filter_fn=keep)
    return sum(type(m).__name__ == "Float8Linear" for m in model.modules())
