"""The set-up decisions a GPU run makes, taken on the CPU with the device's capability and name patched:
each hardware profile's precision, autocast, GradScaler, TF32, grouped GEMM, process-group backend, FP8
and memory margin; TF32 through one API; evaluation precision; FP8 init; the memory-margin warning.

Fake CUDA tensors (FakeTensorMode) do not get far in a CPU-only torch: the embedding and any `.to()` ask
for a CUDA device guard, which aborts the process. So the decisions are taken through the functions the
trainer calls, with torch.cuda's queries patched.
"""
import importlib.util

import pytest
import torch

from conftest import small_config
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
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)  # T4 says so too
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


class Float8Linear(torch.nn.Linear):  # named as torchao's, which apply_fp8 counts
    """Like torchao's Float8Linear.from_float: a new module with the old one's parameters, no other attribute."""

    @classmethod
    def from_float(cls, mod):
        with torch.device("meta"):
            new = cls(mod.in_features, mod.out_features, bias=False)
        new.weight = mod.weight
        return new


def _stand_in_convert(model, module_filter_fn):
    for fqn, mod in list(model.named_modules()):
        if module_filter_fn(mod, fqn):
            parent, _, child = fqn.rpartition(".")
            setattr(model.get_submodule(parent), child, Float8Linear.from_float(mod))


@pytest.mark.parametrize("convert", ["torchao", "stand-in"])
def test_an_fp8_model_starts_from_the_bf16_models_weights(gpu, monkeypatch, convert):
    import sys
    import types

    from dsmoe.config import CONFIG_ROOT, load_config
    from dsmoe.model import Transformer
    from dsmoe.train.precision import apply_fp8

    if convert == "torchao":
        pytest.importorskip("torchao.float8")
    else:
        monkeypatch.setitem(sys.modules, "torchao", types.ModuleType("torchao"))
        monkeypatch.setitem(sys.modules, "torchao.float8",
                            types.SimpleNamespace(convert_to_float8_training=_stand_in_convert))
    gpu("h100")
    cfg = load_config(CONFIG_ROOT / "models" / "tiny.yaml", ["--model.n_layers=4"])
    models = []
    for fp8 in (False, True):
        with torch.device("meta"):
            model = Transformer(cfg, 320)
        if fp8:
            assert apply_fp8(model, CUDA) > 0  # the model's own path, as the trainer calls it
        model.to_empty(device="cpu")
        model.tie_weights()
        model.init_weights(0)
        models.append(model)
    bf16, fp8 = (m.state_dict() for m in models)
    swapped = [n for n, m in models[1].named_modules() if "Float8Linear" in type(m).__name__]
    assert any(n.endswith(".wo") for n in swapped) and any(n.endswith("w_down") for n in swapped), swapped
    assert bf16.keys() == fp8.keys()
    for name in bf16:
        torch.testing.assert_close(fp8[name], bf16[name], rtol=0, atol=0, msg=name)
    # and the residual projections really are the scaled ones: std 0.02 / sqrt(2 * 4)
    wo = bf16["layers.1.attn.wo.weight"]
    assert abs(wo.std().item() - cfg.model.init_std / 8 ** 0.5) < 0.2 * cfg.model.init_std / 8 ** 0.5


@pytest.mark.parametrize("free_gib, warns", [(7.4, False), (6.4, True)])
def test_a_thin_memory_margin_on_the_gpu_warns_with_the_fix(gpu, monkeypatch, free_gib, warns):
    """rtx4060.yaml plans 6.16 GiB of an 8 GiB card: 7.4 GiB free leaves over 10%, 6.4 GiB does not."""
    from dsmoe.config import CONFIG_ROOT, load_config
    from dsmoe.tools.fit import device_margin_warning

    gpu("rtx4060")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(free_gib * 2**30), 8188 * 2**20))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    cfg = load_config(CONFIG_ROOT / "hardware" / "rtx4060.yaml", [])
    text = device_margin_warning(cfg, 1, 1, CUDA)
    assert (text is not None) == warns, text
    if warns:
        assert "RTX 4060" in text and "6.16 GiB" in text and "Fixes: expert parallelism: --parallel.ep" in text, text
    assert device_margin_warning(cfg, 1, 1, torch.device("cpu")) is None


