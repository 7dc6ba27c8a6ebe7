"""The text queries an approximate index is tuned on, beside its held-out images.

Why: most searches are texts, and a CLIP model's text embeddings lie away from its image embeddings (the
modality gap). For a partition index they are out-of-distribution queries: their neighbours sit in lists
their nearest centroids do not point to, so a depth tuned on image queries under-serves them (on LAION's
ViT-B/32 embeddings, IVF4096,Flat needs 3.6x the probes for text queries). So each index is also tuned on
texts embedded by its own text tower: the captions stored by `index-texts` when there are any (vectors
already in the catalogue), and a shipped prompt set, the ImageNet class names under CLIP's templates and
phrases of the kind people type into a photo search.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from functools import cache
from typing import Any

import numpy as np

from clipengine.index.faiss_view import TextQueries
from clipengine.index.store import IndexStore

# what people type into a photo library's search box: places, events, things, scenes
_PHRASES = ["the beach last summer", "birthday party", "a receipt", "whiteboard with notes", "screenshot of a chat",
            "my dog in the snow", "sunset over the city", "wedding", "christmas tree", "mountains", "a cat sleeping",
            "food on a plate", "a car", "kids playing in the park", "concert at night", "a selfie", "documents",
            "a boat on the lake", "flowers in the garden", "a train station", "a museum", "fireworks",
            "people around a table", "a bicycle", "a bridge", "an old building", "the kitchen", "a forest path",
            "a map", "a baby", "a cake with candles", "a swimming pool", "a skyline at night", "a rainy street"]
_TEMPLATES = ["a photo of a {}.", "{}", "a picture of my {}", "a blurry photo of a {}.", "a close-up photo of a {}.",
              "a photo of many {}.", "a {} outdoors"]


@cache
def _class_names() -> tuple[str, ...]:
    """open_clip's ImageNet class names, read from its metadata module alone: importing open_clip would
    import torch (seconds) for a list of words."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return ()
    location = next(iter(spec.submodule_search_locations))
    metadata = importlib.util.spec_from_file_location("_open_clip_zero_shot_metadata",
                                                      f"{location}/zero_shot_metadata.py")
    if metadata is None or metadata.loader is None:
        return ()
    module = importlib.util.module_from_spec(metadata)
    metadata.loader.exec_module(module)
    return tuple(module.IMAGENET_CLASSNAMES)


def tuning_prompts(count: int, seed: int = 0) -> list[str]:
    """`count` distinct prompts: the photo-search phrases, then class names under templates, drawn at random."""
    names = _class_names()
    pool = list(dict.fromkeys([*_PHRASES, *(t.format(n) for n in names for t in _TEMPLATES)]))
    rest = pool[len(_PHRASES):]
    order = np.random.default_rng(seed).permutation(len(rest))
    return (_PHRASES + [rest[i] for i in order])[:count]


def tuning_text_vectors(store: IndexStore, embed: Callable[[Sequence[str]], np.ndarray], count: int,
                        seed: int = 0) -> np.ndarray:
    """(count, dim) unit vectors of text queries: up to half of them stored captions, the rest prompts that
    `embed` (the index's text tower) turns into vectors."""
    stored = _stored_caption_sample(store, count // 2, seed)
    prompts = tuning_prompts(count - len(stored), seed)
    vectors = np.asarray(embed(prompts), dtype=np.float32) if prompts else np.empty((0, store.dim), np.float32)
    out = np.concatenate([stored, vectors]) if len(stored) else vectors
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def _stored_caption_sample(store: IndexStore, count: int, seed: int) -> np.ndarray:
    ids = store.text_ids()
    if ids.size == 0 or count == 0:
        return np.empty((0, store.dim), np.float32)
    picked = np.random.default_rng(seed).choice(ids, size=min(count, ids.size), replace=False)
    return np.concatenate([vectors for _, vectors in store.text_vectors_of(picked)])


def for_store(store: IndexStore, model: Any = None) -> TextQueries:
    """What `SearchStructure.save` calls for text queries: embedded by `model` (a LoadedModel an indexing
    run already holds, its exported towers attached or not), else by the index's own text tower (its exported
    one when it has one). Nothing is loaded unless the index turns out to need text tuning."""
    def text_queries(count: int) -> np.ndarray:
        if model is not None:
            from clipengine.embed import embed_texts

            return tuning_text_vectors(store, lambda texts: embed_texts(model, list(texts)), count)
        from clipengine.index.search import Searcher

        with Searcher(store.path) as searcher:
            return tuning_text_vectors(store, searcher.text_vectors, count)
    return text_queries
