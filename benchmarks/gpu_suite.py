"""`make bench-gpu`: the GPU measurements of dsmoe in one prepared run of at most 8 minutes on one H100/H200.

    PYTHONPATH=. python benchmarks/gpu_suite.py           # on the GPU machine (make bench-gpu)
    python benchmarks/gpu_suite.py --cpu                   # the same parts on the CPU at tiny shapes, < 2 min
    python benchmarks/gpu_suite.py --only eager moe_layer  # some parts
    python benchmarks/gpu_suite.py --wheels .whl           # first pip-install the wheels there (torchao, torchtitan)

Parts, most valuable first, each in its own process under its own time cap (the caps add up to the 450 s
`--budget`; a part that no longer fits is recorded as skipped), continuing past a failed one:

    env               the GPU, its SM count and memory, torch/CUDA, the peak table row the MFU is taken against
    eager             smollm2-moe-576x30, seq 2048 x 8, eager bf16: tokens/s, MFU, peak memory vs the estimator
    compiled          the same training with one torch.compile per block
    cuda_tests        pytest -m cuda, each test's outcome recorded as its line arrives
    fp16              the same training in fp16 + GradScaler (the T4 path)
    moe_layer         one MoE layer vs its dense-equivalent FFN, grouped GEMM vs the per-expert loop
    fp8               the same training with torchao float8 (skipped without it or below sm_89)
    peer_torchtitan   dsmoe vs torchtitan's DeepSeek-V3, interleaved (skipped without torchtitan)

benchmarks/gpu_parts.py holds the parts. Results: benchmarks/results/<device>-<date>-bench-gpu.json and .md
(`--out DIR` elsewhere), both rewritten after every part, so a run cut short still leaves what finished; a
part killed at its cap keeps what it wrote before (the CUDA tests that finished).
Exit status 1 when a part failed or ran out of its time. docs/gpu.md says how to run it in one device call.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, Optional

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.common import RESULTS_DIR, device_name  # noqa: E402
from benchmarks.suite import _f, _table, md_moe, md_titan  # noqa: E402

# key, title, cap on a GPU (s), cap with --cpu (s), the result keys it writes; most valuable first
PARTS = (
    ("eager", "Training, eager bf16 (MFU, memory vs the estimator)", 80, 30, ("eager", "memory")),
    ("compiled", "Training with torch.compile per block", 120, 30, ("compiled",)),
    ("cuda_tests", "CUDA tests (pytest -m cuda)", 110, 30, ("cuda_tests",)),
    ("fp16", "Training, fp16 + GradScaler", 35, 20, ("fp16",)),
    ("moe_layer", "MoE layer vs dense FFN, grouped vs loop", 25, 20, ("moe_layer",)),
    ("fp8", "Training, FP8 (torchao float8)", 40, 20, ("fp8",)),
    ("peer_torchtitan", "dsmoe vs torchtitan DeepSeek-V3", 40, 30, ("peer_torchtitan",)),
)
TRAIN_PARTS = ("eager", "compiled", "fp16", "fp8")
BUDGET_S = {"gpu": 450, "cpu": 200}
MIN_PART_S = 20  # a part with less time than this left is not started


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="run on the CPU at tiny shapes (the test suite runs this)")
    p.add_argument("--only", nargs="+", choices=[k for k, *_ in PARTS], default=None, help="run only these parts")
    p.add_argument("--budget", type=float, default=None, help="seconds for all parts (default 450; 200 with --cpu)")
    p.add_argument("--cap-scale", type=float, default=1.0,
                   help="multiply every part's time cap (a slower or busy machine)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="where the JSON and markdown go")
    p.add_argument("--wheels", type=Path, default=None,
                   help="pip-install every wheel there (no deps, no index) into a temporary folder first "
                        "(default: .whl if it exists)")
    p.add_argument("--part", default=None, help=argparse.SUPPRESS)  # internal: run one part in this process
    p.add_argument("--work", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.budget = args.budget or BUDGET_S["cpu" if args.cpu else "gpu"]
    if not args.cpu and not args.part and not torch.cuda.is_available():
        p.error("no CUDA device is visible: run on the GPU machine, or pass --cpu for the CPU smoke run")
    if args.wheels is None and (REPO_ROOT / ".whl").is_dir():
        args.wheels = REPO_ROOT / ".whl"
    return args


# ------------------------------------------------------------------------------------------ one part


def run_part(args) -> int:
    """In the part's own process: run it, write each result key to WORK/parts/KEY.json as soon as it is done."""
    from benchmarks import gpu_parts

    parts_dir = args.work / "parts"
    parts_dir.mkdir(parents=True, exist_ok=True)

    def save(results: dict) -> None:
        for key, value in results.items():
            (parts_dir / f"{key}.json").write_text(json.dumps(value, indent=2, default=str) + "\n")

    if args.part in TRAIN_PARTS:
        try:
            save(gpu_parts.train_mode(args.part, args.cpu, args.work))
        except Exception as e:  # noqa: BLE001 - recorded as the part's result
            save({args.part: {"status": "failed", "error": repr(e), "traceback": traceback.format_exc()[-3000:]}})
            print(traceback.format_exc(), flush=True)
            return 1
    elif args.part == "moe_layer":
        save({"moe_layer": gpu_parts.moe_layer(args.cpu)})
    elif args.part == "peer_torchtitan":
        save({"peer_torchtitan": gpu_parts.peer(args.cpu)})
    else:
        raise SystemExit(f"unknown part {args.part!r}")
    return 0