# profile -> (GPU, precision, autocast dtype, GradScaler on, fp8 allowed); GPUs launched from PROFILES
PROFILE_DECISIONS = {
    "cpu": (None, "fp32", None, False, False),
    "rtx4060": ("rtx4060", "bf16", torch.bfloat16, False, True),
    "g4dn_12xlarge": ("t4", "fp16", torch.float16, True, False),
    "h100_node": ("h100", "bf16", torch.bfloat16, False, True),
    "h100_multinode": ("h100", "bf16", torch.bfloat16, False, True),
}


@pytest.mark.parametrize("profile", sorted(PROFILE_DECISIONS))
def test_each_hardware_profile_takes_the_paths_its_gpu_has(profile, gpu, monkeypatch, matmul_precision):
    from dsmoe.config import CONFIG_ROOT, load_config
    from dsmoe.tools.fit import GPU_MEMORY_MIB, PROFILES, device_margin_warning
    from dsmoe.model.grouped_mm import GROUPED_MM_DTYPES
    from dsmoe.model.moe import GroupedExperts
    from dsmoe.parallel.mesh import process_group_backend
    from dsmoe.train.precision import apply_fp8, autocast, grad_scaler

    assert {p.stem for p in (CONFIG_ROOT / "hardware").glob("*.yaml")} == set(PROFILE_DECISIONS)  # none unchecked
    name, precision, dtype, scaler, fp8 = PROFILE_DECISIONS[profile]
    cfg = load_config(CONFIG_ROOT / "hardware" / f"{profile}.yaml", [])
    device = torch.device("cpu") if name is None else CUDA
    if name is not None:
        gpu(name)
    torch.set_float32_matmul_precision("highest")
    assert resolve_precision(cfg.train.precision, device, cfg.train.tf32) == precision
    assert resolve_precision("auto", device) == precision  # the profile asks for what auto would pick
    assert torch.get_float32_matmul_precision() == "highest"  # TF32 is fp32's business only
    ctx = autocast(precision, device)
    assert getattr(ctx, "fast_dtype", None) == dtype and (dtype is None or ctx.device == device.type)
    assert grad_scaler(precision, device).is_enabled() == scaler
    if name is not None:  # fp32 there would run on TF32 tensor cores from sm_80 (not on the T4)
        resolve_precision("fp32", device)
        assert torch.get_float32_matmul_precision() == ("high" if GPUS[name][0] >= (8, 0) else "highest")
    # routed experts: one grouped GEMM in the compute dtype (aten's per-group loop where it has no kernel)
    m = cfg.model.d_model
    experts = GroupedExperts(cfg.moe.n_routed_experts, m, cfg.moe.expert_hidden)
    compute = dtype or torch.float32
    assert compute in GROUPED_MM_DTYPES and experts.fallback_reason(torch.empty(8, m, dtype=compute)) is None
    world, ep = PROFILES[profile][1], cfg.parallel.ep
    assert process_group_backend(device) == ("gloo" if name is None else "cpu:gloo,cuda:nccl")
    if name is None:
        return
    with torch.device("meta"):
        linear = torch.nn.Sequential(torch.nn.Linear(64, 64))
    if fp8:
        if importlib.util.find_spec("torchao") is not None:
            assert apply_fp8(linear, device) == 1
    else:
        with pytest.raises(ConfigError, match="8.9"):
            apply_fp8(linear, device)
    # the whole card free: the planned peak leaves the 10% margin the run checks for at start
    total = GPU_MEMORY_MIB[PROFILES[profile][0]] * 2**20
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (total, total))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    assert device_margin_warning(cfg, world, ep, device) is None


def test_the_run_prints_the_margin_warning_at_start(tmp_path, data_cache, monkeypatch, capsys):
    from dsmoe.train import trainer as trainer_mod

    seen = []

    def margin(cfg, world, ep, device):
        seen.append((world, ep, device.type))
        return "estimated peak 7.00 GiB leaves 0.10 GiB. Fixes: --parallel.activation_checkpointing=full"

    monkeypatch.setattr(trainer_mod, "device_margin_warning", margin)
    trainer_mod.Trainer(small_config(tmp_path, data_cache, "--train.steps=1")).fit()
    assert seen == [(1, 1, "cpu")]
    assert "warning: estimated peak 7.00 GiB leaves 0.10 GiB. Fixes:" in capsys.readouterr().err
