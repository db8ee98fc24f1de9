"""torch's grouped GEMM (`F.grouped_mm` / `torch._grouped_mm`), usable in every dtype it runs, compiled too.

aten runs `_grouped_mm` in fp32, bf16 and fp16 (a CUTLASS kernel for bf16 on sm90/sm100, a per-group
loop elsewhere), but its fake-tensor (meta) function, which torch.compile traces with, accepts bf16
only (torch/_meta_registrations.py, `_meta_grouped_mm_common`, torch 2.11-2.13). Under torch.compile
other dtypes therefore go through `dsmoe::grouped_mm`, a custom op around the same aten call with
its own shape function and backward; bf16 keeps aten's op, which inductor knows.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
# what aten's _grouped_mm_validate_inputs accepts (aten/src/ATen/native/GroupedMMUtils.h)
GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@torch.library.custom_op("dsmoe::grouped_mm", mutates_args=())
def _grouped_mm_op(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return torch._grouped_mm(a, b, offs=offs)


@_grouped_mm_op.register_fake
def _(a, b, offs):
    if b.dim() == 3:  # [N, k] x [E, k, n] -> [N, n]
        return a.new_empty(a.shape[0], b.shape[-1])
    return a.new_empty(offs.shape[0], a.shape[0], b.shape[1])  # [m, N] x [N, n] -> [E, m, n]


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad):
    """Of out[rows of group e] = a[rows of e] @ b[e] (the 2-D x 3-D case, the only one differentiated)."""
    a, b, offs = ctx.saved_tensors
    grad = grad.contiguous()
    grad_a = _grouped_mm_op(grad, b.transpose(-2, -1), offs) if ctx.needs_input_grad[0] else None
    grad_b = _grouped_mm_op(a.t(), grad, offs) if ctx.needs_input_grad[1] else None
    return grad_a, grad_b, None


_grouped_mm_op.register_autograd(_backward, setup_context=_setup)


def grouped_mm(a_NK: torch.Tensor, b_EKN: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """[N, k] x [E, k, n] -> [N, n]: rows offs[e-1]:offs[e] of `a_NK` times b_EKN[e]; rows past offs[-1]
    are left unwritten (so is their gradient). offs_E: int32 cumulative row counts. Needs `GROUPED_MM`;
    dtype in GROUPED_MM_DTYPES and 16-byte aligned rows (aten raises RuntimeError otherwise)."""
    if torch.compiler.is_compiling() and a_NK.dtype != torch.bfloat16:
        return _grouped_mm_op(a_NK, b_EKN, offs_E)
    return GROUPED_MM(a_NK, b_EKN, offs=offs_E)
