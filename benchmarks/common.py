"""Helpers shared by the `make bench` suite: device names, timing, JSON results, rich tables.

Every benchmark times with `time_fn` (CUDA events + synchronize on GPU, wall clock on CPU; the
median of `iters` runs after `warmup` runs), prints with `print_table`, and writes one JSON file per
benchmark, device and day with `write_results` under benchmarks/results/.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import torch

# A local run writes to the ignored results/local/, so the checkout stays clean; DSMOE_RECORD=1
# (`make bench RECORD=1`, and `make bench-gpu`) writes to results/, to be committed on purpose.
RESULTS_DIR = Path(__file__).resolve().parent / "results" / ("" if os.environ.get("DSMOE_RECORD") == "1" else "local")

# Marketing noise dropped from CPU brand strings before slugifying.
_CPU_NOISE = re.compile(
    r"\((?:r|tm)\)|\bcpu\b|\bprocessor\b|\b\d+-core\b|@.*$|\bwith\b.*$", re.IGNORECASE)


def slugify(text: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def _cpu_brand() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        try:
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True,
                                  text=True, timeout=5).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine() or "unknown"


def device_name(device) -> str:
    """A filename-safe device name: 'cpu-intel-xeon-platinum-8375c', 'nvidia-h100-80gb-hbm3'."""
    device = torch.device(device)
    if device.type == "cuda":
        return slugify(torch.cuda.get_device_name(device))
    return "cpu-" + slugify(_CPU_NOISE.sub(" ", _cpu_brand()))


def synchronize(device) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], *, warmup: int, iters: int, device) -> dict:
    """Run `fn` warmup + iters times; return {median_ms, min_ms, iters, times_ms} over the timed runs.

    On CUDA each run is bracketed by CUDA events and the stream is synchronised before reading them,
    so asynchronous kernel launches are fully counted; on CPU it is the wall clock.
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    synchronize(device)
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(iters)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) for start, end in events]
    else:
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "iters": iters,
            "times_ms": [round(t, 4) for t in times]}


def environment(device) -> dict:
    """What a result depends on besides the code: device, torch, date, host CPU count."""
    device = torch.device(device)
    env = {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": _dt.date.today().isoformat(),
        "host_cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        env["capability"] = "sm_%d%d" % torch.cuda.get_device_capability(device)
    return env


def write_results(name: str, payload: dict, *, device=None, timestamped: bool = False) -> Path:
    """Write benchmarks/results/<name>-<device>-<YYYY-MM-DD>.json and return its path.

    The environment (device, torch version, date, host CPU count) is added to the payload; keys the
    payload already has win. `device` defaults to payload["device_type"], else CUDA when available.
    `timestamped`: <YYYY-MM-DD>T<HHMMSS> instead, so a later run the same day keeps this one's file.
    """
    if device is None:
        device = payload.get("device_type") or ("cuda" if torch.cuda.is_available() else "cpu")
    record = {"benchmark": name, **environment(device), **payload}
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = record["date"] + (_dt.datetime.now().strftime("T%H%M%S") if timestamped else "")
    path = RESULTS_DIR / f"{name}-{record['device']}-{stamp}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    os.replace(tmp, path)  # a crash mid-write leaves the previous file intact
    return path


def progress(text: str) -> None:
    """One progress line, flushed: off a terminal (CI, nohup, a pipe) stdout is block-buffered and a
    long benchmark would otherwise print nothing until it ends."""
    print(text, flush=True)


def print_table(title: str, columns: Sequence[str], rows: Iterable[Sequence[object]],
                caption: Optional[str] = None) -> None:
    """A rich table; cells are printed with str(), columns after the first are right-aligned."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, caption=caption)
    for i, col in enumerate(columns):
        table.add_column(str(col), justify="left" if i == 0 else "right", no_wrap=True)
    for row in rows:
        table.add_row(*("" if cell is None else str(cell) for cell in row))
    console = Console()
    if not console.is_terminal:  # CI logs / pipes: do not squeeze the table into 80 columns
        console = Console(width=max(console.width, 160))
    console.print(table)
