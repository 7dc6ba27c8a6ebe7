"""Retrieval recall@k between image and text embeddings, where an image may have several captions.

text→image: a caption scores a hit at k when its own image is among the k images nearest to it.
image→text: an image scores a hit at k when any of its captions is among the k texts nearest to it
(the convention of CLIP, CLIP_benchmark and the COCO/Flickr retrieval literature).
Scores are computed in blocks so that memory stays bounded for large evaluation sets.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

DEFAULT_KS = (1, 5, 10)
BLOCK = 1024


def _ranks_of_targets(queries: np.ndarray, keys: np.ndarray, targets: list[np.ndarray]) -> np.ndarray:
    """For each query, the 0-based rank of its best-ranked target key (ties count against us)."""
    out = np.empty(len(queries), dtype=np.int64)
    for begin in range(0, len(queries), BLOCK):
        scores = queries[begin:begin + BLOCK] @ keys.T
        block = targets[begin:begin + BLOCK]
        rows = np.repeat(np.arange(len(block)), [len(t) for t in block])
        is_target = np.zeros(scores.shape, dtype=bool)
        is_target[rows, np.concatenate(block)] = True
        best = np.where(is_target, scores, -np.inf).max(axis=1, keepdims=True)
        out[begin:begin + len(block)] = (scores >= best).sum(axis=1) - 1
    return out


def retrieval_recall(image_emb: np.ndarray, text_emb: np.ndarray, text_owner: Sequence[int],
                     ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """Recall@k in both directions; `text_owner[t]` is the row of `image_emb` that caption t describes.

    Returns keys like ``text_to_image_R@1`` and ``image_to_text_R@5`` with values in [0, 1].
    """
    owners = np.asarray(text_owner, dtype=np.int64)
    image_emb = np.asarray(image_emb, dtype=np.float32)
    text_emb = np.asarray(text_emb, dtype=np.float32)
    if len(owners) != len(text_emb):
        raise ValueError(f"{len(text_emb)} texts but {len(owners)} owners")
    t2i = _ranks_of_targets(text_emb, image_emb, [np.array([o]) for o in owners])
    captions_of: list[list[int]] = [[] for _ in range(len(image_emb))]
    for t, o in enumerate(owners):
        captions_of[o].append(t)
    described = [i for i, c in enumerate(captions_of) if c]
    i2t = _ranks_of_targets(image_emb[described], text_emb, [np.array(captions_of[i]) for i in described])
    result = {}
    for k in ks:
        result[f"text_to_image_R@{k}"] = float((t2i < k).mean())
        result[f"image_to_text_R@{k}"] = float((i2t < k).mean())
    return result


def chance_recall(n_images: int, k: int) -> float:
    """Recall@k of a random ranking for text→image (one right image among n)."""
    return min(1.0, k / max(1, n_images))
