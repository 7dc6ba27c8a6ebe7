"""The cores this process may use, which thread pools and decode workers are sized by (imports nothing heavy,
so that the cold search path can ask)."""

from __future__ import annotations

import os


def available_cores() -> int:
    """Cores this process may run on (its affinity mask, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
