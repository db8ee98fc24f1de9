"""Training memory per GPU: an analytic ledger of what the code keeps.

`estimate_memory(cfg, world, ep)` returns bytes per category for one rank: fp32 parameters, fp32
gradients, AdamW's two fp32 moments (the parameters are the fp32 master weights: under bf16/fp16
autocast they stay fp32), the low-precision weight copies autocast makes, activations with and
without activation checkpointing, and the chunked loss's workspace (the fused AdamW step needs no workspace).

Activations are counted tensor by tensor from what autograd saves in dsmoe's own forward (read off
dsmoe/model/*.py, and checked against `measure_saved_activation_bytes` in tests/test_estimate.py),
not from a rule of thumb such as 34·s·b·h. Facts the model encodes, all visible in the code:

- The residual stream stays fp32 under autocast (the embedding is fp32 and fp32 + bf16 promotes),
  and every RMSNorm saves its fp32 input, its fp32 normalised output and the [T,1] rsqrt.
- Under autocast each nn.Linear casts its input separately (casts of non-leaf tensors are not
  cached), so a norm output read by 2-3 projections is saved as 2-3 bf16 copies; weight casts of
  parameters are cached and saved once (2 bytes per matmul weight); the stacked experts are cast
  by GroupedExperts itself (`w.to(dtype)`), once per layer.
- SwiGLU saves 4 tensors of [tokens, hidden] (gate output for silu, silu output and up output for
  the product, the product for w_down), not 3.
- The MoE combine works in fp32: expert outputs are upcast ([T·K, d] fp32) and the weighted rows
  given to index_add_ are saved too ([T·K, d] fp32).
- SDPA: fused kernels (flash / memory-efficient / cuDNN on CUDA; flash on CPU when q/k and v head
  sizes match) save q, k, v, the output and an fp32 logsumexp. On CPU MLA pads V to the q/k head size
  so that they do (dsmoe.model.attention.v_padding_needed; CUDA's kernels take V unpadded); CPU's
  math fallback would save scaled fp32 copies of q, k, v and the [B,H,S,S] probabilities.
- The router turns autocast off: it reads the fp32 norm output and its logits and scores are fp32;
  the shared and routed experts read the tokens' compute-dtype copy.
- Full checkpointing keeps only each block's fp32 input [B,S,d]; one block's activations are
  recomputed at a time in backward.
- The loss (dsmoe/model/loss.py) keeps the head's input in the compute dtype, the targets and a fp32
  [T] log-sum-exp, never [T,V] logits; its backward recomputes one chunk of logits at a time.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import torch
import yaml

from dsmoe.config import Config
from dsmoe.model.loss import chunk_tokens_for
from dsmoe.parallel.expert_state import is_expert_param
from dsmoe.tools.model import meta_model, vocab_size_of

GiB = 2 ** 30


def compute_bytes(cfg: Config, device: str) -> int:
    """Bytes per element of matmul inputs/outputs: 4 in fp32, 2 under bf16/fp16 autocast."""
    p = cfg.train.precision
    if p == "auto":  # what dsmoe.train.precision resolves: fp32 on CPU, bf16 or fp16 on a GPU
        return 4 if device == "cpu" else 2
    return 4 if p == "fp32" else 2


def checkpointed_layers(cfg: Config) -> list[bool]:
    """Which blocks dsmoe.parallel.wrap.block_fn_for recomputes whole in backward. The sub-layer and
    selective policies recompute parts of blocks; the ledger counts those blocks whole (an upper bound)."""
    p, n = cfg.parallel, cfg.model.n_layers
    if p.activation_checkpointing == "full":
        return [True] * n
    if p.activation_checkpointing == "every_n":
        return [i % p.ac_every_n == 0 for i in range(n)]
    return [False] * n


# ----------------------------------------------------------------------------- the ledger


def _norm(T: int, n: int) -> int:
    """RMSNorm: fp32 input (or its fp32 copy), fp32 normalised output, [T,1] rsqrt."""
    return 2 * T * n * 4 + T * 4


def _swiglu(T: int, f: int, cb: int) -> int:
    """gate output (silu), silu output and up output (product), product (w_down input)."""
    return 4 * T * f * cb


def _attention(cfg: Config, B: int, S: int, cb: int, device: str) -> int:
    m, a = cfg.model, cfg.attention
    T, H, d = B * S, m.n_heads, m.d_model
    amp = cb == 2
    total = _norm(T, d)
    if a.kind == "gqa":
        hkv = a.n_kv_heads or H
        hd = a.head_dim or d // H
        total += (3 * T * d * 2) if amp else T * d * 4  # wq/wk/wv inputs
        # fused SDPA (flash on CPU and CUDA): roped q, roped k, v (a view of wv's output), out, lse
        total += T * hd * (H + 2 * hkv + H) * cb + B * H * S * 4
        return total  # wo reads the SDPA output in place (it is laid out [B,S,H,D])
    qk, vd, kv, rope, qr = a.qk_nope_head_dim + a.qk_rope_head_dim, a.v_head_dim, a.kv_lora_rank, \
        a.qk_rope_head_dim, a.q_lora_rank
    total += (2 * T * d * 2) if amp else T * d * 4  # wq (or wq_a) and wkv_a inputs
    if qr:  # q_norm over wq_a's output, then wq_b's input
        total += _norm(T, qr) + T * qr * cb
    # kv_norm: in fp32 its input is a view of wkv_a's whole [T, kv+rope] output; under autocast a
    # contiguous fp32 copy of the latent; then wkv_b's input
    total += (T * (kv + rope) * 4 + T * kv * 4 + T * 4) if not amp else _norm(T, kv)
    total += T * kv * cb
    if qk > vd and device == "cpu":  # V zero-padded to the q/k head size so that CPU's flash kernel runs
        total += 2 * T * H * qk * cb  # q and k (torch.cat outputs)
        total += 2 * T * H * qk * cb + B * H * S * 4  # padded v, padded output, logsumexp
        total += T * H * vd * cb  # wo's input: the sliced output, made contiguous
        return total
    fused = device != "cpu" or qk == vd
    if fused:
        lse_s = S if (qk == vd or device == "cpu") else 32 * math.ceil(S / 32)  # mem-efficient pads lse
        total += 2 * T * H * qk * cb  # q and k (torch.cat outputs)
        total += T * H * (a.qk_nope_head_dim + vd) * cb  # v is a view of wkv_b's whole output
        total += T * H * vd * cb + B * H * lse_s * 4  # output (read in place by wo) and logsumexp
    else:  # CPU math fallback, computed in fp32 even under autocast
        total += 2 * T * H * qk * 4 + T * H * vd * 4 + B * H * S * S * 4
        total += T * H * vd * cb  # wo's input: a contiguous copy (or its bf16 cast)
    return total


def _ffn(cfg: Config, layer: int, B: int, S: int, cb: int) -> int:
    m, e = cfg.model, cfg.moe
    T, d = B * S, m.d_model
    amp = cb == 2
    total = _norm(T, d)
    if not cfg.is_moe_layer(layer):
        return total + ((2 * T * d * 2) if amp else T * d * 4) + _swiglu(T, m.ffn_hidden, cb)
    E, K = e.n_routed_experts, e.top_k
    N = T * K  # rows sent to the experts (capacity drops keep their padding rows)
    rb = 4  # router logits and scores: fp32 (Router.forward turns autocast off)
    # the router reads the fp32 norm output; under autocast the shared experts read its compute-dtype copy
    total += T * d * 4 + (T * d * cb if amp and e.n_shared_experts else 0)
    total += T * E * rb + T * K * 8  # scores (sigmoid/softmax result, gathered), top-k indices
    if e.norm_topk_prob and K > 1:
        total += T * K * rb + T * rb  # division: chosen scores and their sum
    if e.seq_aux_loss_coef > 0:
        total += T * rb + B * E * 4  # score sums per token, f_i per sequence
    if e.z_loss_coef > 0:
        total += T * E * rb + T * rb  # logsumexp input and output
    if e.capacity_factor is not None:
        total += T * K + N  # bool keep masks (gate weights, dispatched rows)
    total += 2 * N * 8  # token_of_row (gather + index_add_) and the sort order (gate weights)
    total += N * d * cb + _swiglu(N, e.expert_hidden, cb) + E * 4  # expert inputs, hidden, offsets
    if e.capacity_factor is None:  # fused combine (embedding_bag): gate weights, upcast outputs, bag indices
        total += N * 4 + N * d * 4 + N * 8 + T * 8
    else:
        total += N * 4 + 2 * N * d * 4  # fp32 combine: gate weights, upcast expert outputs, weighted rows
    if e.n_shared_experts:
        total += _swiglu(T, e.n_shared_experts * e.expert_hidden, cb)
    return total


def activation_ledger(cfg: Config, device: str = "cuda", ep: int = 1) -> dict:
    """Bytes autograd saves, by part, for one micro-batch on one rank (no checkpointing)."""
    m, e, t = cfg.model, cfg.moe, cfg.train
    B, S, d = t.micro_batch, t.seq_len, m.d_model
    T = B * S
    cb = compute_bytes(cfg, device)
    amp = cb == 2
    layers = [_attention(cfg, B, S, cb, device) + _ffn(cfg, i, B, S, cb) for i in range(m.n_layers)]
    e_local = e.n_routed_experts // ep if e.n_routed_experts else 0
    expert_cast = 3 * e_local * d * e.expert_hidden * 2 if amp else 0
    expert_casts = [expert_cast if cfg.is_moe_layer(i) else 0 for i in range(m.n_layers)]
    # embedding indices; final norm; the loss's head input, targets, fp32 log-sum-exp and token count
    outer = T * 8 + _norm(T, d) + T * d * cb + T * 8 + T * 4 + 8
    return {
        "layers": layers,  # per block, without the weight casts
        "expert_casts": expert_casts,  # per block: autocast copies of the stacked experts
        "block_input": T * d * 4,  # what a checkpointed block keeps (fp32 residual stream)
        "outer": outer,
        "tokens": T,
    }


def loss_workspace(cfg: Config, cb: int, head_cast: bool, head_bytes: int) -> tuple[int, int]:
    """Transient bytes of the chunked LM-head loss (dsmoe/model/loss.py), (forward, backward), op by op.

    `cb`: compute bytes; `head_cast`: the head weight is cast to the compute dtype (fp32 master
    weights under autocast; not under FSDP2's bf16 parameters); `head_bytes`: its parameter's bytes
    per element. Forward, per chunk of c tokens: the weight's cast, a chunk's logits in the compute
    dtype and their fp32 copy. Backward: the weight cast, the head input's gradient [T,d] and the
    weight's fp32 gradient sum [V,d], then per chunk the larger of (fp32 logits turned into their
    gradient + its compute-dtype copy) and (that copy + the chunk's weight-gradient product + its fp32
    copy), or on return the head input's gradient in fp32 and the weight's in its own dtype."""
    t, m = cfg.train, cfg.model
    T, V, d = t.micro_batch * t.seq_len, vocab_size_of(cfg), m.d_model
    c = min(T, chunk_tokens_for(V))
    amp = cb == 2
    cast = V * d * cb if head_cast else 0
    forward = cast + c * V * (cb + 4 if amp else 4)
    chunk = max(c * V * (cb + 4), c * V * cb + V * d * (cb + 4)) if amp else c * V * 4 + V * d * 4
    ret = (T * d * 4 if amp else 0) + (V * d * head_bytes if head_bytes != 4 else 0)
    backward = cast + T * d * cb + V * d * 4 + max(chunk, ret)
    return forward, backward


def predicted_saved_bytes(cfg: Config, device: str = "cpu", ep: int = 1) -> int:
    """What `measure_saved_activation_bytes` should count after a forward pass of `cfg`."""
    led = activation_ledger(cfg, device, ep)
    amp = compute_bytes(cfg, device) == 2
    # a non-checkpointed block also saves autocast's (cached) casts of its linear weights
    casts = [2 * n if amp else 0 for n in param_stats(cfg, ep)["layer_cast_numel"]]
    total = led["outer"]
    for i, ckpt in enumerate(checkpointed_layers(cfg)):
        total += led["block_input"] if ckpt else led["layers"][i] + led["expert_casts"][i] + casts[i]
    return total


# ----------------------------------------------------------------------------- the estimate


@functools.lru_cache(maxsize=64)
def _param_stats(model_yaml: str, vocab: int, ep: int) -> dict:
    from dsmoe.config import AttentionConfig, ModelConfig, MoEConfig

    tree = yaml.safe_load(model_yaml)
    cfg = Config(model=ModelConfig(**tree["model"]), attention=AttentionConfig(**tree["attention"]),
                 moe=MoEConfig(**tree["moe"]))
    model = meta_model(cfg, ep, vocab)
    params = list(model.parameters())  # tied weights once
    trainable = [p for p in params if p.requires_grad]
    layer_casts = [sum(mod.weight.numel() for mod in block.modules() if isinstance(mod, torch.nn.Linear))
                   for block in model.layers]
    return {
        "n_params": sum(p.numel() for p in params),
        "expert_numel": sum(p.numel() for n, p in model.named_parameters() if is_expert_param(n)),
        "block_numel": [sum(p.numel() for p in block.parameters()) for block in model.layers],
        "param_bytes": sum(p.numel() * p.element_size() for p in params),  # fp32: the master weights
        "grad_bytes": sum(p.numel() * p.element_size() for p in trainable),  # grads match the params' dtype
        "optim_bytes": 2 * sum(p.numel() * 4 for p in trainable),  # exp_avg + exp_avg_sq, fp32
        # weights autocast casts once and caches: the blocks' nn.Linear weights (the router computes in
        # fp32; the loss casts the head's weight itself, per call)
        "layer_cast_numel": layer_casts,
        "cast_numel": sum(layer_casts),
    }


def param_stats(cfg: Config, ep: int = 1) -> dict:
    """Exact parameter counts and bytes of one rank's model (built once per shape, on the meta device)."""
    return _param_stats(yaml.safe_dump(cfg.model_dict()), vocab_size_of(cfg), ep)


