import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(False)
    yield


@pytest.fixture
def matmul_precision():
    """Restores torch's fp32 matmul precision (TF32 or IEEE) after a test that sets it."""
    before = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(before)


def small_config(run_dir, cache_dir, *overrides: str):
    """The tiny MoE shrunk for fast CPU tests: no eval, no samples, log every step."""
    from dsmoe.config import CONFIG_ROOT, load_config

    base = ["--model.d_model=64", "--model.n_layers=3", "--model.n_heads=2", "--model.ffn_hidden=128",
            "--moe.expert_hidden=32", "--moe.n_routed_experts=4", "--moe.top_k=2",
            "--attention.kv_lora_rank=32", "--attention.qk_nope_head_dim=16", "--attention.qk_rope_head_dim=8",
            "--attention.v_head_dim=16", "--train.seq_len=32", "--train.micro_batch=4", "--train.grad_accum=2",
            "--train.steps=6", "--train.warmup_steps=2", "--train.log_every=1", "--train.eval_every=0",
            "--train.sample_every=0", "--checkpoint.every=0", f"--run.dir={run_dir}", f"--data.cache_dir={cache_dir}",
            "--log.rich=off", "--train.device=cpu"]
    return load_config(CONFIG_ROOT / "models" / "tiny.yaml", base + list(overrides))


def rel_err(a: dict, b: dict) -> float:
    """Relative L2 distance of two state dicts over the reference `b`'s tensors."""
    num = sum((a[k].double() - b[k].double()).pow(2).sum() for k in b)
    den = sum(b[k].double().pow(2).sum() for k in b)
    return float((num / den).sqrt())


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data-cache"))