def part_command(key: str, args, work: Path) -> list[str]:
    from benchmarks import gpu_parts

    if key == "cuda_tests":  # pytest is the part's process
        return gpu_parts.cuda_tests_command(work)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--part", key, "--work", str(work)]
    return cmd + (["--cpu"] if args.cpu else [])


def spawn(key: str, cmd: list[str], cap: float, env: dict, on_line: Optional[Callable[[str], None]] = None):
    """Run one part in a new process group (killed whole at the cap), passing each output line to `on_line`
    as it arrives; (return code or 'timeout', output tail)."""
    print(f"\n=== bench-gpu: {key} (cap {cap:.0f} s)", flush=True)
    lines: list[str] = []
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    killed = []

    def on_alarm(*_):
        killed.append(True)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # it ended as the alarm went off
            pass

    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, cap)
    try:
        for line in proc.stdout:
            sys.stdout.write(line)
            lines.append(line)
            if on_line is not None:
                on_line(line)
        rc = proc.wait()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    return ("timeout" if killed else rc), "".join(lines)[-3000:]


def install_wheels(folder: Path, work: Path) -> dict:
    """pip install --no-deps --no-index every wheel in `folder` (never a torch wheel) into WORK/site."""
    wheels = sorted(w for w in folder.glob("*.whl") if not w.name.lower().startswith("torch-"))
    if not wheels:
        return {"status": "skipped", "reason": f"no wheels in {folder}"}
    site = work / "site"
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--target",
           str(site), *map(str, wheels)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    return {"status": "ok" if proc.returncode == 0 else "failed", "site": str(site),
            "wheels": [w.name for w in wheels], "output_tail": (proc.stdout + proc.stderr)[-1000:]}


# ------------------------------------------------------------------------------------------ markdown


def _skip(res: dict) -> str:
    return f"_{res.get('status')}_: {res.get('reason') or res.get('error') or ''}".rstrip(": ")


def md_train(parts: dict) -> list[str]:
    rows, eager = [], parts.get("eager") or {}
    for mode in ("eager", "fp16", "fp8", "compiled"):
        r = parts.get(mode)
        if r is None:
            continue
        if r.get("status") != "ok":
            rows.append([mode, _skip(r), "", "", "", "", "", "", ""])
            continue
        vs = r["tokens_per_s"] / eager["tokens_per_s"] if eager.get("status") == "ok" else None
        rows.append([mode, r["precision"], _f(r["tokens_per_s"], ",.0f"), _f(vs, ".2f"), _f(r.get("mfu"), ".1%"),
                     _f(r["step_ms"]), _f(r.get("mem_gb"), ".1f"), _f(r["final_loss"], ".4f"), r.get("note") or ""])
    if not rows:
        return []
    shape = next((r for r in (parts.get(m) for m in ("eager", "compiled")) if r and r.get("status") == "ok"), {})
    head = [f"{shape.get('tokens_per_step', '?')} tokens per step, {shape.get('steps', '?')} steps, medians of the "
            f"log intervals after the first; MFU against {shape.get('peak_tflops') or 'the measured CPU matmul peak'}"
            f"{' TFLOP/s' if shape.get('peak_tflops') else ''}", ""]
    return head + _table(["mode", "precision", "tokens/s", "speed-up vs eager", "MFU", "step ms", "peak GiB", "final loss",
                          "note"], rows)


def md_memory(res: dict) -> list[str]:
    rows = [["activations kept by one forward", _f(res["measured_activations_gib"], ".3g"),
             _f(res["estimate_activations_gib"], ".3g"), _f(res["activations_ratio"], ".3f")]]
    if "measured_peak_gib" in res:
        rows.insert(0, ["peak allocated in training", _f(res["measured_peak_gib"], ".3g"),
                        _f(res["estimate_total_gib"], ".3g"), _f(res["peak_ratio"], ".3f")])
    return _table(["GiB", "measured", "estimate", "measured / estimate"], rows)


def md_tests(res: dict) -> list[str]:
    out = [f"{res['passed']} passed, {res['failed']} failed, {res['skipped']} skipped (rc {res['returncode']}, "
           f"{res['status']})"]
    out += [f"- FAILED {name}" for name in res.get("failures", [])]
    return out + ([f"- cut off while running {res['cut_off']}"] if res.get("cut_off") else [])


SECTIONS = (  # title, result key(s), renderer, whether it also renders a result that is not ok
    ("Training", None, md_train, False),
    ("Peak memory vs the estimator (eager run)", "memory", md_memory, False),
    ("CUDA tests", "cuda_tests", md_tests, True),  # the tests that finished before a failure or the cap
    ("MoE layer vs dense FFN, grouped vs loop", "moe_layer", md_moe, False),
    ("dsmoe vs torchtitan DeepSeek-V3", "peer_torchtitan", md_titan, False),
)


