"""Near-duplicate images: groups of files whose embeddings are within a cosine threshold of each other.

Files with the same bytes share one stored vector (vectors are keyed by content hash), so they are
grouped first and marked exact, and only one vector per distinct content is searched. Pairs above the
threshold come from faiss range search: exact (a flat scan) up to EXACT_MAX distinct vectors, beyond that
through an inverted-file index trained for the purpose, probing enough lists that near-duplicates (which sit
in the same or a neighbouring cell) are found. At 100,000 vectors on 2 cores the command takes 17 s, the
search 16 s against 53 s for the exact scan, and finds all of its pairs (benchmarks/bench_duplicates.py).
Groups are the connected components of those pairs (scipy), largest first: a chain of near-duplicates is
one group, so a member can be less similar to the first than the threshold.

A video is found by its own vector (the mean of its frames') and kept only if its frames agree too: every
frame of each must have a match in the other at the threshold (`frame_similarity`). So two
videos that share an intro, or one frame, are not duplicates; and no video is represented by a black frame.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from clipengine.errors import BadInput
from clipengine.index import ann
from clipengine.index.filters import KEEP_ALL, Filter
from clipengine.index.store import IndexStore

EXACT_MAX = 20_000  # distinct vectors searched by a flat scan; above, an IVF index (see the module docstring)
# Many small lists, few probed: embeddings cluster unevenly (the largest of sqrt(n) lists held 36x the mean at
# 100,000 clustered vectors), and a probe of a big list costs as much as many small ones. n/50 lists with 8
# probed found every planted near-duplicate pair there in 16 s, against 158 s for sqrt(n) lists with 16.
VECTORS_PER_LIST = 50
NPROBE = 8
CHUNK = 4096  # queries per range search: bounds the memory of its results


@dataclass(frozen=True)
class DuplicateFile:
    id: int
    path: str
    similarity: float  # cosine similarity to the group's first file
    exact: bool  # the same bytes as another file of the group


@dataclass(frozen=True)
class DuplicateGroup:
    files: list[DuplicateFile]
    exact: bool  # every file has the same bytes

    @property
    def size(self) -> int:
        return len(self.files)

    def to_dict(self) -> dict:
        return {"size": self.size, "exact": self.exact, "files": [asdict(f) for f in self.files]}


def similar_pairs(vectors: np.ndarray, threshold: float, exact: bool | None = None,
                  progress: Callable[[str, int, int], None] | None = None) -> np.ndarray:
    """(i, j) rows of `vectors` (unit, float32) with cosine >= threshold, i < j, shape (pairs, 2)."""
    import faiss

    n, dim = vectors.shape
    ann.configure_threads(dim)
    exact = n <= EXACT_MAX if exact is None else exact
    if exact:
        index = faiss.IndexFlatIP(dim)
    else:
        lists = max(1, n // VECTORS_PER_LIST)
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, lists, faiss.METRIC_INNER_PRODUCT)
        if progress:
            progress("training", 0, 1)
        index.train(vectors[np.sort(ann.sample_ids(np.arange(n), lists * ann.TRAIN_POINTS_PER_LIST, seed=0))])
        index.nprobe = min(NPROBE, lists)
    index.add(vectors)
    radius = float(np.nextafter(np.float32(threshold), np.float32(-2)))  # faiss keeps scores > radius
    found = []
    for start in range(0, n, CHUNK):
        lims, _, neighbours = index.range_search(vectors[start:start + CHUNK], radius)
        rows = np.repeat(np.arange(start, min(start + CHUNK, n)), np.diff(lims).astype(np.int64))
        keep = rows < neighbours
        found.append(np.stack([rows[keep], neighbours[keep]], axis=1))
        if progress:
            progress("comparing", min(start + CHUNK, n), n)
    return np.concatenate(found) if found else np.empty((0, 2), np.int64)


def frame_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """How alike two sets of frames (unit rows) are: the worst of each frame's best match in the other set. Two
    copies of a video match frame for frame; two videos that share only an intro or a scene do not."""
    scores = a @ b.T
    return float(min(scores.max(axis=1).min(), scores.max(axis=0).min()))


def _frames_agree(first: str, second: str, first_vector: np.ndarray, second_vector: np.ndarray,
                  frames: dict[str, tuple[np.ndarray, np.ndarray]], threshold: float) -> bool:
    """Whether a pair found by its vectors is also alike frame by frame (an image is a set of one frame)."""
    if first not in frames and second not in frames:
        return True
    a = frames[first][1] if first in frames else first_vector[None]
    b = frames[second][1] if second in frames else second_vector[None]
    return frame_similarity(a, b) >= threshold


def find_duplicates(index_path: str | os.PathLike, threshold: float = 0.95, *, prefix: str | None = None,
                    exact: bool | None = None, progress: Callable[[str, int, int], None] | None = None,
                    where: Filter = KEEP_ALL) -> list[DuplicateGroup]:
    """Groups of near-duplicate images in an index, largest first. `threshold`: the cosine similarity two
    images need to count as duplicates (1 keeps only identical embeddings); `prefix`: only files under it;
    `where`: only files a `Filter` keeps (its prefix replaced by `prefix` when that is given)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if not -1 <= threshold <= 1:
        raise BadInput(f"--threshold {threshold} is outside [-1, 1]: it is a cosine similarity, e.g. 0.95")
    with IndexStore.open(Path(index_path)) as store:
        files = store.file_hashes(store.visible(where.under(prefix)))
        if not files:
            return []
        hashes = sorted({h for _, _, h in files})
        row_of_hash = {h: r for r, h in enumerate(hashes)}
        vectors = store.content_vectors(hashes)
        frames = store.frames_of_contents(hashes)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    pairs = similar_pairs(vectors, threshold, exact, progress)
    if frames:
        pairs = pairs[[_frames_agree(hashes[i], hashes[j], vectors[i], vectors[j], frames, threshold) for i, j in pairs]]
        pairs = pairs.reshape(-1, 2)
    n = len(hashes)
    graph = coo_matrix((np.ones(len(pairs), np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    members: dict[int, list[tuple[int, str, str]]] = {}
    for file_id, path, digest in files:
        members.setdefault(int(component[row_of_hash[digest]]), []).append((file_id, path, digest))
    groups = []
    for group in members.values():
        if len(group) < 2:
            continue
        first = vectors[row_of_hash[group[0][2]]]
        per_content = Counter(d for _, _, d in group)
        copies = {d for d, n in per_content.items() if n > 1}
        groups.append(DuplicateGroup(
            files=[DuplicateFile(i, p, round(float(vectors[row_of_hash[d]] @ first), 6), d in copies) for i, p, d in group],
            exact=len(per_content) == 1))
    return sorted(groups, key=lambda g: (-g.size, g.files[0].path))
