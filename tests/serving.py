"""Starting a real `clipengine serve` for a test, a benchmark or a script: one way, waited for the same way."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path


def start_service(index: Path, *, env: dict | None = None, timeout: float = 60.0,
                  stderr: int | None = subprocess.DEVNULL) -> tuple[subprocess.Popen, str]:
    """`clipengine serve --index INDEX --port 0` in a new process; returns it and its URL once this process (not
    a stale announcement left by another) answers for the index."""
    from clipengine.index.location import SERVICE_FILE
    from clipengine.index.service import find_service

    process = subprocess.Popen([sys.executable, "-m", "clipengine", "serve", "--index", str(index), "--port", "0"],
                               env=env, stderr=stderr)
    deadline = time.monotonic() + timeout
    while True:
        if find_service(index) is not None:
            record = json.loads((index / SERVICE_FILE).read_text())
            if record["pid"] == process.pid:
                return process, record["url"]
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"the service for {index} did not start")
        time.sleep(0.05)
