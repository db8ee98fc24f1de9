"""The set-up decisions a GPU run makes, taken on the CPU with the device's capability and name patched:
precision, TF32, evaluation precision."""
import pytest
import torch

from dsmoe.config import ConfigError
from dsmoe.train.precision import eval_precision, resolve_precision

CUDA = torch.device("cuda")
GPUS = {"rtx4060": ((8, 9), "NVIDIA GeForce RTX 4060"), "t4": ((7, 5), "Tesla T4"),
        "h100": ((9, 0), "NVIDIA H100 80GB HBM3")}


@pytest.fixture
def gpu(monkeypatch):
    """Patches torch.cuda to report one of GPUS; returns the function that picks it."""
    def use(name: str):
        cap, label = GPUS[name]
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: label)
    return use


@pytest.mark.parametrize("name, tf32, expect", [("h100", True, "high"), ("h100", False, "highest"),
                                                ("rtx4060", True, "high"), ("t4", True, "highest")])
def test_fp32_sets_tf32_through_the_one_api(gpu, matmul_precision, name, tf32, expect):
    torch.set_float32_matmul_precision("highest")
    gpu(name)
    assert resolve_precision("fp32", CUDA, tf32) == "fp32"
    # the getter inductor reads raises after a mix of the legacy and per-backend APIs
    assert torch.get_float32_matmul_precision() == expect
    assert torch.backends.cuda.matmul.allow_tf32 == (expect == "high")
    assert torch.backends.cuda.matmul.fp32_precision == ("tf32" if expect == "high" else "ieee")


def test_a_bf16_checkpoint_evaluates_in_fp32_on_a_t4(gpu):
    gpu("t4")
    with pytest.raises(ConfigError, match="train.precision=fp16"):  # training in bf16 there is refused
        resolve_precision("bf16", CUDA)
    assert eval_precision("bf16", CUDA) == "fp32"
    assert eval_precision("fp16", CUDA) == "fp16" and eval_precision("auto", CUDA) == "fp16"
    gpu("rtx4060")
    assert eval_precision("bf16", CUDA) == "bf16"
    assert eval_precision("bf16", torch.device("cpu")) == "bf16"
