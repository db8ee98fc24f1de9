"""dsmoe config <-> transformers config: which native architecture computes exactly what dsmoe computes.

Four transformers architectures cover dsmoe's attention x router-score choices:

| attention | score   | architecture          | what it cannot express (export refuses, naming the field)          |
|-----------|---------|-----------------------|---------------------------------------------------------------------|
| mla       | sigmoid | DeepseekV3ForCausalLM | MoE layers other than "all after the first k"; < 2 experts a group   |
| mla       | softmax | DeepseekV2ForCausalLM | renormalised top-k weights, group-limited routing, a routing bias   |
| gqa       | sigmoid | Glm4MoeForCausalLM    | MoE layers other than "all after the first k"; < 2 experts a group   |
| gqa       | softmax | Qwen2MoeForCausalLM   | shared experts (its one is sigmoid-gated), routed_scaling_factor,   |
|           |         |                       | group-limited routing, a routing bias                                |

Every architecture refuses capacity dropping that can happen (`capacity_factor * top_k < n_routed_experts`):
none of them drops tokens. `dropless=True` exports the dropless model instead, which is what dsmoe's own
inference computes. MLA exports also need `model.norm_eps == 1e-6`: transformers builds the latent norms
(q_a_layernorm, kv_a_layernorm) with that epsilon whatever `rms_norm_eps` says.

Sources: transformers' modeling_deepseek_v3.py, modeling_deepseek_v2.py, modeling_glm4_moe.py,
modeling_qwen2_moe.py (routers, MoE placement, RoPE layouts, norms).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from dsmoe.config import Config, TrainConfig, from_dict

HF_LATENT_NORM_EPS = 1e-6  # transformers' DeepseekV2/V3 q_a_layernorm and kv_a_layernorm


class ExportError(ValueError):
    """A model or config that a target format cannot represent exactly; the message names the field."""


@dataclass(frozen=True)
class Arch:
    cls: str  # transformers class, written to config.json "architectures"
    model_type: str
    attention: str  # the dsmoe attention.kind it implements
    score_func: str  # its router's score function
    correction_bias: bool  # has e_score_correction_bias (the aux-loss-free selection bias)
    group_limited: bool  # V3-style group-limited routing (a group scores by its two best experts)
    renormalizes: bool  # can renormalise the chosen top-k weights
    scales_routed: bool  # has routed_scaling_factor
    shared: Optional[str]  # module name of its ungated shared experts; None: it has a gated one only
    first_k_dense: bool  # MoE layers are every layer from first_k_dense_replace on (else any list)


ARCHS = (
    Arch("DeepseekV3ForCausalLM", "deepseek_v3", "mla", "sigmoid", True, True, True, True, "shared_experts", True),
    Arch("DeepseekV2ForCausalLM", "deepseek_v2", "mla", "softmax", False, False, False, True, "shared_experts", True),
    Arch("Glm4MoeForCausalLM", "glm4_moe", "gqa", "sigmoid", True, True, True, True, "shared_experts", True),
    Arch("Qwen2MoeForCausalLM", "qwen2_moe", "gqa", "softmax", False, False, True, False, None, False),
)
BY_MODEL_TYPE = {a.model_type: a for a in ARCHS}


def moe_layer_ids(cfg: Config) -> list[int]:
    return [i for i in range(cfg.model.n_layers) if cfg.is_moe_layer(i)]


def first_k_dense(cfg: Config) -> Optional[int]:
    """k when the MoE layers are exactly the layers from k on (k = n_layers for a dense model), else None."""
    moe, n = moe_layer_ids(cfg), cfg.model.n_layers
    k = moe[0] if moe else n
    return k if moe == list(range(k, n)) else None


def may_drop(cfg: Config) -> bool:
    """Whether the capacity limit can drop an assignment: an expert receives at most T of the T*k
    assignments (a token picks distinct experts), and keeps ceil(cf * T * k / E) >= T when cf * k >= E."""
    e = cfg.moe
    return e.capacity_factor is not None and e.capacity_factor * e.top_k < e.n_routed_experts


def choose_arch(cfg: Config) -> Arch:
    return next(a for a in ARCHS if a.attention == cfg.attention.kind and a.score_func == cfg.moe.score_func)


def blockers(cfg: Config, arch: Arch, bias_nonzero: bool, dropless: bool = False) -> list[str]:
    """Why `arch` cannot compute exactly what `cfg` computes: one line per blocking field (empty: it can)."""
    m, e = cfg.model, cfg.moe
    out = []
    if arch.attention == "mla" and m.norm_eps != HF_LATENT_NORM_EPS:
        out.append(f"model.norm_eps={m.norm_eps}: {arch.cls} normalises the query and KV latents with epsilon "
                   f"{HF_LATENT_NORM_EPS} whatever rms_norm_eps says; train with norm_eps {HF_LATENT_NORM_EPS}")
    if not moe_layer_ids(cfg):
        return out
    if may_drop(cfg) and not dropless:
        out.append(f"moe.capacity_factor={e.capacity_factor}: training dropped assignments past an expert's capacity "
                   f"(cf * top_k < n_routed_experts) and no transformers architecture drops tokens; pass --dropless "
                   f"to export the dropless model (what dsmoe's own inference computes)")
    if arch.first_k_dense and first_k_dense(cfg) is None:
        out.append(f"moe.moe_layers={e.moe_layers}: {arch.cls} places MoE layers only as every layer after the "
                   f"first k dense ones (first_k_dense_replace); use moe.first_k_dense")
    per_group = e.n_routed_experts // e.n_groups
    if arch.group_limited and per_group < 2:
        out.append(f"moe.n_groups={e.n_groups}: {arch.cls} scores each of its groups by the two best experts and "
                   f"needs at least 2 experts per group (moe.n_routed_experts={e.n_routed_experts})")
    if not arch.group_limited and e.n_groups > 1:
        out.append(f"moe.n_groups={e.n_groups}: {arch.cls} has no group-limited routing of dsmoe's kind")
    if not arch.renormalizes and e.norm_topk_prob and e.top_k > 1:
        out.append(f"moe.norm_topk_prob=true: {arch.cls} does not renormalise the chosen gate weights")
    if not arch.scales_routed and e.routed_scaling_factor != 1.0:
        out.append(f"moe.routed_scaling_factor={e.routed_scaling_factor}: {arch.cls} has no routed scaling factor")
    if arch.shared is None and e.n_shared_experts:
        out.append(f"moe.n_shared_experts={e.n_shared_experts}: {arch.cls}'s shared expert is gated by a sigmoid; "
                   f"dsmoe's shared experts are not")
    if not arch.correction_bias and bias_nonzero:
        out.append(f"moe.bias_update_rate={e.bias_update_rate}: the trained routing bias "
                   f"(layers.N.ffn.router.expert_bias) is non-zero and {arch.cls} has no expert-selection bias")
    return out


def check_exportable(cfg: Config, bias_nonzero: bool, dropless: bool = False) -> Arch:
    """The architecture that computes `cfg` exactly, or ExportError naming every blocking field."""
    arch = choose_arch(cfg)
    found = blockers(cfg, arch, bias_nonzero, dropless)
    if found:
        raise ExportError(f"{cfg.model.name} ({cfg.attention.kind} attention, {cfg.moe.score_func} router) maps to "
                          f"transformers' {arch.cls}, which cannot compute it exactly:\n  " + "\n  ".join(found))
    return arch


def hf_config_dict(cfg: Config, arch: Arch, vocab_size: int, eos_token_id: int, dtype: str = "float32") -> dict:
    """The keyword arguments of transformers' config class for `arch` (transformers' field names)."""
    m, a, e = cfg.model, cfg.attention, cfg.moe
    rope = {"rope_type": "default", "rope_theta": m.rope_theta}
    out = dict(architectures=[arch.cls], vocab_size=vocab_size, hidden_size=m.d_model, intermediate_size=m.ffn_hidden,
               num_hidden_layers=m.n_layers, num_attention_heads=m.n_heads, max_position_embeddings=m.max_seq_len,
               rms_norm_eps=m.norm_eps, tie_word_embeddings=m.tie_embeddings, hidden_act="silu",
               initializer_range=m.init_std, bos_token_id=None, eos_token_id=eos_token_id, pad_token_id=eos_token_id,
               dtype=dtype, moe_intermediate_size=e.expert_hidden, num_experts_per_tok=e.top_k,
               norm_topk_prob=e.norm_topk_prob and e.top_k > 1)  # dsmoe never renormalises a single weight
    if a.kind == "mla":
        out.update(num_key_value_heads=m.n_heads, q_lora_rank=a.q_lora_rank or None, kv_lora_rank=a.kv_lora_rank,
                   qk_nope_head_dim=a.qk_nope_head_dim, qk_rope_head_dim=a.qk_rope_head_dim, v_head_dim=a.v_head_dim,
                   attention_bias=False)
    else:
        out.update(num_key_value_heads=a.n_kv_heads or m.n_heads, head_dim=a.head_dim or m.d_model // m.n_heads)
    k = first_k_dense(cfg)
    if arch.model_type == "qwen2_moe":
        out.update(num_experts=e.n_routed_experts, shared_expert_intermediate_size=0, decoder_sparse_step=1,
                   mlp_only_layers=[i for i in range(m.n_layers) if not cfg.is_moe_layer(i)], qkv_bias=False,
                   use_sliding_window=False)
    else:
        out.update(n_routed_experts=e.n_routed_experts, n_shared_experts=e.n_shared_experts,
                   routed_scaling_factor=e.routed_scaling_factor, first_k_dense_replace=k,
                   n_group=e.n_groups, topk_group=e.topk_groups)
    if arch.model_type == "deepseek_v3":
        out.update(rope_interleave=True, num_mtp_layers=0)
    elif arch.model_type == "deepseek_v2":
        out.update(topk_method="greedy")
    elif arch.model_type == "glm4_moe":
        rope["partial_rotary_factor"] = 1.0
        out.update(use_qk_norm=False, attention_bias=False, num_mtp_layers=0)
    out["rope_parameters"] = rope
    return out


# ----------------------------------------------------------------------------- import


def _refuse(hf, field: str, why: str) -> None:
    raise ExportError(f"{hf.model_type} config field {field}={getattr(hf, field, None)!r}: {why}; dsmoe cannot "
                      f"represent it")


def arch_of(model_type: str) -> Arch:
    arch = BY_MODEL_TYPE.get(model_type)
    if arch is None:
        raise ExportError(f"model_type {model_type!r} is not one dsmoe imports; supported: {', '.join(BY_MODEL_TYPE)}")
    return arch


def _check_importable(hf, arch: Arch) -> None:
    rope = dict(hf.rope_parameters or {})
    if rope.get("rope_type", "default") != "default":
        _refuse(hf, "rope_parameters", f"RoPE type {rope.get('rope_type')!r} (dsmoe has plain RoPE)")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        _refuse(hf, "rope_parameters", "partial rotary embedding (dsmoe rotates the whole head)")
    if hf.hidden_act != "silu":
        _refuse(hf, "hidden_act", "dsmoe's FFNs are SwiGLU (silu)")
    for field in ("attention_bias", "qkv_bias", "mlp_bias", "use_qk_norm", "use_sliding_window"):
        if getattr(hf, field, False):
            _refuse(hf, field, "dsmoe has no such part")
    if arch.attention == "mla" and hf.rms_norm_eps != HF_LATENT_NORM_EPS:
        _refuse(hf, "rms_norm_eps", f"dsmoe uses one epsilon for every norm, and {arch.cls}'s latent norms use "
                                    f"{HF_LATENT_NORM_EPS}")
    if arch.model_type == "deepseek_v3" and not getattr(hf, "rope_interleave", True):
        _refuse(hf, "rope_interleave", "dsmoe's MLA RoPE is interleaved")
    if arch.model_type == "deepseek_v2" and hf.topk_method != "greedy":
        _refuse(hf, "topk_method", "dsmoe's softmax routing is greedy top-k")
    if arch.model_type == "qwen2_moe" and hf.shared_expert_intermediate_size:
        _refuse(hf, "shared_expert_intermediate_size", "its shared expert is sigmoid-gated")
    if arch.renormalizes and hf.norm_topk_prob and hf.num_experts_per_tok == 1:
        _refuse(hf, "norm_topk_prob", "it renormalises a single chosen weight to 1 (dsmoe keeps the score)")


def config_from_hf(hf_dir: str | Path, tokenizer: Optional[str] = None, name: Optional[str] = None) -> Config:
    """The dsmoe Config of a transformers checkpoint directory (its config.json).

    Raises ExportError naming the transformers config field dsmoe cannot represent."""
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(str(hf_dir))
    arch = arch_of(hf.model_type)
    _check_importable(hf, arch)
    n = hf.num_hidden_layers
    model = dict(name=name or f"hf-{hf.model_type}", vocab_size=hf.vocab_size, d_model=hf.hidden_size, n_layers=n,
                 n_heads=hf.num_attention_heads, ffn_hidden=hf.intermediate_size,
                 max_seq_len=hf.max_position_embeddings, rope_theta=float(hf.rope_parameters["rope_theta"]),
                 norm_eps=hf.rms_norm_eps, tie_embeddings=bool(hf.tie_word_embeddings), init_std=hf.initializer_range)
    if arch.attention == "mla":
        attention = dict(kind="mla", q_lora_rank=hf.q_lora_rank or 0, kv_lora_rank=hf.kv_lora_rank,
                         qk_nope_head_dim=hf.qk_nope_head_dim, qk_rope_head_dim=hf.qk_rope_head_dim,
                         v_head_dim=hf.v_head_dim)
    else:
        attention = dict(kind="gqa", n_kv_heads=hf.num_key_value_heads,
                         head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads)
    moe = dict(top_k=hf.num_experts_per_tok, expert_hidden=hf.moe_intermediate_size, score_func=arch.score_func,
               norm_topk_prob=bool(hf.norm_topk_prob) if arch.renormalizes else False)
    if arch.model_type == "qwen2_moe":
        moe_ids = [i for i in range(n) if i not in hf.mlp_only_layers and hf.num_experts > 0
                   and (i + 1) % hf.decoder_sparse_step == 0]  # Qwen2MoeDecoderLayer's rule
        moe.update(n_routed_experts=hf.num_experts, n_shared_experts=0, first_k_dense=0,
                   moe_layers=None if moe_ids == list(range(n)) else moe_ids)
    else:
        moe.update(n_routed_experts=hf.n_routed_experts, n_shared_experts=hf.n_shared_experts,
                   routed_scaling_factor=float(hf.routed_scaling_factor), first_k_dense=min(hf.first_k_dense_replace or 0, n))
        if arch.group_limited:
            moe.update(n_groups=hf.n_group or 1, topk_groups=hf.topk_group or 1)
    tree = {"model": model, "attention": attention, "moe": moe,
            "train": {"seq_len": min(TrainConfig.seq_len, model["max_seq_len"])}}
    if tokenizer:
        tree["data"] = {"tokenizer": tokenizer}
    return from_dict(tree)
