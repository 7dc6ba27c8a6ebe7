"""The numbers the field reports, computed the way it computes them, at any scale.

Retrieval recall@k follows the CLIP paper and CLIP_benchmark's ``zeroshot_retrieval``:
- text→image: each caption is a query; a hit at k when its own image is among the k nearest images;
- image→text: each image with at least one caption is a query; a hit at k when any of its captions is
  among the k nearest texts.

Ties: a target tied with a non-target counts as ranked below it (a hit needs fewer than k non-targets
scoring at least as high). CLIP_benchmark ranks with ``torch.topk``, whose order among equal scores is
arbitrary, so at such a tie its number is undefined; ours is the conservative one and otherwise equal.

Scale: one pass over the text×image score matrix in row blocks of bounded size (float32 GEMM), keeping
per text the best non-target scores of its block row, and per image a running top-k of non-target text
scores, merged only where a block beats it. 100,000 images × 500,000 captions never hold more than one block of scores.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DEFAULT_KS = (1, 5, 10)
BLOCK_BYTES = 256 << 20  # the score block: large enough for an efficient GEMM, small next to the embeddings
BLOCK_ROWS = 1024  # GEMM is as fast at 1024 query rows as at more; more rows only delay the top-k pruning


def _as_float32_rows(x: np.ndarray, what: str) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{what} embeddings must be 2-D, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{what} embeddings contain NaN or infinite values")
    return x


def _check_ks(ks: Sequence[int]) -> list[int]:
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"recall@k needs k >= 1, got {ks}")
    return ks


def _top_values(scores, k: int, dim: int):
    """The k largest values along `dim`, padded with -inf when there are fewer than k."""
    import torch

    n = scores.shape[dim]
    top = torch.topk(scores, min(k, n), dim=dim).values
    if n < k:
        pad = list(top.shape)
        pad[dim] = k - n
        top = torch.cat([top, torch.full(pad, -np.inf, dtype=top.dtype)], dim=dim)
    return top


def retrieval_hits(image_emb: np.ndarray, text_emb: np.ndarray, text_owner: Sequence[int] | np.ndarray,
                   ks: Sequence[int] = DEFAULT_KS, *, block_bytes: int = BLOCK_BYTES) -> dict[str, np.ndarray]:
    """Per query, whether it is a hit at each k: ``text_to_image_R@k`` holds one bool per caption,
    ``image_to_text_R@k`` one per image that has a caption (in image order). `text_owner[t]` is the row
    of `image_emb` that caption t describes. Embeddings are taken as given (L2-normalised by the
    caller): scores are their inner products, in float32."""
    import torch

    images = _as_float32_rows(image_emb, "image")
    texts = _as_float32_rows(text_emb, "text")
    owners = np.asarray(text_owner, dtype=np.int64)
    ks = _check_ks(ks)
    if len(owners) != len(texts):
        raise ValueError(f"{len(texts)} texts but {len(owners)} owners")
    if len(owners) and (owners.min() < 0 or owners.max() >= len(images)):
        raise ValueError("a text's owner is not a row of the image embeddings")
    n_images, k_max = len(images), ks[-1]
    owner_t = torch.from_numpy(owners)
    t2i_top = torch.empty((len(texts), k_max))  # per text: best non-target image scores, descending
    t2i_target = torch.empty(len(texts))
    i2t_top = torch.full((n_images, k_max), -np.inf)  # per image: running best non-target text scores
    i2t_target = torch.full((n_images,), -np.inf)  # per image: its best caption's score
    rows = max(1, min(len(texts), BLOCK_ROWS, block_bytes // (4 * max(1, n_images))))
    buffer = np.empty((rows, n_images), dtype=np.float32)
    for begin in range(0, len(texts), rows):
        end = min(begin + rows, len(texts))
        block = buffer[:end - begin]
        np.matmul(texts[begin:end], images.T, out=block)  # numpy's BLAS: the fastest float32 GEMM measured here
        scores = torch.from_numpy(block)
        mine = owner_t[begin:end]
        local = torch.arange(end - begin)
        target = scores[local, mine].clone()
        scores[local, mine] = -np.inf  # from here on the block holds non-target scores only
        t2i_target[begin:end] = target
        t2i_top[begin:end] = _top_values(scores, k_max, dim=1)
        i2t_target.scatter_reduce_(0, mine, target, reduce="amax")
        # only images for which this block holds a score above their current k-th best need a merge:
        # after the first blocks that is a small minority, which saves most of a full column top-k
        changed = torch.nonzero(scores.amax(dim=0) > i2t_top[:, -1]).squeeze(1)
        if changed.numel():
            fresh = _top_values(scores[:, changed].T, k_max, dim=1)
            i2t_top[changed] = torch.topk(torch.cat([i2t_top[changed], fresh], dim=1), k_max, dim=1).values
    described = torch.zeros(n_images, dtype=torch.bool)
    described[owner_t] = True
    hits = {}
    for k in ks:  # a hit: fewer than k non-targets score at least as high as the best target
        hits[f"text_to_image_R@{k}"] = (t2i_top[:, k - 1] < t2i_target).numpy()
        hits[f"image_to_text_R@{k}"] = (i2t_top[described, k - 1] < i2t_target[described]).numpy()
    return hits


def retrieval_recall(image_emb: np.ndarray, text_emb: np.ndarray, text_owner: Sequence[int] | np.ndarray,
                     ks: Sequence[int] = DEFAULT_KS, *, block_bytes: int = BLOCK_BYTES) -> dict[str, float]:
    """Recall@k in both directions (see `retrieval_hits`): keys ``text_to_image_R@k`` and
    ``image_to_text_R@k``, values in [0, 1]."""
    hits = retrieval_hits(image_emb, text_emb, text_owner, ks, block_bytes=block_bytes)
    return {key: float(hits[key].mean()) if hits[key].size else 0.0 for key in sorted(hits, key=_metric_order)}


_DIRECTIONS = ("text_to_image_R", "image_to_text_R")


def _metric_order(key: str) -> tuple[int, int]:
    name, _, k = key.rpartition("@")
    return _DIRECTIONS.index(name) if name in _DIRECTIONS else len(_DIRECTIONS), int(k) if k.isdigit() else 0


def recall_table(metrics: dict[str, float]) -> tuple[dict[str, dict[int, float]], dict[str, float]]:
    """Split metrics named ``DIRECTION_R@k`` (as this module names them) into {direction: {k: value}}, the
    shape of the papers' tables; the others (accuracies) are returned as they are."""
    by_direction: dict[str, dict[int, float]] = {}
    other: dict[str, float] = {}
    for name, value in metrics.items():
        direction, _, k = name.rpartition("_R@")
        if direction and k.isdigit():
            by_direction.setdefault(direction, {})[int(k)] = value
        else:
            other[name] = value
    return by_direction, other


