"""Turn a query (text, image or raw vector) into ranked hits from an index.

A `Searcher` opens an index read-only and loads its model only when a query needs one: a raw vector
needs none, and neither does an image that is itself in the index and unchanged (its stored vector
is used, so "more like this photo" costs no model load at all). The model is always the index's own;
naming another is refused before anything is loaded.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from clipengine.errors import BadInput
from clipengine.images import Decoded, open_image
from clipengine.models import ModelSpec, check_same_model
from clipengine.store import IndexStore


@dataclass(frozen=True)
class Hit:
    rank: int
    score: float  # cosine similarity, in [-1, 1]
    path: str
    width: int
    height: int
    id: int

    def to_dict(self) -> dict:
        return asdict(self)


def path_prefix(text: str) -> str:
    """A --prefix argument as an absolute path prefix; an existing directory matches only inside it."""
    expanded = os.path.abspath(os.path.expanduser(text))
    return expanded.rstrip(os.sep) + os.sep if os.path.isdir(expanded) else expanded


class Searcher:
    """An open index, ready for many queries. Close it when done (or use `with`)."""

    def __init__(self, index_path: str | os.PathLike, *, spec: ModelSpec = ModelSpec(), device: str | None = None):
        self.store = IndexStore.open(Path(index_path))
        try:
            check_same_model(self.store.manifest["model"], spec, f"index {index_path}")
        except BaseException:
            self.store.close()
            raise
        self.device = device
        self._faiss = None
        self._model = None

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> "Searcher":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def model(self):
        if self._model is None:
            from clipengine.models import load_model

            self._model = load_model(self.store.manifest["model"], device=self.device)
        return self._model

    @property
    def faiss(self):
        """The index's faiss structure, memory-mapped: opening costs milliseconds at any size."""
        if self._faiss is None:
            self._faiss = self.store.faiss_view(mmap=True)
        return self._faiss

    # ---- queries -> vectors -------------------------------------------------------------------

    def text_vector(self, text: str) -> np.ndarray:
        from clipengine.embed import embed_texts

        if not text.strip():
            raise BadInput("the text query is empty")
        return embed_texts(self.model, [text])[0]

    def image_vector(self, image_path: str | os.PathLike) -> np.ndarray:
        path = os.path.abspath(os.path.expanduser(os.fspath(image_path)))
        try:
            st = os.stat(path)
        except OSError as e:
            raise BadInput(f"cannot read query image {image_path}: {e.strerror}") from None
        stored = self.store.stored_vector(path, st.st_size, st.st_mtime_ns)
        if stored is not None:
            return stored
        from clipengine.embed import embed_pil_images

        decoded = open_image(path, draft_size=self.model.image_size)  # decoded exactly as indexing does
        if not isinstance(decoded, Decoded):
            raise BadInput(f"cannot use {image_path} as a query: {decoded.reason}")

        return embed_pil_images(self.model, [decoded.image])[0]

    # ---- vectors -> hits ----------------------------------------------------------------------

    def search_vector(self, vector: np.ndarray, k: int = 10, prefix: str | None = None) -> list[Hit]:
        """Top-k files by cosine similarity to `vector` (normalised here), optionally under a path prefix."""
        if k < 1:
            raise BadInput("-k must be at least 1")
        q = np.asarray(vector, dtype=np.float32).reshape(1, -1)
        if q.shape[1] != self.store.dim:
            raise BadInput(f"query vector has dimension {q.shape[1]}, but this index holds {self.store.dim}")
        norm = float(np.linalg.norm(q))
        if not np.isfinite(norm) or norm == 0:
            raise BadInput("query vector is zero or not finite")
        q /= norm
        allowed = None
        if prefix is not None:
            allowed = self.store.ids_under(prefix)
            if allowed.size == 0:
                return []
        if self.faiss.ntotal == 0:
            return []
        scores, ids = self.faiss.search(q, k, allowed)
        rows = self.store.rows(i for i in ids[0] if i >= 0)
        hits = []
        for score, i in zip(scores[0], ids[0], strict=True):
            row = rows.get(int(i))
            if row is not None:  # a row deleted since the faiss view was read is simply left out
                hits.append(Hit(len(hits) + 1, float(score), row.path, row.width, row.height, row.id))
        return hits

    def search_text(self, text: str, k: int = 10, prefix: str | None = None) -> list[Hit]:
        return self.search_vector(self.text_vector(text), k, prefix)

    def search_image(self, image_path: str | os.PathLike, k: int = 10, prefix: str | None = None) -> list[Hit]:
        return self.search_vector(self.image_vector(image_path), k, prefix)
