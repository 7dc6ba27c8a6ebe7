"""Where a benchmark script writes its result: --out if given, else results/<name>-<date>.json (not for --quick).

Every benchmark imports this first, so it also puts tests/ on sys.path: the benchmarks generate their
photos and vectors with the tests' own generators (tests/synthetic.py).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
sys.path.append(str(Path(__file__).resolve().parent.parent / "tests"))


def save_result(name: str, record: dict, out: Path | None, quick: bool) -> None:
    path = out or (None if quick else RESULTS / f"{name}-{record['date']}.json")
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2) + "\n")
        print(f"written {path}")
