"""Configuration: dataclasses with one-line field docs, YAML presets, `--section.field=value` overrides.

A config file is YAML with top-level sections (model, attention, moe, train, data, parallel,
checkpoint, log, guard, run). Two keys compose files: `preset: NAME` pulls `configs/models/NAME.yaml`
and `hardware: NAME` pulls `configs/hardware/NAME.yaml`; the file's own sections override them, and
command-line overrides come last.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_ROOT = REPO_ROOT / "configs"


class ConfigError(ValueError):
    """A config that cannot be used; the message names the field and the fix."""


def doc(default: Any, text: str, **kw) -> Any:
    """A dataclass field with a default and its one-line docstring (shown by `--help`)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": text}, **kw)
    return field(default=default, metadata={"doc": text}, **kw)


@dataclass
class ModelConfig:
    name: str = doc("tiny", "preset name, shown in logs and stored in checkpoints")
    vocab_size: Optional[int] = doc(None, "vocabulary size; null = the tokenizer's, padded to a multiple of 64")
    d_model: int = doc(128, "hidden size")
    n_layers: int = doc(4, "number of transformer blocks")
    n_heads: int = doc(4, "attention heads")
    ffn_hidden: int = doc(512, "SwiGLU hidden size of the dense FFN layers")
    max_seq_len: int = doc(256, "longest sequence the RoPE tables cover")
    rope_theta: float = doc(10000.0, "RoPE base")
    norm_eps: float = doc(1e-6, "RMSNorm epsilon")
    tie_embeddings: bool = doc(True, "share the input embedding with the output head")
    init_std: float = doc(0.02, "std of the normal init; residual projections are scaled by 1/sqrt(2*n_layers)")


@dataclass
class AttentionConfig:
    kind: Literal["mla", "gqa"] = doc("mla", "mla (latent KV, decoupled RoPE) or gqa (n_kv_heads: 1 = MQA, n_heads = MHA)")
    n_kv_heads: Optional[int] = doc(None, "gqa: key/value heads; null = n_heads")
    head_dim: Optional[int] = doc(None, "gqa: per-head size; null = d_model / n_heads")
    q_lora_rank: int = doc(0, "mla: query bottleneck rank; 0 = no query compression")
    kv_lora_rank: int = doc(64, "mla: rank of the compressed KV latent")
    qk_nope_head_dim: int = doc(32, "mla: per-head query/key size without RoPE")
    qk_rope_head_dim: int = doc(16, "mla: per-head query size with RoPE (one RoPE key shared by all heads)")
    v_head_dim: int = doc(32, "mla: per-head value size")


@dataclass
class MoEConfig:
    n_routed_experts: int = doc(8, "routed experts per MoE layer; 0 = a dense model")
    n_shared_experts: int = doc(1, "always-on shared experts per MoE layer")
    top_k: int = doc(2, "routed experts chosen per token")
    expert_hidden: int = doc(128, "SwiGLU hidden size of one expert")
    moe_layers: Optional[list[int]] = doc(None, "indices of the MoE layers; null = every layer from first_k_dense on")
    first_k_dense: int = doc(1, "when moe_layers is null: the first k layers use the dense FFN")
    score_func: Literal["sigmoid", "softmax"] = doc("sigmoid", "router score function, computed in fp32")
    n_groups: int = doc(1, "group-limited routing: expert groups (1 = off)")
    topk_groups: int = doc(1, "group-limited routing: groups each token may use")
    norm_topk_prob: bool = doc(True, "renormalise the chosen gate weights to sum to one")
    routed_scaling_factor: float = doc(1.0, "multiplier of the routed experts' gate weights")
    bias_update_rate: float = doc(1e-3, "aux-loss-free balancing: bias step per optimizer step (0 = off)")
    seq_aux_loss_coef: float = doc(0.0, "sequence-wise balance loss weight (0 = off)")
    z_loss_coef: float = doc(0.0, "router z-loss weight (0 = off)")
    capacity_factor: Optional[float] = doc(None, "null = dropless; else an expert keeps at most cf*T*k/E tokens, earliest first")
    expert_impl: Literal["grouped", "loop"] = doc("grouped", "grouped GEMM over stacked experts, or the per-expert loop")


