"""Contrastive training: the run's settings (`config`), data (`data`), losses (`loss`), the loop (`loop`),
processes (`distributed`) and checkpoints (`checkpoint`). The model library (`clipengine.models`) never
imports this package. Its names are imported lazily: the CLI reads `config` at every start, and the
loop costs torch's import."""

from __future__ import annotations

_PUBLIC = {
    "TrainConfig": "clipengine.training.config",
    "resume_config": "clipengine.training.config",
    "TrainReport": "clipengine.training.loop",
    "TrainingDiverged": "clipengine.training.loop",
    "evaluate": "clipengine.training.loop",
    "train": "clipengine.training.loop",
}

__all__ = list(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'clipengine.training' has no attribute {name!r}")
