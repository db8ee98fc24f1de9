"""The memory estimator against exact counts and against what a real forward pass saves on CPU."""
import contextlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsmoe.config import CONFIG_ROOT, load_config
from dsmoe.estimate import main
from dsmoe.tools.fit import GPU_MEMORY_MIB, PROFILES, memory_budget, with_sections
from dsmoe.metrics.memory import measure_saved_activation_bytes
from dsmoe.tools.memory import GiB, estimate_memory, param_stats, predicted_saved_bytes
from dsmoe.tools.model import vocab_size_of
from dsmoe.model import Transformer, param_breakdown
from dsmoe.parallel.wrap import block_fn_for
from dsmoe.train.optim import build_optimizer

REPO = Path(__file__).resolve().parents[1]
MODELS = CONFIG_ROOT / "models"
HARDWARE = CONFIG_ROOT / "hardware"

# (preset, overrides): the tiny CPU model and two mid-size shapes (GQA + capacity + a 50304 vocabulary;
# MLA with a query bottleneck through CPU's math attention, at full width but 3 of its 12 layers)
CASES = {
    "tiny": ("tiny", {"train": {"micro_batch": 8, "seq_len": 128}}),
    "moe-512x8": ("moe-512x8", {"train": {"micro_batch": 2, "seq_len": 256}}),
    "v3-tiny-3L": ("v3-tiny", {"train": {"micro_batch": 2, "seq_len": 128}, "model": {"n_layers": 3}}),
}
_models: dict = {}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These forwards are small: one thread avoids OpenMP spin-waits when the cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _model(case: str):
    if case not in _models:
        preset, over = CASES[case]
        cfg = load_config(MODELS / f"{preset}.yaml", {**over, "train": {**over["train"], "device": "cpu"}})
        torch.manual_seed(0)
        model = Transformer(cfg, vocab_size_of(cfg))
        V, (B, S) = vocab_size_of(cfg), (cfg.train.micro_batch, cfg.train.seq_len)
        batch = (torch.randint(0, V, (B, S)), torch.randint(0, V, (B, S)))
        _models[case] = (cfg, model, batch)
    return _models[case]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("policy", ["none", "full"])
@pytest.mark.parametrize("case", list(CASES))
def test_activation_estimate_matches_measured_saved_bytes(case, policy, precision):
    cfg, model, batch = _model(case)
    cfg = with_sections(cfg, parallel={"activation_checkpointing": policy}, train={"precision": precision})
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    with ctx:
        measured = measure_saved_activation_bytes(model, batch, block_fn_for(cfg.parallel))
    predicted = predicted_saved_bytes(cfg, device="cpu")
    err = (predicted - measured) / measured
    print(f"{case} {policy} {precision}: predicted {predicted:,} measured {measured:,} error {err:+.2%}")
    assert predicted == measured, f"the ledger in dsmoe/tools/memory.py no longer follows the model ({err:+.3%})"


def test_full_checkpointing_keeps_block_inputs_only():
    cfg, model, batch = _model("tiny")
    ckpt = with_sections(cfg, parallel={"activation_checkpointing": "full"})
    none = measure_saved_activation_bytes(model, batch)
    full = measure_saved_activation_bytes(model, batch, block_fn_for(ckpt.parallel))
    B, S, d, L = cfg.train.micro_batch, cfg.train.seq_len, cfg.model.d_model, cfg.model.n_layers
    assert full < none / 3
    assert full >= L * B * S * d * 4  # the fp32 block inputs
    est = estimate_memory(ckpt, device="cpu")
    assert est["activations_full"] < est["activations_none"]
    assert est["activations"] == est["activations_full"]


