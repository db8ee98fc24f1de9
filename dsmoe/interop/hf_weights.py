"""dsmoe state dict <-> transformers tensors (names and layouts), and the safetensors files that hold them.

Layouts (transformers' modeling files of the architectures in hf_config.ARCHS):
- Linear weights are [out, in] on both sides; names map one to one.
- Routed experts: dsmoe stacks w_gate/w_up [E, d, f] and w_down [E, f, d]; the files hold one
  `mlp.experts.{e}.{gate,up,down}_proj.weight` [f, d] / [d, f] per expert, the layout of the published
  DeepSeek-V3 checkpoints, which transformers (fusing them on load), vLLM and SGLang read. Import also takes
  the fused `experts.gate_up_proj` [E, 2f, d] / `experts.down_proj` [E, d, f] that some writers produce.
- RoPE: dsmoe rotates interleaved pairs (x0, x1), (x2, x3), ... DeepSeek-V2/V3 in transformers do too
  (V3 with rope_interleave=True), so MLA weights export unchanged. GLM-4-MoE and Qwen2-MoE rotate halves
  (x_i, x_{i+D/2}), so the query and key rows of each head are permuted (evens first, then odds): the
  same permutation on q and k leaves every q.k product, hence the attention, unchanged.
- The routing bias is DeepSeek-V3's `e_score_correction_bias`; routers stay fp32 in any export dtype
  (dsmoe computes routing in fp32).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional, Union

import torch

from dsmoe.config import Config
from dsmoe.interop.hf_config import Arch, ExportError, arch_of, moe_layer_ids

_PROJ = (("w_gate", "gate_proj"), ("w_up", "up_proj"), ("w_down", "down_proj"))
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def rope_to_halves(w_OI: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of each head from interleaved pairs to halves: row 2i+p -> row p*D/2 + i."""
    D = w_OI.shape[0] // heads
    return w_OI.view(heads, D // 2, 2, -1).transpose(1, 2).reshape(w_OI.shape)


def rope_to_pairs(w_OI: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of rope_to_halves."""
    D = w_OI.shape[0] // heads
    return w_OI.view(heads, 2, D // 2, -1).transpose(1, 2).reshape(w_OI.shape)


def name_pairs(cfg: Config, arch: Arch) -> list[tuple[str, str, Optional[int]]]:
    """(dsmoe name, transformers name, heads whose RoPE rows are permuted or None) for every one-to-one
    tensor; routed experts and the routing bias are handled apart (see to_hf / from_hf)."""
    m, a, e = cfg.model, cfg.attention, cfg.moe
    pairs = [("tok_embeddings.weight", "model.embed_tokens.weight", None), ("norm.weight", "model.norm.weight", None)]
    if not m.tie_embeddings:
        pairs.append(("output.weight", "lm_head.weight", None))
    rope_permuted = arch.attention == "gqa"
    for i in range(m.n_layers):
        p, h = f"layers.{i}.", f"model.layers.{i}."
        names = [("attn_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm")]
        if a.kind == "mla":
            names += [("attn.wq_a", "self_attn.q_a_proj"), ("attn.q_norm", "self_attn.q_a_layernorm"),
                      ("attn.wq_b", "self_attn.q_b_proj")] if a.q_lora_rank else [("attn.wq", "self_attn.q_proj")]
            names += [("attn.wkv_a", "self_attn.kv_a_proj_with_mqa"), ("attn.kv_norm", "self_attn.kv_a_layernorm"),
                      ("attn.wkv_b", "self_attn.kv_b_proj"), ("attn.wo", "self_attn.o_proj")]
        else:
            names += [("attn.wv", "self_attn.v_proj"), ("attn.wo", "self_attn.o_proj")]
            pairs += [(f"{p}attn.wq.weight", f"{h}self_attn.q_proj.weight", m.n_heads if rope_permuted else None),
                      (f"{p}attn.wk.weight", f"{h}self_attn.k_proj.weight",
                       (a.n_kv_heads or m.n_heads) if rope_permuted else None)]
        if cfg.is_moe_layer(i):
            names.append(("ffn.router", "mlp.gate"))
            if e.n_shared_experts:
                names += [(f"ffn.shared.{ds}", f"mlp.{arch.shared}.{hf}") for ds, hf in _PROJ]
        else:
            names += [(f"ffn.{ds}", f"mlp.{hf}") for ds, hf in _PROJ]
        pairs += [(f"{p}{ds}.weight", f"{h}{hf}.weight", None) for ds, hf in names]
    return pairs


def _is_router(name: str) -> bool:
    return name.endswith("mlp.gate.weight") or name.endswith("e_score_correction_bias")


def to_hf(state: dict[str, torch.Tensor], cfg: Config, arch: Arch,
          dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A dsmoe model state dict (single-process shapes) -> transformers tensors for `arch`, contiguous, in
    `dtype` except the routers (fp32). Call hf_config.check_exportable first: the bias is not checked here."""
    out, used = {}, set()
    for ds, hf, heads in name_pairs(cfg, arch):
        out[hf] = rope_to_halves(state[ds], heads) if heads else state[ds]
        used.add(ds)
    d = cfg.model.d_model
    for i in moe_layer_ids(cfg):
        p, h = f"layers.{i}.ffn.", f"model.layers.{i}.mlp."
        for ds, hf in _PROJ:
            w_EXY = state[f"{p}experts.{ds}"]
            out.update({f"{h}experts.{e}.{hf}.weight": w_EXY[e].t() for e in range(w_EXY.shape[0])})
            used.add(f"{p}experts.{ds}")
        used.add(f"{p}router.expert_bias")  # exported, or checked zero by check_exportable
        if arch.correction_bias:
            out[f"{h}gate.e_score_correction_bias"] = state[f"{p}router.expert_bias"]
        if arch.shared is None:  # Qwen2-MoE's sigmoid-gated shared expert, present at size 0: adds exactly 0
            out.update({f"{h}shared_expert.gate_proj.weight": torch.zeros(0, d),
                        f"{h}shared_expert.up_proj.weight": torch.zeros(0, d),
                        f"{h}shared_expert.down_proj.weight": torch.zeros(d, 0),
                        f"{h}shared_expert_gate.weight": torch.zeros(1, d)})
    if cfg.model.tie_embeddings:
        used.add("output.weight")
    left = sorted(set(state) - used)
    if left:
        raise ExportError(f"tensors with no place in {arch.cls}: {', '.join(left[:10])}")
    return {k: (v.float() if _is_router(k) else v.to(dtype)).contiguous() for k, v in out.items()}


def from_hf(tensors: dict[str, torch.Tensor], cfg: Config, arch: Arch) -> dict[str, torch.Tensor]:
    """transformers tensors of `arch` -> a dsmoe model state dict in fp32 (single-process shapes).

    Multi-token-prediction layers (index >= n_layers, DeepSeek-V3's `model.layers.61`) are left out: dsmoe
    has none. Raises ExportError naming missing or unexpected tensors."""
    used = set()

    def take(name: str) -> torch.Tensor:
        if name not in tensors:
            raise ExportError(f"tensor {name} is missing from the checkpoint ({arch.cls} with this config.json "
                              f"has it)")
        used.add(name)
        return tensors[name]

    out = {}
    for ds, hf, heads in name_pairs(cfg, arch):
        out[ds] = rope_to_pairs(take(hf), heads) if heads else take(hf)
    E = cfg.moe.n_routed_experts
    for i in moe_layer_ids(cfg):
        p, h = f"layers.{i}.ffn.", f"model.layers.{i}.mlp."
        if f"{h}experts.gate_up_proj" in tensors:  # fused [E, 2f, d] and [E, d, f]
            gate_up = take(f"{h}experts.gate_up_proj")
            f = gate_up.shape[1] // 2
            out[f"{p}experts.w_gate"] = gate_up[:, :f].transpose(1, 2)
            out[f"{p}experts.w_up"] = gate_up[:, f:].transpose(1, 2)
            out[f"{p}experts.w_down"] = take(f"{h}experts.down_proj").transpose(1, 2)
        else:
            for ds, hf in _PROJ:
                out[f"{p}experts.{ds}"] = torch.stack([take(f"{h}experts.{e}.{hf}.weight").t() for e in range(E)])
        out[f"{p}router.expert_bias"] = take(f"{h}gate.e_score_correction_bias") if arch.correction_bias \
            else torch.zeros(E)
        if arch.shared is None:  # size 0 (config_from_hf refuses a real one); the gate then multiplies zeros
            used.update(k for k in tensors if k.startswith((f"{h}shared_expert.", f"{h}shared_expert_gate.")))
    if cfg.model.tie_embeddings and "lm_head.weight" in tensors:  # some writers store the tied copy too
        if not torch.equal(tensors["lm_head.weight"], tensors["model.embed_tokens.weight"]):
            raise ExportError("lm_head.weight differs from model.embed_tokens.weight though the config ties them: "
                              "dropping it would change the logits; load it untied (dsmoe.export --from-hf does)")
        used.add("lm_head.weight")
    mtp = {k for k in tensors if (m := _LAYER.match(k)) and int(m.group(1)) >= cfg.model.n_layers}
    left = sorted(set(tensors) - used - mtp)
    if left:
        raise ExportError(f"tensors dsmoe has no place for: {', '.join(left[:10])}"
                          + (f" (+{len(left) - 10} more)" if len(left) > 10 else ""))
    out = {k: v.float().contiguous() for k, v in out.items()}
    if cfg.model.tie_embeddings:  # one tensor under both names, as Transformer.state_dict() has it
        out["output.weight"] = out["tok_embeddings.weight"]
    return out


# ----------------------------------------------------------------------------- files


def save_safetensors(tensors: dict[str, torch.Tensor], out_dir: Path, max_shard_size: Union[int, str]) -> list[str]:
    """model.safetensors, or shards with model.safetensors.index.json past `max_shard_size` (bytes or "5GB")."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    split = split_torch_state_dict_into_shards(tensors, max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        save_file({n: tensors[n] for n in names}, str(out_dir / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {**split.metadata, "total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": split.tensor_to_filename}
        (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return sorted(split.filename_to_tensors)


def read_safetensors(hf_dir: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a transformers checkpoint directory (single file or sharded with its index)."""
    from safetensors.torch import load_file

    hf_dir = Path(hf_dir)
    if (hf_dir / INDEX_FILE).is_file():
        files = sorted(set(json.loads((hf_dir / INDEX_FILE).read_text())["weight_map"].values()))
    elif (hf_dir / SINGLE_FILE).is_file():
        files = [SINGLE_FILE]
    else:
        raise ExportError(f"{hf_dir} holds neither {SINGLE_FILE} nor {INDEX_FILE}: not a safetensors checkpoint "
                          f"(save it with save_pretrained(..., safe_serialization=True))")
    tensors = {}
    for name in files:
        tensors.update(load_file(str(hf_dir / name)))
    return tensors


def stored_head_differs(hf_dir: str | Path) -> bool:
    """Whether the directory stores an lm_head.weight unlike its embedding (a head its config may call tied)."""
    from safetensors import safe_open

    hf_dir, names = Path(hf_dir), ("lm_head.weight", "model.embed_tokens.weight")
    where = json.loads((hf_dir / INDEX_FILE).read_text())["weight_map"] if (hf_dir / INDEX_FILE).is_file() \
        else dict.fromkeys(names, SINGLE_FILE)
    if not all(n in where and (hf_dir / where[n]).is_file() for n in names):
        return False
    pair = []
    for n in names:
        with safe_open(str(hf_dir / where[n]), framework="pt") as f:
            if n not in f.keys():
                return False
            pair.append(f.get_tensor(n))
    return not torch.equal(*pair)


def load_hf_weights(hf_dir: str | Path, cfg_or_model) -> dict[str, torch.Tensor]:
    """A transformers checkpoint directory -> a dsmoe model state dict (fp32, single-process shapes) for a
    Config (from hf_config.config_from_hf) or a Transformer built from one.

    Raises ExportError for another architecture, missing or unexpected tensors, or (given a model) tensors
    whose shapes differ from the model's."""
    cfg: Config = getattr(cfg_or_model, "cfg", cfg_or_model)
    config_json = Path(hf_dir) / "config.json"
    if not config_json.is_file():
        raise ExportError(f"{config_json} not found: pass a directory written by save_pretrained or dsmoe.export")
    state = from_hf(read_safetensors(hf_dir), cfg, arch_of(json.loads(config_json.read_text()).get("model_type")))
    if isinstance(cfg_or_model, torch.nn.Module):
        live = cfg_or_model.state_dict()
        bad = [f"{k}: file {tuple(state[k].shape) if k in state else 'none'} vs model {tuple(v.shape)}"
               for k, v in live.items() if k not in state or state[k].shape != v.shape]
        if bad:
            raise ExportError(f"{hf_dir} does not fit this model:\n  " + "\n  ".join(bad[:20]))
    return state
