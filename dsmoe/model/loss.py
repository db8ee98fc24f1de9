"""Cross-entropy of the LM head, chunked over tokens so the [tokens, vocab] logits never exist whole.

`F.linear` + `F.cross_entropy` keeps the logits and the fp32 log-softmax ([T, V] each) from forward
to backward, and backward adds two more [T, V] fp32 tensors: at DeepSeek-V3-mini's 129,280-entry
vocabulary that is 2 GiB per 1024 tokens. Here forward computes the logits one chunk of tokens at a
time and keeps only the head's input and a [T] log-sum-exp; backward recomputes each chunk's logits
(one extra head GEMM) to form its gradient. The idea is Wijmans et al., "Cut Your Losses in
Large-Vocabulary Language Models" (2024), and Liger-Kernel's fused linear cross-entropy; both are
Triton kernels for CUDA only, so this is plain torch that runs on every device.
"""
from __future__ import annotations

import torch

IGNORE_INDEX = -100  # F.cross_entropy's default: such targets count neither in the sum nor the mean
CHUNK_LOGIT_BYTES = 2 ** 28  # fp32 logits of one chunk: 256 MiB (518 tokens at a 129,280 vocabulary)


def chunk_tokens_for(vocab: int) -> int:
    """Tokens per chunk so that one chunk's fp32 logits take at most CHUNK_LOGIT_BYTES."""
    return max(1, CHUNK_LOGIT_BYTES // (4 * vocab))


def _compute_dtype(h: torch.Tensor) -> torch.dtype:
    """What `F.linear(h, w)` would compute in: autocast's dtype when it is on, else h's."""
    dev = h.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_TD, w_VD, targets_T, chunk, compute_dtype):
        h = h_TD.to(compute_dtype)
        w = w_VD.to(compute_dtype)
        valid_T = targets_T != IGNORE_INDEX
        safe_T = torch.where(valid_T, targets_T, 0)
        lse_T = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        nll_sum = torch.zeros((), dtype=torch.float32, device=h.device)
        with torch.autocast(h.device.type, enabled=False):
            for s in range(0, h.shape[0], chunk):
                logits = (h[s:s + chunk] @ w.t()).float()  # rounded to the compute dtype first, as F.linear
                lse = torch.logsumexp(logits, dim=-1)
                lse_T[s:s + chunk] = lse
                picked = logits.gather(1, safe_T[s:s + chunk, None]).squeeze(1)
                nll_sum += torch.where(valid_T[s:s + chunk], lse - picked, 0.0).sum()
        n_valid = valid_T.sum()
        ctx.save_for_backward(h, w_VD, targets_T, lse_T, n_valid)
        ctx.chunk, ctx.h_dtype = chunk, h_TD.dtype
        return nll_sum / n_valid

    @staticmethod
    def backward(ctx, grad_loss):
        h, w_VD, targets_T, lse_T, n_valid = ctx.saved_tensors
        w = w_VD.to(h.dtype)
        valid_T = targets_T != IGNORE_INDEX
        scale = grad_loss / n_valid
        grad_h = torch.empty_like(h)
        grad_w = None  # the first chunk's product starts the sum: no [V, d] zero fill and add
        with torch.autocast(h.device.type, enabled=False):
            for s in range(0, h.shape[0], ctx.chunk):
                h_c, t_c, v_c = h[s:s + ctx.chunk], targets_T[s:s + ctx.chunk], valid_T[s:s + ctx.chunk]
                # d nll / d logits = softmax - one_hot(target), on valid rows, times d loss / d nll
                g = (h_c @ w.t()).float().sub_(lse_T[s:s + ctx.chunk, None]).exp_()
                g.scatter_add_(1, torch.where(v_c, t_c, 0)[:, None], -v_c[:, None].to(g.dtype))
                g.mul_(torch.where(v_c, scale, 0.0)[:, None])
                g = g.to(h.dtype)
                grad_h[s:s + ctx.chunk] = g @ w
                grad_w_c = (g.t() @ h_c).float()  # summed in fp32 over the chunks
                grad_w = grad_w_c if grad_w is None else grad_w.add_(grad_w_c)
        if grad_w is None:  # no tokens
            grad_w = torch.zeros(w_VD.shape, dtype=torch.float32, device=w_VD.device)
        return grad_h.to(ctx.h_dtype), grad_w.to(w_VD.dtype), None, None, None


def chunked_cross_entropy(h_TD: torch.Tensor, w_VD: torch.Tensor, targets_T: torch.Tensor,
                          chunk_tokens: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of the logits `h_TD @ w_VD.T` against `targets_T`, computed chunk by chunk.

    h_TD: [T, d] the LM head's input (the final norm's output). w_VD: [V, d] the head's weight (the
    embedding under tied weights). targets_T: [T] int64 in [0, V), or IGNORE_INDEX (-100) to skip a
    position. Returns a fp32 scalar equal to `F.cross_entropy(F.linear(h, w).float(), targets)`:
    the logits are computed in autocast's dtype when autocast is on (else in h's dtype) and the
    softmax in fp32; the mean is over the non-ignored targets (NaN when every target is ignored, as
    F.cross_entropy). Backward keeps h (cast to the compute dtype), the targets and a fp32 [T]
    log-sum-exp, never [T, V]; the weight's gradient is summed over chunks in fp32.
    `chunk_tokens`: tokens per chunk (default: fp32 logits of CHUNK_LOGIT_BYTES per chunk).
    Raises ValueError on mismatched shapes.
    """
    if h_TD.dim() != 2 or w_VD.dim() != 2 or h_TD.shape[1] != w_VD.shape[1]:
        raise ValueError(f"chunked_cross_entropy: h {tuple(h_TD.shape)} and weight {tuple(w_VD.shape)} must be "
                         "[tokens, d] and [vocab, d]")
    if targets_T.shape != h_TD.shape[:1]:
        raise ValueError(f"chunked_cross_entropy: {targets_T.shape[0] if targets_T.dim() == 1 else tuple(targets_T.shape)}"
                         f" targets for {h_TD.shape[0]} tokens: flatten both to one entry per token")
    chunk = chunk_tokens or chunk_tokens_for(w_VD.shape[0])
    return _ChunkedLinearCrossEntropy.apply(h_TD, w_VD, targets_T, chunk, _compute_dtype(h_TD))