def estimate_memory(cfg: Config, world: Optional[int] = None, ep: Optional[int] = None,
                    device: Optional[str] = None) -> dict:
    """Bytes per category on one rank at its peak. `ep` defaults to parallel.ep, `world` to ep; `device`
    is 'cpu' or 'cuda' (default: cpu when train.device is cpu, else a GPU).

    The peak is the largest of three moments over what every moment holds (parameters, gradients,
    AdamW state, FSDP's gathered root, what forward saved for backward): the loss's forward (with
    autocast's cache of every weight cast), the loss's backward, and the backward of the largest
    recomputed block (its activations and casts made again, two gathered FSDP blocks). Raises
    ValueError when world is not divisible by ep or the routed experts are not."""
    ep = cfg.parallel.ep if ep is None else ep
    world = ep if world is None else world
    if world % ep:
        raise ValueError(f"world={world} is not divisible by ep={ep}")
    if cfg.moe.n_routed_experts and cfg.moe.n_routed_experts % ep:
        raise ValueError(f"moe.n_routed_experts={cfg.moe.n_routed_experts} is not divisible by ep={ep}")
    device = device or ("cpu" if cfg.train.device == "cpu" else "cuda")
    cfg = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, ep=ep))
    st = param_stats(cfg, ep)
    led = activation_ledger(cfg, device, ep)
    cb = compute_bytes(cfg, device)
    amp = cb == 2
    fsdp = cfg.parallel.dp == "fsdp" and world > 1
    ckpt = checkpointed_layers(cfg)
    # autocast caches each linear weight's cast for the whole forward; autograd keeps those of blocks it
    # saves; FSDP2 with a 16-bit policy computes in its gathered copies instead (no casts)
    lin = [2 * n if amp and not fsdp else 0 for n in st["layer_cast_numel"]]
    ex = [0 if fsdp else x for x in led["expert_casts"]]
    saved = led["outer"] + sum(led["block_input"] if c else layer + x + w
                               for c, layer, x, w in zip(ckpt, led["layers"], ex, lin))
    saved_casts = sum(x + w for c, x, w in zip(ckpt, ex, lin) if not c)
    param_bytes, grad_bytes, optim_bytes = st["param_bytes"], st["grad_bytes"], st["optim_bytes"]
    root = gathered_block = 0
    unsharded = beside_buckets = False
    if world > 1 and not fsdp and cfg.train.grad_accum > 1:
        # DDP: on no_sync micro-steps its reducer leaves the gradients in tensors of their own (the trainer
        # frees the bucket views with zero_grad(set_to_none=True)); its buckets stay allocated beside them
        grad_bytes += grad_bytes * (st["n_params"] - st["expert_numel"]) // st["n_params"]
        beside_buckets = True
    if fsdp:
        # sharded: dense tensors over the shard group, experts over edp; units are gathered whole in
        # the compute dtype: the root (embeddings, final norm, head) from its forward to the end of
        # backward, a block and the next one prefetched, or every block from forward to backward
        # without reshard_after_forward
        shard, edp = world // cfg.parallel.replicate, world // ep
        n, experts = st["n_params"], st["expert_numel"]
        fraction = ((n - experts) / shard + experts / edp) / n
        param_bytes, grad_bytes, optim_bytes = (int(b * fraction) for b in (param_bytes, grad_bytes, optim_bytes))
        if cfg.train.grad_accum > 1:
            # between micro-steps (set_requires_gradient_sync(False)) FSDP2 keeps every unit's gradient
            # unsharded, in fp32 (the reduce dtype): this rank's whole model, not its shard
            grad_bytes, unsharded = st["grad_bytes"], True
        blocks = sorted(st["block_numel"], reverse=True)
        root = (n - sum(blocks)) * cb
        if cfg.parallel.reshard_after_forward:
            gathered_block = sum(blocks[:2]) * cb
        else:
            root += sum(blocks) * cb
    loss_fw, loss_bw = loss_workspace(cfg, cb, head_cast=amp and not fsdp, head_bytes=cb if fsdp else 4)
    moments = {  # name: (weight casts, gathered, activations beyond `saved`, loss workspace)
        "loss forward": (sum(lin) - sum(w for c, w in zip(ckpt, lin) if not c), 0, 0, loss_fw),
        "loss backward": (0, 0, 0, loss_bw),
    }
    redo = [i for i, c in enumerate(ckpt) if c]
    if redo:
        i = max(redo, key=lambda j: led["layers"][j] + ex[j] + lin[j])
        moments["block backward"] = (ex[i] + lin[i], gathered_block, led["layers"][i], 0)
    elif fsdp:
        moments["block backward"] = (0, gathered_block, 0, 0)
    peak_at = max(moments, key=lambda k: sum(moments[k]))
    casts, gathered, recomputed, loss = moments[peak_at]
    persistent = param_bytes + grad_bytes + optim_bytes
    activations = saved - saved_casts + recomputed
    total = persistent + root + gathered + saved_casts + casts + activations + loss
    act_none = sum(led["layers"]) + led["outer"]
    act_full = cfg.model.n_layers * led["block_input"] + led["outer"] + max(led["layers"])
    return {
        "world": world, "ep": ep, "device": device, "precision_bytes": cb,
        "tokens": led["tokens"], "n_params": st["n_params"], "policy": cfg.parallel.activation_checkpointing,
        "params": param_bytes, "grads": grad_bytes, "optimizer": optim_bytes, "grads_unsharded": unsharded,
        "grads_beside_buckets": beside_buckets,
        "weight_casts": saved_casts + casts, "fsdp_gathered": root + gathered,
        "activations_none": act_none, "activations_full": act_full, "activations": activations,
        "logits": loss, "peak_at": peak_at, "persistent": persistent, "total": total,
    }
