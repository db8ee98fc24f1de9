"""The server in a child process, as a user starts it (`python launch/serve.py`): for tests and the load
benchmark, which must not share the server's interpreter (its GIL) with their clients."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager
from typing import Iterator, Optional

from dsmoe.config import REPO_ROOT

SERVING = re.compile(r"^serving .* on (http://\S+?)/? ")


@contextmanager
def served(ckpt: str, *args: str, timeout_s: float = 300, env: Optional[dict] = None) -> Iterator[str]:
    """Run `launch/serve.py --ckpt CKPT --port 0 ARGS` on loopback; yield its base URL once its address
    line is printed and /health answered the first try; terminate it on exit. Raises RuntimeError with
    the server's output when it does not start
    within `timeout_s` seconds."""
    cmd = [sys.executable, str(REPO_ROOT / "launch" / "serve.py"), "--ckpt", ckpt, "--host", "127.0.0.1",
           "--port", "0", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})
    lines: list[str] = []
    try:
        deadline = time.monotonic() + timeout_s
        url = None
        while url is None:  # the line naming the port comes once the socket listens
            line = proc.stdout.readline()
            if not line or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start ({' '.join(cmd)}):\n{''.join(lines)}")
            lines.append(line)
            m = SERVING.match(line)
            url = m.group(1) if m else None
        # keep reading what the server prints, so a full pipe never blocks it
        threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
        try:  # once the line is printed the socket listens: the first request must be answered
            with urllib.request.urlopen(f"{url}/health", timeout=max(deadline - time.monotonic(), 1)):
                pass
        except OSError as e:
            raise RuntimeError(f"the server at {url} did not answer /health ({e}):\n{''.join(lines)}") from None
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
