"""Where a benchmark script writes its result: --out if given, else results/<name>-<date>.json (not for --quick)."""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def save_result(name: str, record: dict, out: Path | None, quick: bool) -> None:
    path = out or (None if quick else RESULTS / f"{name}-{record['date']}.json")
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2) + "\n")
        print(f"written {path}")