def test_parameters_gradients_optimizer_bytes_are_exact():
    cfg, model, batch = _model("tiny")
    est = estimate_memory(cfg, device="cpu")
    params = list(model.parameters())
    assert est["params"] == sum(p.numel() * p.element_size() for p in params)
    opt = build_optimizer(model, cfg.train)
    model(*batch).loss.backward()
    assert est["grads"] == sum(p.grad.numel() * p.grad.element_size() for p in params)
    opt.step()
    moments = sum(s[k].numel() * s[k].element_size() for s in opt.state.values() for k in ("exp_avg", "exp_avg_sq"))
    assert est["optimizer"] == moments == 2 * est["params"]
    opt.zero_grad(set_to_none=True)
    # bf16 autocast keeps fp32 master weights: 16 bytes per parameter of persistent state
    big = load_config(MODELS / "smollm2-135m-moe.yaml", {"train": {"precision": "bf16"}})
    total = param_breakdown(_meta(big))["total"]
    est = estimate_memory(big, device="cuda")
    assert est["persistent"] == 16 * total and est["n_params"] == total


def _meta(cfg):
    with torch.device("meta"):
        return Transformer(cfg, vocab_size_of(cfg))


def test_expert_parallelism_divides_expert_bytes():
    cfg = load_config(MODELS / "v3-mini.yaml", {"train": {"micro_batch": 1, "seq_len": 512}})
    routed = param_breakdown(_meta(cfg))["moe_routed"]
    one, eight = estimate_memory(cfg, world=8, ep=1), estimate_memory(cfg, world=8, ep=8)
    assert one["params"] - eight["params"] == routed * 4 * 7 // 8
    assert one["optimizer"] - eight["optimizer"] == routed * 8 * 7 // 8
    assert param_stats(cfg, 8)["n_params"] == param_stats(cfg, 1)["n_params"] - routed * 7 // 8
    assert eight["weight_casts"] < one["weight_casts"]  # per-layer bf16 expert copies shrink too
    with pytest.raises(ValueError):
        estimate_memory(cfg, world=8, ep=3)


