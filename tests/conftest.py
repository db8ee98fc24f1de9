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


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory, data_cache):
    """A checkpoint of the small test model after 3 steps, shared by the serving tests (read only)."""
    from dsmoe.checkpoint.file import latest_checkpoint
    from dsmoe.train.trainer import Trainer

    run = tmp_path_factory.mktemp("trained") / "run"
    Trainer(small_config(run, data_cache, "--train.steps=3")).fit()
    return str(latest_checkpoint(run))


def host_copies_of_two_async_saves(trainer) -> list[dict]:
    """The async stager's host buffers after each of two more saves ({id: buffer}): equal keys = reused."""
    cached = trainer.checkpoints.stager._state_dict_stager._cached_storage_mapping
    buffers = []
    for _ in range(2):
        trainer.checkpoints.save()
        trainer.checkpoints.wait()
        buffers.append({id(b): b for b in cached.values()})
    return buffers
