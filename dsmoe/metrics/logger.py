"""Rank-0 console (rich progress bar + compact lines, or plain lines off a terminal) and metrics files.

Every log interval becomes one row of `metrics.jsonl` and `metrics.csv` in the run directory.
Other ranks print warnings and errors only, prefixed with their rank.
"""
from __future__ import annotations

import csv
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

CSV_FIELDS = ["step", "loss", "lr", "grad_norm", "tokens_per_s", "tokens_per_s_per_device", "mfu", "samples", "tokens",
              "step_time_s", "data_ms", "forward_ms", "backward_ms", "optimizer_ms", "val_loss", "val_ppl",
              "expert_imbalance", "dropped_frac", "bias_range", "mem_gb", "mem_reserved_gb", "alloc_retries", "ooms",
              "rss_gb", "a2a_mb_per_step", "moe_comm_ms", "skipped_overflow", "guard_events"]


def fmt_tokens(n: float) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else f"{n:.0f}"


class LineFile:
    """A log file appended in whole lines: each `write` is one write(2) of complete lines to an O_APPEND
    descriptor, never split by a buffer, so a crash leaves whole rows or a torn last one (moved aside
    at resume). A file that ends in a torn row gets a newline first, so no row is glued onto it."""

    def __init__(self, path: Path):
        self.fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        size = os.fstat(self.fd).st_size
        if size and os.pread(self.fd, 1, size - 1) != b"\n":
            os.write(self.fd, b"\n")

    def write(self, text: str) -> None:
        data = text.encode()
        while data:  # a regular file takes it in one call unless the disk fills or a signal interrupts
            data = data[os.write(self.fd, data):]

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class RunLogger:
    def __init__(self, run_dir: Optional[Path], rank: int = 0, total_steps: int = 0, rich_mode: str = "auto",
                 start_step: int = 0):
        self.rank = rank
        self.main = rank == 0
        self.run_dir = run_dir
        use_rich = rich_mode == "on" or (rich_mode == "auto" and sys.stdout.isatty())
        self.console = None
        self.progress = None
        if self.main and use_rich:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.console = Console()
            self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("eta"), TimeRemainingColumn(), console=self.console, transient=True)
            self.task = self.progress.add_task("train", total=total_steps, completed=start_step)
            self.progress.start()
        self._csv = self._jsonl = None
        if self.main and run_dir is not None:
            run_dir.mkdir(parents=True, exist_ok=True)
            self._jsonl = LineFile(run_dir / "metrics.jsonl")
            new_csv = not (run_dir / "metrics.csv").exists()
            self._csv_file = LineFile(run_dir / "metrics.csv")  # the csv module writes each row in one call
            self._csv = csv.DictWriter(self._csv_file, fieldnames=CSV_FIELDS, extrasaction="ignore")
            if new_csv:
                self._csv.writeheader()

    def print(self, text: str, style: Optional[str] = None) -> None:
        if not self.main:
            return
        if self.console is not None:
            self.console.print(text, style=style, highlight=False)
        else:
            print(text, flush=True)

    def warn(self, text: str) -> None:
        """Every rank may warn; non-zero ranks are prefixed with their rank."""
        if self.console is not None:
            self.console.print(f"[yellow]warning:[/yellow] {text}")
        else:
            print(f"[rank {self.rank}] warning: {text}" if not self.main else f"warning: {text}",
                  file=sys.stderr, flush=True)

    def header(self, rows: dict) -> None:
        if not self.main:
            return
        if self.console is not None:
            from rich.table import Table

            table = Table(show_header=False, box=None, title="dsmoe", title_justify="left")
            for k, v in rows.items():
                table.add_row(f"[cyan]{k}[/cyan]", str(v))
            self.console.print(table)
        else:
            for k, v in rows.items():
                print(f"{k:>18}: {v}", flush=True)

    def advance(self, step: int) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=step)

    def log(self, metrics: dict) -> None:
        """One row in the metrics files and one compact console line."""
        if not self.main:
            return
        row = {"time": time.time(), **metrics}
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(row) + "\n")
            self._csv.writerow(row)
        self.print(self.format_line(metrics))

    @staticmethod
    def format_line(m: dict) -> str:
        parts = [f"step {m['step']:>6}"]
        if "loss" in m:
            parts.append(f"loss {m['loss']:.4f}")
        if "val_loss" in m:
            parts.append(f"val {m['val_loss']:.4f} (ppl {m['val_ppl']:.2f})")
        if "lr" in m:
            parts.append(f"lr {m['lr']:.2e}")
        if "grad_norm" in m:
            parts.append(f"gnorm {m['grad_norm']:.3f}")
        if "tokens_per_s" in m:
            parts.append(f"{fmt_tokens(m['tokens_per_s'])} tok/s")
        if m.get("mfu") is not None:
            parts.append(f"mfu {100 * m['mfu']:.1f}%")
        if "mem_gb" in m:
            parts.append(f"mem {m['mem_gb']:.2f}GB")
        elif "rss_gb" in m:
            parts.append(f"rss {m['rss_gb']:.2f}GB")
        if "expert_imbalance" in m:
            parts.append(f"imb {m['expert_imbalance']:.2f}")
        if "a2a_mb_per_step" in m:
            parts.append(f"a2a {m['a2a_mb_per_step']:.1f}MB"
                         + (f" {m['moe_comm_ms']:.0f}ms" if m.get("moe_comm_ms") is not None else ""))
        if m.get("dropped_frac"):
            parts.append(f"drop {100 * m['dropped_frac']:.1f}%")
        return " | ".join(parts)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        for f in (self._jsonl, getattr(self, "_csv_file", None)):
            if f is not None:
                f.close()