@dataclass
class TrainConfig:
    steps: int = doc(200, "optimizer steps (the schedule spans them)")
    stop_after: Optional[int] = doc(None, "end this run after this step (a checkpoint is written); resume continues")
    micro_batch: int = doc(8, "sequences per micro-batch per rank")
    grad_accum: int = doc(1, "micro-batches per optimizer step")
    seq_len: int = doc(128, "tokens per sequence")
    lr: float = doc(3e-3, "peak learning rate")
    min_lr_ratio: float = doc(0.1, "final learning rate as a fraction of the peak")
    warmup_steps: int = doc(20, "linear warmup steps")
    schedule: Literal["cosine", "linear", "onecycle", "constant"] = doc("cosine", "learning-rate schedule after warmup")
    beta1: float = doc(0.9, "AdamW beta1")
    beta2: float = doc(0.95, "AdamW beta2")
    eps: float = doc(1e-8, "AdamW epsilon")
    weight_decay: float = doc(0.1, "AdamW weight decay (matrices only: never norms, biases, routing bias)")
    grad_clip: float = doc(1.0, "global gradient-norm clip (0 = off)")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = doc("auto", "auto: bf16 on sm_80+, fp16+GradScaler on T4, fp32 on CPU")
    device: str = doc("auto", "auto, cpu, cuda or cuda:N")
    seed: int = doc(1337, "seed for init, data order and sampling")
    log_every: int = doc(10, "optimizer steps between console/metrics lines")
    eval_every: int = doc(100, "optimizer steps between validation runs (0 = off)")
    eval_batches: int = doc(8, "micro-batches per validation run")
    sample_every: int = doc(100, "optimizer steps between generated samples (0 = off)")
    sample_prompts: list[str] = doc(["ROMEO:"], "prompts completed at each sample")
    sample_tokens: int = doc(64, "tokens generated per sample")
    temperature: float = doc(0.8, "sampling temperature")
    sample_top_k: int = doc(50, "sampling top-k (0 = off)")


@dataclass
class DataConfig:
    source: str = doc("shakespeare", "shakespeare (bundled), a file/folder, a prepared dir, or hf:NAME")
    tokenizer: str = doc("byte", "byte or tiktoken:NAME (gpt2, cl100k_base, ...)")
    hf_config: Optional[str] = doc(None, "hf: dataset config name")
    split: str = doc("train", "hf: split to read")
    text_field: str = doc("text", "field holding the text in jsonl / hf rows")
    val_fraction: float = doc(0.05, "tail fraction of the token stream held out for validation")
    cache_dir: str = doc("runs/data-cache", "where prepared token files are kept")


@dataclass
class ParallelConfig:
    dp: Literal["ddp", "fsdp"] = doc("ddp", "data parallelism: ddp (replicated) or fsdp (FSDP2, sharded parameters)")
    ep: int = doc(1, "expert-parallel size; world = edp * ep")
    ddp_bucket_mb: int = doc(25, "DDP gradient bucket size in MB")
    activation_checkpointing: Literal["none", "full", "every_n", "moe_only", "attention_only", "selective"] = doc(
        "none", "recompute in backward: none, full or every_n (blocks), moe_only, attention_only, selective")
    ac_every_n: int = doc(2, "every_n policy: checkpoint one block in n")
    reshard_after_forward: bool = doc(True, "FSDP2: free the gathered parameters after forward")
    cpu_offload: bool = doc(False, "FSDP2: keep parameters and optimizer state on the CPU")
    replicate: int = doc(1, "FSDP2: HSDP replica groups (1 = plain FSDP)")
    timeout_s: int = doc(600, "process-group timeout at start-up (seconds): data preparation, first steps")
    step_timeout_s: int = doc(300, "process-group timeout once the first steps are done (seconds)")


