"""Cross-field checks of a resolved config; each error names the field and the fix."""
from __future__ import annotations

import dataclasses
import math

from dsmoe.config.schema import Config, ConfigError


def validate(cfg: Config) -> None:
    m, a, e, t = cfg.model, cfg.attention, cfg.moe, cfg.train

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    for name, section in (("model", m), ("train", t)):
        for f in dataclasses.fields(section):
            v = getattr(section, f.name)
            if f.name in ("d_model", "n_layers", "n_heads", "ffn_hidden", "max_seq_len", "steps",
                          "micro_batch", "grad_accum", "seq_len"):
                need(v > 0, f"{name}.{f.name} must be positive, got {v}")
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
    _check_ranges(cfg, need)
    need(0 < cfg.data.val_fraction < 1, f"data.val_fraction must be in (0, 1), got {cfg.data.val_fraction}")
    need(t.warmup_steps >= 0 and 0 <= t.min_lr_ratio <= 1, "train.warmup_steps >= 0 and 0 <= train.min_lr_ratio <= 1")
    g = cfg.guard
    need(g.spike_window >= 2, f"guard.spike_window must be >= 2, got {g.spike_window}")
    need(g.rollback_after >= 1 and g.rollback_window >= 1 and g.max_rollbacks >= 0,
         "guard.rollback_after and guard.rollback_window must be >= 1, guard.max_rollbacks >= 0")
    need(0 < g.rollback_lr_factor <= 1, f"guard.rollback_lr_factor must be in (0, 1], got {g.rollback_lr_factor}")
    need(cfg.checkpoint.keep_last >= 1, f"checkpoint.keep_last must be >= 1, got {cfg.checkpoint.keep_last}")
    need(cfg.checkpoint.timeout_s > 0, f"checkpoint.timeout_s must be positive, got {cfg.checkpoint.timeout_s}")
    p = cfg.parallel
    need(min(p.connect_timeout_s, p.timeout_s, p.step_timeout_s) > 0,
         "parallel.connect_timeout_s, parallel.timeout_s and parallel.step_timeout_s must be positive")



def _check_ranges(cfg: Config, need) -> None:
    """Numbers that are legal Python but would diverge, divide by zero or fail mid-run: refused at start
    (and by --dry-run), since a NaN learning rate or a zero interval is never what was meant."""
    def finite(name: str, v, low: float, strict: bool, fix: str) -> None:
        ok = v is not None and math.isfinite(v) and (v > low if strict else v >= low)
        need(ok, f"{name}={v} must be a finite number {'>' if strict else '>='} {low:g}: {fix}")

    m, e, t, d, p = cfg.model, cfg.moe, cfg.train, cfg.data, cfg.parallel
    finite("train.lr", t.lr, 0, True, "set the peak learning rate, e.g. --train.lr=3e-4")
    finite("train.eps", t.eps, 0, True, "AdamW's epsilon, e.g. 1e-8")
    finite("train.weight_decay", t.weight_decay, 0, False, "0 turns weight decay off")
    finite("train.grad_clip", t.grad_clip, 0, False, "0 turns clipping off")
    for name, beta in (("train.beta1", t.beta1), ("train.beta2", t.beta2)):
        need(0 <= beta < 1, f"{name}={beta} must be in [0, 1), e.g. 0.9 (beta1) or 0.95 (beta2)")
    finite("train.temperature", t.temperature, 0, False, "0 samples greedily")
    need(t.log_every >= 1, f"train.log_every={t.log_every} must be >= 1 (steps between logged rows)")
    for name, every in (("train.eval_every", t.eval_every), ("train.sample_every", t.sample_every),
                        ("checkpoint.every", cfg.checkpoint.every)):
        need(every >= 0, f"{name}={every} must be >= 0 (steps between them; 0 = off)")
    need(t.eval_batches >= 1 or not t.eval_every, f"train.eval_batches={t.eval_batches} must be >= 1 "
         f"(or set train.eval_every=0 to skip validation)")
    need(t.stop_after is None or t.stop_after >= 1, f"train.stop_after={t.stop_after} must be >= 1 or null")
    need(t.sample_top_k >= 0 and t.threads >= 0, "train.sample_top_k and train.threads must be >= 0 (0 = off / auto)")
    for name, v in (("model.rope_theta", m.rope_theta), ("model.norm_eps", m.norm_eps),
                    ("model.init_std", m.init_std), ("moe.routed_scaling_factor", e.routed_scaling_factor)):
        finite(name, v, 0, True, "see --help-config for its meaning and usual value")
    for name, v in (("moe.seq_aux_loss_coef", e.seq_aux_loss_coef), ("moe.z_loss_coef", e.z_loss_coef),
                    ("guard.spike_zscore", cfg.guard.spike_zscore)):
        finite(name, v, 0, False, "0 turns it off")
    if cfg.log.peak_tflops is not None:
        finite("log.peak_tflops", cfg.log.peak_tflops, 0, True, "the device's peak, or null for the built-in table")
    need(d.shuffle_buffer >= 1 and d.workers >= 0 and d.val_documents >= 0,
         "data.shuffle_buffer must be >= 1 (1 = the dataset's order), data.workers and data.val_documents >= 0")
    need(d.streams is None or d.streams >= 1, f"data.streams={d.streams} must be >= 1 or null (one per shard)")
    need(p.ddp_bucket_mb > 0 and p.ac_every_n >= 1, "parallel.ddp_bucket_mb must be > 0 and parallel.ac_every_n >= 1")


def validate_training(cfg: Config) -> None:
    """What only a training run needs of a config, checked by the trainer and `--dry-run` before anything
    is written (a model-only use, an export or a benchmark, never samples). Raises ConfigError."""
    t, m = cfg.train, cfg.model
    # a prompt longer than the rest keeps its last tokens: at least one must fit
    if t.sample_every and not 1 <= t.sample_tokens < m.max_seq_len:
        raise ConfigError(f"train.sample_tokens={t.sample_tokens} leaves no room for a prompt in model.max_seq_len="
                          f"{m.max_seq_len}: lower it below {m.max_seq_len} (or raise model.max_seq_len, or set "
                          f"train.sample_every=0)")