def markdown(combined: dict) -> str:
    e = combined["parts"].get("env", {})
    where = (f"{e.get('gpu')} ({e.get('capability')}, {e.get('sm_count')} SMs, {_f(e.get('memory_gib'), '.0f')} GiB), "
             f"CUDA {e.get('cuda')}, peak-table row {e.get('peak_row')}: bf16 {e.get('peak_bf16_tflops')} TFLOP/s"
             if combined["mode"] == "gpu" else "CPU smoke run at tiny shapes")
    out = [f"# dsmoe bench-gpu: {combined.get('device')}, {combined['date']}", "",
           f"{where}; torch {e.get('torch')}; torchao {e.get('torchao')}, torchtitan {e.get('torchtitan')}; "
           f"{combined.get('wall_s', 0):.0f} s of the {combined['budget_s']:.0f} s budget", ""]
    out += _table(["part", "status", "wall s", "cap s"],
                  [[r["part"], r["status"] if r["status"] != "skipped" else _skip(r), _f(r.get("wall_s")),
                    _f(r.get("cap_s"), ".0f")] for r in combined["runs"]])
    for title, key, render, partial in SECTIONS:
        res = combined["parts"] if key is None else combined["parts"].get(key)
        if res is None:
            continue
        try:
            lines = render(res) if key is None or partial or res.get("status") == "ok" else [_skip(res)]
        except (KeyError, TypeError, ValueError) as err:  # one part's JSON in an unexpected shape
            lines = [f"_could not summarise: {err!r}_"]
        if lines:
            out += ["", f"## {title}", "", *lines]
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------ the run


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.part:
        return run_part(args)
    from benchmarks import gpu_parts

    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="dsmoe-bench-gpu-"))
    (work / "parts").mkdir()
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    paths = [str(REPO_ROOT)]
    combined = {"suite": "dsmoe-bench-gpu", "mode": "cpu" if args.cpu else "gpu", "date": _dt.date.today().isoformat(),
                "budget_s": args.budget, "parts": {}, "runs": []}
    if args.wheels:
        combined["parts"]["wheels"] = wheels = install_wheels(args.wheels, work)
        if wheels["status"] == "ok":
            paths.insert(0, wheels["site"])
            sys.path.insert(0, wheels["site"])
    env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in [os.environ.get("PYTHONPATH")] if p])
    combined["parts"]["env"] = gpu_parts.env(args.cpu)
    combined["device"] = combined["parts"]["env"]["device"]
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{device_name('cpu' if args.cpu else 'cuda')}-{combined['date']}-bench-gpu"

    def write() -> None:
        combined["wall_s"] = round(time.perf_counter() - t0, 1)
        stem.with_suffix(".json").write_text(json.dumps(combined, indent=2, default=str) + "\n")
        stem.with_suffix(".md").write_text(markdown(combined))

    write()
    for key, title, gpu_cap, cpu_cap, result_keys in PARTS:
        if args.only and key not in args.only:
            continue
        left = args.budget - (time.perf_counter() - t0)
        run = {"part": key, "title": title, "keys": list(result_keys)}
        if left < MIN_PART_S:
            run.update(status="skipped", reason=f"out of time ({left:.0f} s of the {args.budget:.0f} s budget left)")
            for rk in result_keys:
                combined["parts"][rk] = {"status": "skipped", "reason": run["reason"]}
        else:
            cap = min((cpu_cap if args.cpu else gpu_cap) * args.cap_scale, left)
            p0 = time.perf_counter()
            tests = gpu_parts.CudaTestLog(work / "parts" / "cuda_tests.json") if key == "cuda_tests" else None

            def on_test_line(line: str) -> None:  # each finished test reaches the results at once
                if tests.line(line):
                    combined["parts"]["cuda_tests"] = tests.result
                    write()

            rc, tail = spawn(key, part_command(key, args, work), cap, env, on_test_line if tests else None)
            run.update(returncode=rc, cap_s=round(cap), wall_s=round(time.perf_counter() - p0, 1))
            if tests is not None:  # the outcomes so far, also when killed at the cap
                rc = 0 if tests.finish(rc, tail)["status"] == "ok" else rc
            for rk in result_keys:
                path = work / "parts" / f"{rk}.json"
                if path.exists():
                    combined["parts"][rk] = json.loads(path.read_text())
                else:
                    why = "timeout" if rc == "timeout" else "failed"
                    combined["parts"][rk] = {"status": why, "returncode": rc, "output_tail": tail}
            run["status"] = "ok" if rc == 0 else ("timeout" if rc == "timeout" else "failed")
        combined["runs"].append(run)
        write()
    print("\n" + stem.with_suffix(".md").read_text())
    print(f"wrote {stem.with_suffix('.json')}, {stem.with_suffix('.md')}")
    bad = [k for k, v in combined["parts"].items() if v.get("status") not in ("ok", "skipped")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
