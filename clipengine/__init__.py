"""clipengine: CLIP-style contrastive pretraining and cross-modal retrieval.

The public API, one import away (each is imported lazily: torch costs seconds to import):

    from clipengine import index_folder, Searcher, ModelSpec, load_model, train, TrainConfig
    from clipengine import retrieval_benchmark, zeroshot_benchmark, probe_benchmark
"""

from __future__ import annotations

__version__ = "0.1.0"

_PUBLIC = {
    "ModelSpec": "clipengine.models",
    "load_model": "clipengine.models",
    "list_models": "clipengine.models",
    "open_image": "clipengine.images",
    "embed_images": "clipengine.embed",
    "embed_texts": "clipengine.embed",
    "scan_folder": "clipengine.index.scan",
    "IndexStore": "clipengine.index.store",
    "resolve_index_path": "clipengine.index.location",
    "index_folder": "clipengine.index.pipeline",
    "IndexOptions": "clipengine.index.pipeline",
    "FaissPolicy": "clipengine.index.faiss_view",
    "index_info": "clipengine.index.info",
    "Searcher": "clipengine.index.search",
    "Hit": "clipengine.index.hits",
    "ClipEngineError": "clipengine.errors",
    "TrainConfig": "clipengine.training",
    "train": "clipengine.training",
    "retrieval_recall": "clipengine.metrics",
    "retrieval_benchmark": "clipengine.evaluation.retrieval",
    "index_retrieval_benchmark": "clipengine.evaluation.retrieval",
    "zeroshot_benchmark": "clipengine.evaluation.zeroshot",
    "probe_benchmark": "clipengine.evaluation.probe",
    "read_pairs": "clipengine.pairs",
    "write_scene_set": "clipengine.scenes",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'clipengine' has no attribute {name!r}")