def test_cli_on_rtx4060_profile_gives_a_verdict():
    out = subprocess.run([sys.executable, "-m", "dsmoe.estimate", "configs/hardware/rtx4060.yaml"], cwd=REPO,
                         capture_output=True, text=True, env={**os.environ, "COLUMNS": "160"}, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "fits:" in out.stdout and "rtx4060" in out.stdout
    for row in ("parameters", "gradients", "optimizer state", "activations (no ckpt)", "activations (full ckpt)",
                "loss (chunked logits)", "peak, checkpointing full"):
        assert row in out.stdout


def test_a_config_that_cannot_fit_gets_a_verdict_and_fixes(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    rc = main(["configs/hardware/rtx4060.yaml", "--train.micro_batch=8", "--parallel.activation_checkpointing=none"])
    out = capsys.readouterr().out
    assert rc == 1 and "does not fit" in out
    assert "--train.micro_batch=" in out and "--parallel.activation_checkpointing=full" in out
    # a model whose weights and optimizer state alone overflow the GPU: expert parallelism / sharding
    rc = main([str(MODELS / "v3-mini.yaml"), "--gpu-mem-gb", "80", "--world", "8"])
    out = capsys.readouterr().out
    assert rc == 1 and "does not fit" in out and "--parallel.ep" in out and "launch/train_fsdp.py" in out


def test_a_run_file_written_for_h100s_knows_its_gpu(capsys, monkeypatch):
    """The README's `python -m dsmoe.estimate configs/runs/v3-mini-h100-fsdp.yaml` (without --simulate):
    train.gpu in the run file gives the budget; a printed report exits 0."""
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["configs/runs/v3-mini-h100-fsdp.yaml"]) == 0
    out = capsys.readouterr().out
    assert "fits: " in out and "usable on h100" in out and "world 8, ep 8" in out


def test_no_known_gpu_memory_is_fits_unknown_not_a_failure(capsys):
    assert main([str(MODELS / "tiny.yaml"), "--train.device=cuda"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "fits: unknown" in out and "set train.gpu" in out and "--gpu-mem-gb G to python -m dsmoe.estimate" in out
    assert main([str(MODELS / "tiny.yaml"), "--train.gpu=a100"]) == 2
    out = " ".join(capsys.readouterr().out.split())
    assert "train.gpu='a100' is not a known GPU: one of rtx4060, t4, h100" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="plans what runs on a CPU-only machine")
def test_dry_run_on_a_cpu_machine_plans_the_cpu_run(tmp_path):
    """`python launch/train.py --dry-run`: the device and precision the run will really use here (CPU
    fp32, not CUDA autocast), the data, the schedule and the run directory."""
    out = subprocess.run([sys.executable, "launch/train.py", "--dry-run", f"--run.dir={tmp_path}"], cwd=REPO,
                         capture_output=True, text=True, env={**os.environ, "COLUMNS": "250"}, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert "device      cpu (train.device=auto: no CUDA device here)" in text
    assert "precision   auto -> fp32" in text and "tiny: cpu, fp32, world 1" in text and "bf16/fp16 autocast" not in text
    assert "data        shakespeare (byte tokenizer" in text
    assert "schedule    300 steps (614.4k tokens), cosine from peak lr 0.003 after 30 warmup steps" in text
    assert f"run dir     {tmp_path} (new)" in text and "fits: " in text


def test_dry_run_suggests_only_flags_train_accepts(capsys, monkeypatch):
    """A plan that does not fit suggests fixes as flags launch/train.py takes (config overrides)."""
    from dsmoe.train import plan

    monkeypatch.setenv("COLUMNS", "250")
    monkeypatch.setattr(plan, "memory_budget", lambda gpu: (0.4 * GiB, "a small test budget"))
    cfg = load_config(MODELS / "tiny.yaml", ["--train.device=cpu", "--train.micro_batch=64", "--train.seq_len=256"])
    assert plan.print_plan(cfg, world=1) is False
    out = capsys.readouterr().out
    hints = [line for line in out.splitlines() if line.startswith("  - ")]
    assert hints, out
    for hint in hints:
        flags = re.findall(r"--[a-z_]+\.[a-z_]+(?:=\S+| \d+)", hint)
        assert flags, hint
        load_config(MODELS / "tiny.yaml", [f.rstrip(")") for flag in flags for f in flag.split(" ")])
    assert "--gpu-mem-gb" not in out.replace("--gpu-mem-gb G to python -m dsmoe.estimate", "")


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_hardware_profiles_load_fit_and_state_their_estimate(name):
    path = HARDWARE / f"{name}.yaml"
    cfg = load_config(path)
    assert cfg.train.device == ("cpu" if name == "cpu" else "cuda")
    assert cfg.train.precision == {"cpu": "fp32", "g4dn_12xlarge": "fp16"}.get(name, "bf16")
    gpu, world = PROFILES[name]
    est = estimate_memory(cfg, world=world, device="cpu" if name == "cpu" else "cuda")
    if gpu != "cpu":
        usable, _ = memory_budget(gpu)
        assert est["total"] <= usable, f"{name} does not fit its GPU"
    header = path.read_text()
    stated = re.search(r"Expected[^:]*:\s*~?([\d.]+) GiB", header)
    assert stated, f"{path} must state its expected per-GPU memory"
    assert abs(float(stated.group(1)) - est["total"] / GiB) < 0.01, (name, est["total"] / GiB)
    if gpu in GPU_MEMORY_MIB:
        assert f"{GPU_MEMORY_MIB[gpu]} MiB" in header


def test_launch_scripts_are_executable_shell():
    for name in ("cpu.sh", "rtx4060.sh", "g4dn_12xlarge.sh", "h100_node.sh", "slurm_h100_multinode.sbatch"):
        path = REPO / "launch" / name
        assert os.access(path, os.X_OK), f"{path} is not executable"
        assert "set -euo pipefail" in path.read_text()
        subprocess.run(["bash", "-n", str(path)], check=True)
    assert "--nproc_per_node 4" in (REPO / "launch" / "g4dn_12xlarge.sh").read_text()
    sbatch = (REPO / "launch" / "slurm_h100_multinode.sbatch").read_text()
    for needle in ("#SBATCH --nodes", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                   "scontrol show hostnames", "--rdzv-backend c10d", "--resume auto"):
        assert needle in sbatch
