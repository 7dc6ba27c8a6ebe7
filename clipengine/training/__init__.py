"""Contrastive training: data (`data`), losses (`loss`), the loop (`loop`), processes (`distributed`)
and checkpoints (`checkpoint`). The model library (`clipengine.models`) never imports this package."""

from clipengine.training.loop import TrainConfig, TrainingDiverged, TrainReport, evaluate, resume_config, train

__all__ = ["TrainConfig", "TrainReport", "TrainingDiverged", "evaluate", "resume_config", "train"]
