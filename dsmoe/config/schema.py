"""The configuration schema: one dataclass per section, each field with its one-line doc.

Loading, `--section.field=value` overrides and `--help-config` live in dsmoe/config/load.py; the
cross-field checks in dsmoe/config/validate.py.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

REPO_ROOT = Path(__file__).resolve().parents[2]
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
    expert_dtype: Optional[Literal["bf16", "fp16", "fp32"]] = doc(
        None, "routed experts' GEMM dtype; null = autocast's (else the activations'); bf16 under fp32 training: "
              "bf16 expert GEMMs on fp32 master weights (torchtitan's default)")


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
    gpu: Optional[str] = doc(None, "the GPU the run is written for (rtx4060, t4, h100): the memory dsmoe.estimate "
                                   "and --dry-run check against; null = the hardware profile's")
    tf32: bool = doc(True, "fp32 on sm_80+: matmuls on TF32 tensor cores; false: IEEE fp32 (reference runs)")
    seed: int = doc(1337, "seed for init, data order and sampling")
    compile: bool = doc(False, "torch.compile each transformer block (regional compilation)")
    fp8: bool = doc(False, "FP8 training (torchao float8) of the dense linears; CUDA sm_89+ with torchao only")
    threads: int = doc(0, "intra-op CPU threads per process; 0 = cores / processes on this machine "
                          "(OMP_NUM_THREADS wins)")
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
    streaming: Optional[bool] = doc(None, "read, tokenize and pack on the fly instead of preparing token files "
                                          "(null = on for hf: sources)")
    hf_data_files: Optional[str] = doc(None, "hf: data files (a glob) for builders like hf:parquet, hf:json")
    streams: Optional[int] = doc(None, "streaming: disjoint streams the corpus is split into (null = one per "
                                       "shard, at least the world size, at most 64); a resume may use at most "
                                       "this many ranks")
    shuffle_buffer: int = doc(1024, "streaming: rows shuffled together (1 = the dataset's order)")
    workers: int = doc(1, "streaming: tokenizer processes per rank (0 = in the training process)")
    val_documents: int = doc(1000, "streaming: validation documents (the first of stream 0, never trained on)")
    val_split: Optional[str] = doc(None, "streaming: validate on this split instead (nothing is held out)")


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
    connect_timeout_s: int = doc(60, "seconds the ranks have to form their process groups (a restart that "
                                     "cannot reconnect fails after this)")
    timeout_s: int = doc(600, "process-group timeout at start-up (seconds): data preparation, first steps")
    step_timeout_s: int = doc(300, "process-group timeout once the first steps are done (seconds)")


@dataclass
class CheckpointConfig:
    every: int = doc(100, "optimizer steps between checkpoints (0 = only at the end)")
    keep_last: int = doc(3, "checkpoints kept in the run directory")
    save_final: bool = doc(True, "write a checkpoint when training ends")
    format: Literal["auto", "file", "sharded"] = doc(
        "auto", "file (one step_N.pt, any layout resumes it), sharded (DCP directory, one shard per rank, "
                "any layout resumes it), auto = sharded at world > 1 or with async_save, else file")
    async_save: bool = doc(False, "write sharded checkpoints on a background thread (DCP async_save): training "
                                  "waits only for a host copy; the next save and the run's end wait for it")
    timeout_s: int = doc(1800, "seconds a checkpoint's collectives wait (ranks waiting for rank 0's write), "
                               "instead of parallel.step_timeout_s")


@dataclass
class LogConfig:
    rich: Literal["auto", "on", "off"] = doc("auto", "rich console: auto = only when stdout is a terminal")
    expert_stats: bool = doc(True, "log per-expert token counts and imbalance")
    peak_tflops: Optional[float] = doc(None, "the device's peak TFLOP/s for MFU; null = the built-in table")
    tensorboard: bool = doc(False, "also write TensorBoard event files to RUN_DIR/tensorboard (pip install tensorboard)")
    wandb: Literal["off", "on", "online", "offline", "disabled"] = doc(
        "off", "also log to Weights & Biases: on (its own mode choice), online, offline (no network) or off")
    wandb_project: str = doc("dsmoe", "W&B project; the run is named after run.dir")
    mlflow: Union[Literal["off", "on"], str] = doc(
        "off", "also log to MLflow: off, on (a file store in RUN_DIR/mlruns) or a tracking URI "
               "(sqlite:///mlflow.db, http://host:5000); pip install 'dsmoe[mlflow]'")
    mlflow_experiment: str = doc("dsmoe", "MLflow experiment; the run is named after run.dir")


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


@dataclass
class FaultConfig:
    """Fault injection, to rehearse what the guard, the checkpoints and restarts do."""
    nan_step: Optional[int] = doc(None, "make a module's output NaN at this step")
    nan_rank: int = doc(0, "the rank that gets the NaN")
    nan_module: str = doc("layers.0.ffn", "module path whose output becomes NaN")
    spike_step: Optional[int] = doc(None, "multiply the loss by 100 at this step")
    kill_step: Optional[int] = doc(None, "SIGKILL a rank at this step (once per run dir)")
    kill_rank: int = doc(0, "the rank killed")
    hang_step: Optional[int] = doc(None, "a rank stops answering collectives at this step")
    hang_rank: int = doc(1, "the rank that hangs")
    pause_step: Optional[int] = doc(None, "every rank waits at this step's start while RUN_DIR/.paused-step-K-rankR "
                                          "exists (tests signal a run at a known step)")
    kill_in_save: Optional[int] = doc(None, "kill rank 0 while it writes this step's checkpoint (once per run dir)")


@dataclass
class RunConfig:
    dir: str = doc("runs/tiny", "run directory: config, metrics, samples, checkpoints (one run lineage)")
    overwrite: bool = doc(False, "start fresh in a directory that holds another run: its files are moved "
                                 "aside to RUN_DIR.replaced-TIME, never deleted")
    allow_data_change: bool = doc(False, "resume although the data position's meaning changed (seq_len, "
                                         "source, tokenizer, seed): samples may be skipped or repeated")


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
    faults: FaultConfig = field(default_factory=FaultConfig)
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
