"""A benchmark's result as a self-describing record, and the comparison of two of them.

The JSON holds everything needed to tell later whether two numbers are comparable: the task, the data
(path, layout, split, counts), the model and its weights' identity, the exact settings, the versions of
the libraries that computed it, and the metrics (fractions in [0, 1]).
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

from clipengine.errors import BadInput

FORMAT = 1


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for package in ("clipengine", "open_clip_torch", "torch", "numpy", "faiss-cpu", "scikit-learn"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    return found


@dataclass
class EvaluationResult:
    """One benchmark run. `counts` (``n_images``, ``n_captions``, …) also appear at the JSON's top level."""

    task: str  # retrieval | zeroshot | probe
    dataset: dict
    model: dict  # the model source (clipengine.models.resolve_source), identity included
    metrics: dict[str, float]
    counts: dict[str, int]
    settings: dict
    seconds: float = 0.0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (image, reason): left out, reported

    def to_dict(self) -> dict:
        from clipengine.models import describe_source

        return {
            "clipengine_bench": FORMAT,
            "task": self.task,
            "dataset": self.dataset,
            "model": self.model,
            "weights": describe_source(self.model),
            "metrics": self.metrics,
            **self.counts,
            "settings": self.settings,
            "seconds": round(self.seconds, 3),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "versions": _versions(),
            "skipped": [{"image": image, "reason": reason} for image, reason in self.skipped],
        }

    def write(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n")


def load_result(path: str | os.PathLike) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BadInput(f"cannot read benchmark result {path}: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("metrics"), dict):
        raise BadInput(f"{path} is not a result of `clipengine bench` (it has no 'metrics')")
    return data


def compare_results(a: dict, b: dict) -> dict:
    """Metric by metric, b − a; and every field that makes the two runs differ besides the model
    (a different dataset, split or setting means the numbers are not directly comparable)."""
    rows = []
    for name in list(a["metrics"]) + [m for m in b["metrics"] if m not in a["metrics"]]:
        va, vb = a["metrics"].get(name), b["metrics"].get(name)
        rows.append({"metric": name, "a": va, "b": vb,
                     "delta": None if va is None or vb is None else vb - va})
    differences = []
    for key in ("task", "n_images", "n_captions", "n_classes"):
        if a.get(key) != b.get(key):
            differences.append({"field": key, "a": a.get(key), "b": b.get(key)})
    for section in ("dataset", "settings"):
        sa, sb = a.get(section) or {}, b.get(section) or {}
        for key in sorted(set(sa) | set(sb)):
            if sa.get(key) != sb.get(key):
                differences.append({"field": f"{section}.{key}", "a": sa.get(key), "b": sb.get(key)})
    return {"a": a.get("weights"), "b": b.get("weights"), "metrics": rows, "differences": differences}
