"""`make bench-gpu` runs on the CPU (`--cpu`: the same parts at tiny shapes), and the MFU peaks it reports against."""
import json
import math
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from dsmoe.metrics.throughput import PEAK_TFLOPS, gpu_key, measure_peak_tflops, peak_tflops, tf32_enabled

PARTS = ("env", "eager", "memory", "fp16", "fp8", "moe_layer", "cuda_tests", "peer_torchtitan", "compiled")
# most valuable first: the MFU figures, the CUDA tests, then the rest
ORDER = ["eager", "compiled", "cuda_tests", "fp16", "moe_layer", "fp8", "peer_torchtitan"]
TITLES = ("## Training", "## Peak memory vs the estimator", "## MoE layer vs dense FFN", "## CUDA tests",
          "## dsmoe vs torchtitan DeepSeek-V3")


def test_bench_gpu_cpu_run_leaves_every_part(tmp_path):
    # about a minute on two idle cores; the wider caps and budget let a busy host finish every part too
    cmd = [sys.executable, "benchmarks/gpu_suite.py", "--cpu", "--out", str(tmp_path), "--cap-scale", "3", "--budget", "280"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=330)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [json_path] = tmp_path.glob("cpu-*-bench-gpu.json")
    combined = json.loads(json_path.read_text())
    parts = combined["parts"]
    assert set(PARTS) <= set(parts)
    assert [r["part"] for r in combined["runs"]] == ORDER
    for name in PARTS:
        assert parts[name]["status"] in ("ok", "skipped"), (name, parts[name])
        if parts[name]["status"] == "skipped":
            assert parts[name]["reason"]
    for mode in ("eager", "fp16", "compiled"):
        r = parts[mode]
        assert r["status"] == "ok" and r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 and r["loss_finite"], (mode, r)
        assert r["losses"][-1] < r["losses"][0]
    assert parts["fp16"]["precision"] == "fp16" and parts["eager"]["precision"] == "bf16"
    assert "compile_blocks" in parts["compiled"]["note"]
    assert math.isfinite(parts["memory"]["activations_ratio"]) and parts["memory"]["measured_activations_gib"] > 0
    assert {r["impl"] for r in parts["moe_layer"]["rows"]} == {"dense", "loop", "grouped"}
    tests = parts["cuda_tests"]
    assert tests["skipped"] > 0 and tests["passed"] == tests["failed"] == 0  # no GPU here: every one skips
    if parts["peer_torchtitan"]["status"] == "ok":
        peer = parts["peer_torchtitan"]
        assert peer["function_check"]["agree"] and peer["speedup_tokens_per_s"] > 0
    else:
        assert parts["peer_torchtitan"]["reason"] == "torchtitan not installed"
    md = json_path.with_suffix(".md").read_text()
    for title in TITLES:
        assert title in md
    assert "| eager | bf16 |" in md and "| fp16 | fp16 |" in md


def test_a_part_killed_at_its_cap_keeps_the_cuda_tests_that_finished(tmp_path, monkeypatch, capsys):
    """pytest killed mid-test, as the cap's SIGKILL of its process group does (here the part kills its own
    group after two tests: no race against a timer): both outcomes and the cut-off test's name survive."""
    from benchmarks import gpu_parts, gpu_suite

    script = ("echo 'tests/test_cuda.py::test_a[bf16] PASSED  [ 10%]'; "
              "echo 'tests/test_cuda.py::test_b FAILED  [ 20%]'; "
              "printf 'tests/test_cuda.py::test_c '; kill -9 0")
    monkeypatch.setattr(gpu_parts, "cuda_tests_command", lambda work: ["sh", "-c", script])
    rc = gpu_suite.main(["--cpu", "--only", "cuda_tests", "--out", str(tmp_path)])
    [json_path] = tmp_path.glob("cpu-*-bench-gpu.json")
    combined = json.loads(json_path.read_text())
    tests = combined["parts"]["cuda_tests"]
    assert rc == 1 and combined["runs"][0]["status"] == "failed"
    assert tests["tests"] == {"tests/test_cuda.py::test_a[bf16]": "passed", "tests/test_cuda.py::test_b": "failed"}
    assert tests["passed"] == tests["failed"] == 1 and tests["cut_off"] == "tests/test_cuda.py::test_c"
    assert "FAILED tests/test_cuda.py::test_b" in json_path.with_suffix(".md").read_text()


def test_bench_gpu_refuses_to_run_without_a_gpu_unless_told():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    proc = subprocess.run([sys.executable, "benchmarks/gpu_suite.py"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "pass --cpu" in proc.stderr


def test_peak_table_tells_hopper_parts_apart():
    rows = {name: gpu_key(name) for name in ("NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA H100 NVL",
                                            "NVIDIA H200", "NVIDIA H200 NVL", "NVIDIA GH200 480GB")}
    assert len(set(rows.values())) == len(rows)  # six different rows
    assert gpu_key("NVIDIA H100", sm_count=114, mem_gib=79.6) == rows["NVIDIA H100 PCIe"]
    assert gpu_key("NVIDIA H100", sm_count=132, mem_gib=93.6) == rows["NVIDIA H100 NVL"]
    assert gpu_key("NVIDIA H100", sm_count=132, mem_gib=79.6) == rows["NVIDIA H100 80GB HBM3"]
    assert peak_tflops("NVIDIA H100 PCIe", "bf16") < peak_tflops("NVIDIA H100 NVL", "bf16") < peak_tflops("NVIDIA H200", "bf16")
    assert gpu_key("NVIDIA L40S") == "L40S" and gpu_key("NVIDIA L4") == "L4" and gpu_key("Some Future GPU") is None
    assert peak_tflops("cpu", "fp32") is None and peak_tflops("cpu", "fp32", override=1.5) == 1.5


def test_fp32_is_rated_at_the_tf32_peak_only_with_tf32_on(matmul_precision):
    torch.set_float32_matmul_precision("highest")
    assert not tf32_enabled() and peak_tflops("NVIDIA H100 80GB HBM3", "fp32") == PEAK_TFLOPS["H100 SXM"]["fp32"]
    torch.set_float32_matmul_precision("high")
    assert tf32_enabled() and peak_tflops("NVIDIA H100 80GB HBM3", "fp32") == PEAK_TFLOPS["H100 SXM"]["tf32"]
    assert peak_tflops("Tesla T4", "fp32") == PEAK_TFLOPS["T4"]["fp32"]  # no TF32 before Ampere


def test_measured_cpu_peak_errors_and_cache():
    peak = measure_peak_tflops(torch.float32, threads=1, max_n=256, budget_s=0.1)
    assert 0 < peak < math.inf and measure_peak_tflops(torch.float32, threads=1, max_n=256, budget_s=0.1) == peak
    with pytest.raises(ValueError, match="max_n"):
        measure_peak_tflops(torch.float32, max_n=16)
    with pytest.raises(ValueError, match="cannot time torch.uint16 matmuls on cpu"):
        measure_peak_tflops(torch.uint16, threads=1, max_n=256, budget_s=0.1)