def hits_at_k(ranked_ids: np.ndarray, target_ids: np.ndarray, ks: Sequence[int]) -> dict[int, float]:
    """From ranked result ids (queries × k_max, as a faiss search returns them) and one target id per
    query: the fraction of queries whose target is in the first k, for each k."""
    found = ranked_ids == np.asarray(target_ids)[:, None]
    position = np.where(found.any(axis=1), found.argmax(axis=1), np.iinfo(np.int64).max)
    return {k: float((position < k).mean()) if len(position) else 0.0 for k in _check_ks(ks)}


def chance_recall(n_images: int, k: int) -> float:
    """Recall@k of a random ranking for text→image (one right image among n)."""
    return min(1.0, k / max(1, n_images))


def classification_metrics(logits: np.ndarray, labels: Sequence[int] | np.ndarray, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy (a hit when the true class is among the k highest logits) and mean per-class
    recall (balanced accuracy over the classes that occur in `labels`), as CLIP_benchmark reports them."""
    import torch

    logits_t = torch.as_tensor(np.asarray(logits, dtype=np.float32))
    labels_t = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    result = {}
    for k in _check_ks(ks):
        if k > logits_t.shape[1]:
            continue
        top = torch.topk(logits_t, k, dim=1).indices
        result[f"acc@{k}"] = float((top == labels_t[:, None]).any(dim=1).double().mean())
    predicted = logits_t.argmax(dim=1)
    present = torch.unique(labels_t)
    recalls = [float((predicted[labels_t == c] == c).double().mean()) for c in present]
    result["mean_per_class_recall"] = float(np.mean(recalls)) if recalls else 0.0
    return result
