"""What benchmarks/moe_dispatch.py shows off a terminal: progress as it measures, and ratio columns
that say what they are."""
import io
import subprocess
import sys

from conftest import REPO
from cli import ENV


def test_progress_lines_are_flushed(monkeypatch):
    from benchmarks.common import progress

    class Pipe(io.StringIO):
        flushed = ""

        def flush(self):
            Pipe.flushed = self.getvalue()

    out = Pipe()
    monkeypatch.setattr(sys, "stdout", out)
    progress("shape: dense 1.0 ms")
    assert Pipe.flushed == "shape: dense 1.0 ms\n"


def test_moe_dispatch_off_a_terminal_prints_progress_and_labelled_ratios():
    out = subprocess.run([sys.executable, "benchmarks/moe_dispatch.py", "--device", "cpu", "--tokens", "64",
                          "--iters", "1", "--warmup", "0", "--shapes", "smollm2-moe-576x30", "--no-save"],
                         cwd=REPO, capture_output=True, text=True, timeout=300, env={**ENV, "COLUMNS": "250"})
    assert out.returncode == 0, out.stderr
    text = out.stdout
    started = text.index("smollm2-moe-576x30: 64 tokens, warmup 0, then 1 rounds of dense, loop, grouped")
    measured = text.index("smollm2-moe-576x30: dense ")
    assert started < measured < text.index("MoE layer fwd+bwd")  # progress first, then the table
    assert "(median fwd+bwd; grouped time / dense " in text
    assert "time / dense (>1 = slower)" in text and "grouped speed-up vs loop" in text and "vs dense " not in text