@dataclass
class CheckpointConfig:
    every: int = doc(100, "optimizer steps between checkpoints (0 = only at the end)")
    keep_last: int = doc(3, "checkpoints kept in the run directory")
    save_final: bool = doc(True, "write a checkpoint when training ends")
    format: Literal["auto", "file", "sharded"] = doc(
        "auto", "file (one step_N.pt, any layout resumes it), sharded (DCP directory, one shard per rank), "
                "auto = sharded under FSDP")


@dataclass
class LogConfig:
    rich: Literal["auto", "on", "off"] = doc("auto", "rich console: auto = only when stdout is a terminal")
    expert_stats: bool = doc(True, "log per-expert token counts and imbalance")
    peak_tflops: Optional[float] = doc(None, "the device's peak TFLOP/s for MFU; null = the built-in table")


@dataclass
class GuardConfig:
    policy: Literal["skip", "rollback", "abort", "off"] = doc("skip", "on a NaN/inf or a loss spike: skip the step, "
                                                             "roll back after repeats, abort, or off")
    check_params: bool = doc(False, "also check the parameters after each update (one more fused norm)")
    spike_zscore: float = doc(0.0, "a loss this many std above the moving window is a spike (0 = off)")
    spike_window: int = doc(50, "accepted losses in the spike window")
    rollback_after: int = doc(3, "rollback: bad steps within rollback_window that trigger a rollback")
    rollback_window: int = doc(20, "rollback: the window, in steps")
    rollback_lr_factor: float = doc(0.5, "rollback: multiply the learning rate by this after each rollback")
    max_rollbacks: int = doc(3, "rollback: then abort")
    localize: bool = doc(True, "on the first event, replay the micro-batch and name the first bad module")
    inject_nan_step: Optional[int] = doc(None, "fault injection: make a module's output NaN at this step")
    inject_nan_rank: int = doc(0, "fault injection: the rank that gets the NaN")
    inject_nan_module: str = doc("layers.0.ffn", "fault injection: module path whose output becomes NaN")
    inject_spike_step: Optional[int] = doc(None, "fault injection: multiply the loss by 100 at this step")
    inject_kill_step: Optional[int] = doc(None, "fault injection: SIGKILL a rank at this step (once per run dir)")
    inject_kill_rank: int = doc(0, "fault injection: the rank killed")
    inject_hang_step: Optional[int] = doc(None, "fault injection: a rank stops answering collectives at this step")
    inject_hang_rank: int = doc(1, "fault injection: the rank that hangs")
    inject_kill_in_save: Optional[int] = doc(None, "fault injection: kill rank 0 while it writes this step's checkpoint")


@dataclass
class RunConfig:
    dir: str = doc("runs/tiny", "run directory: config, metrics, samples, checkpoints")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def model_dict(self) -> dict:
        """The sections that define the network's shape (a checkpoint must match them)."""
        return {k: dataclasses.asdict(getattr(self, k)) for k in MODEL_SECTIONS}

    def is_moe_layer(self, i: int) -> bool:
        if self.moe.n_routed_experts == 0:
            return False
        if self.moe.moe_layers is not None:
            return i in self.moe.moe_layers
        return i >= self.moe.first_k_dense


MODEL_SECTIONS = ("model", "attention", "moe")
SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}


# ----------------------------------------------------------------------------- loading


def _section_classes() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {name: hints[name] for name in SECTIONS}


def _near(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f" Did you mean '{close[0]}'?" if close else ""


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML/CLI value to the field's type, or raise naming the field."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin is Literal:
        if isinstance(value, bool) and ("on" if value else "off") in args:  # YAML reads `off` as false
            value = "on" if value else "off"
        if value not in args:
            raise ConfigError(f"{where}: '{value}' is not one of {list(args)}.{_near(str(value), args)}")
        return value
    if origin is list:
        (item,) = args
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{where}: unsupported type {tp}")


def _merge(base: dict, extra: dict) -> dict:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for key, val in extra.items():
        if isinstance(val, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **val}
        else:
            out[key] = val
    return out


def _resolve_named(kind: str, name: str, relative_to: Path | None) -> Path:
    """`preset: tiny` -> configs/models/tiny.yaml; a path works too."""
    candidates = [Path(name)]
    if relative_to is not None:
        candidates.append(relative_to.parent / name)
    candidates.append(CONFIG_ROOT / kind / f"{name}.yaml")
    for c in candidates:
        if c.is_file():
            return c
    known = sorted(p.stem for p in (CONFIG_ROOT / kind).glob("*.yaml"))
    raise ConfigError(f"{kind} '{name}' not found; known: {', '.join(known)}.{_near(name, known)}")


def load_yaml_tree(path: str | Path) -> dict:
    """Read a YAML config and the files it names (`preset:`, `hardware:`), later keys winning."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' not found (presets live in {CONFIG_ROOT / 'models'})")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    tree: dict = {}
    for key, kind in (("preset", "models"), ("hardware", "hardware")):
        if key in raw:
            tree = _merge(tree, load_yaml_tree(_resolve_named(kind, str(raw.pop(key)), path)))
    return _merge(tree, raw)


def parse_overrides(argv: list[str]) -> dict:
    """`--section.field=value` or `--section.field value` -> nested dict of strings."""
    out: dict = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ConfigError(f"unexpected argument '{arg}': overrides look like --section.field=value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv):
                raise ConfigError(f"--{key} needs a value: --{key}=VALUE")
            i += 1
            value = argv[i]
        section, _, name = key.partition(".")
        out.setdefault(section, {})[name] = yaml.safe_load(value) if value != "" else ""
        i += 1
    return out


def from_dict(tree: dict) -> Config:
    classes = _section_classes()
    sections = {}
    for section, values in tree.items():
        if section not in classes:
            raise ConfigError(f"unknown config section '{section}'.{_near(section, classes)} Sections: {', '.join(classes)}")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"section '{section}' must be a mapping of fields, got {values!r}")
        cls = classes[section]
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for name, value in values.items():
            if name not in hints:
                raise ConfigError(f"unknown key '{section}.{name}'.{_near(name, hints)} "
                                  f"Fields of '{section}': {', '.join(hints)}")
            kwargs[name] = _coerce(value, hints[name], f"{section}.{name}")
        sections[section] = cls(**kwargs)
    cfg = Config(**sections)
    validate(cfg)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> Config:
    """The resolved config: defaults <- preset/hardware <- file <- overrides."""
    tree = load_yaml_tree(path) if path is not None else {}
    if overrides:
        tree = _merge(tree, parse_overrides(overrides) if isinstance(overrides, list) else overrides)
    return from_dict(tree)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def help_text() -> str:
    """Every field with its type, default and docstring."""
    lines = []
    for section, cls in _section_classes().items():
        lines.append(f"{section}:")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"  --{section}.{f.name}={default!r:<14} {f.metadata.get('doc', '')}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- validation


def validate(cfg: Config) -> None:
    m, a, e, t = cfg.model, cfg.attention, cfg.moe, cfg.train

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    for section in (m, t):
        for f in dataclasses.fields(section):
            v = getattr(section, f.name)
            if f.name in ("d_model", "n_layers", "n_heads", "ffn_hidden", "max_seq_len", "steps",
                          "micro_batch", "grad_accum", "seq_len"):
                need(v > 0, f"{f.name} must be positive, got {v}")
    if a.kind == "gqa":
        if a.head_dim is None:
            need(m.d_model % m.n_heads == 0,
                 f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}: "
                 f"change one of them or set attention.head_dim")
        kv = a.n_kv_heads or m.n_heads
        need(kv > 0 and m.n_heads % kv == 0,
             f"attention.n_kv_heads={kv} must divide model.n_heads={m.n_heads} (1 = MQA, {m.n_heads} = MHA)")
        need((a.head_dim or m.d_model // m.n_heads) % 2 == 0, "the attention head size must be even for RoPE")
    else:
        need(a.kv_lora_rank > 0, f"attention.kv_lora_rank must be positive for mla, got {a.kv_lora_rank}")
        need(a.qk_rope_head_dim > 0 and a.qk_rope_head_dim % 2 == 0,
             f"attention.qk_rope_head_dim must be a positive even number, got {a.qk_rope_head_dim}")
        need(a.qk_nope_head_dim >= 0 and a.v_head_dim > 0 and a.q_lora_rank >= 0,
             "attention.qk_nope_head_dim, v_head_dim and q_lora_rank must be non-negative (v_head_dim positive)")
    if m.vocab_size is not None:
        need(m.vocab_size > 0, f"model.vocab_size must be positive or null, got {m.vocab_size}")
    need(t.seq_len <= m.max_seq_len,
         f"train.seq_len={t.seq_len} is longer than model.max_seq_len={m.max_seq_len}: raise model.max_seq_len")
    if e.n_routed_experts > 0:
        need(1 <= e.top_k <= e.n_routed_experts,
             f"moe.top_k={e.top_k} must be between 1 and moe.n_routed_experts={e.n_routed_experts}")
        need(e.expert_hidden > 0, f"moe.expert_hidden must be positive, got {e.expert_hidden}")
        need(e.n_shared_experts >= 0, f"moe.n_shared_experts must be >= 0, got {e.n_shared_experts}")
        need(e.n_groups >= 1 and e.n_routed_experts % e.n_groups == 0,
             f"moe.n_groups={e.n_groups} must divide moe.n_routed_experts={e.n_routed_experts}")
        need(1 <= e.topk_groups <= e.n_groups,
             f"moe.topk_groups={e.topk_groups} must be between 1 and moe.n_groups={e.n_groups}")
        if e.n_groups > 1:
            need(e.top_k <= e.topk_groups * (e.n_routed_experts // e.n_groups),
                 f"moe.top_k={e.top_k} exceeds the experts in moe.topk_groups={e.topk_groups} groups")
        if e.moe_layers is not None:
            bad = [i for i in e.moe_layers if not 0 <= i < m.n_layers]
            need(not bad, f"moe.moe_layers {bad} are outside the model's layers 0..{m.n_layers - 1}")
        need(0 <= e.first_k_dense <= m.n_layers,
             f"moe.first_k_dense={e.first_k_dense} must be between 0 and model.n_layers={m.n_layers}")
        if e.capacity_factor is not None:
            need(e.capacity_factor > 0, f"moe.capacity_factor must be positive or null (dropless), got {e.capacity_factor}")
        need(e.bias_update_rate >= 0, f"moe.bias_update_rate must be >= 0, got {e.bias_update_rate}")
    need(cfg.parallel.ep >= 1, f"parallel.ep must be >= 1, got {cfg.parallel.ep}")
    need(cfg.parallel.replicate >= 1, f"parallel.replicate must be >= 1, got {cfg.parallel.replicate}")
    need(cfg.parallel.replicate == 1 or cfg.parallel.dp == "fsdp",
         f"parallel.replicate={cfg.parallel.replicate} (HSDP) needs parallel.dp=fsdp")
    if e.n_routed_experts > 0:
        need(e.n_routed_experts % cfg.parallel.ep == 0,
             f"moe.n_routed_experts={e.n_routed_experts} is not divisible by parallel.ep={cfg.parallel.ep}: "
             f"choose an ep that divides it")
    need(0 < cfg.data.val_fraction < 1, f"data.val_fraction must be in (0, 1), got {cfg.data.val_fraction}")
    need(t.warmup_steps >= 0 and 0 <= t.min_lr_ratio <= 1, "train.warmup_steps >= 0 and 0 <= train.min_lr_ratio <= 1")
    g = cfg.guard
    need(g.spike_window >= 2, f"guard.spike_window must be >= 2, got {g.spike_window}")
    need(g.rollback_after >= 1 and g.rollback_window >= 1 and g.max_rollbacks >= 0,
         "guard.rollback_after and guard.rollback_window must be >= 1, guard.max_rollbacks >= 0")
    need(0 < g.rollback_lr_factor <= 1, f"guard.rollback_lr_factor must be in (0, 1], got {g.rollback_lr_factor}")
    need(cfg.checkpoint.keep_last >= 1, f"checkpoint.keep_last must be >= 1, got {cfg.checkpoint.keep_last}")
