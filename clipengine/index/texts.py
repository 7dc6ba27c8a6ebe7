"""A caption set stored in an index, beside its images: `clipengine index-texts CAPTIONS --index NAME`.

The texts and their vectors are rows of the index's catalogue (the `texts` table of meta.sqlite, one per
distinct text), committed through the store as the images are, and `texts.faiss` is their exact
inner-product search (faiss id = row id), a view tagged with the caption set's generation as vectors.faiss
is tagged with the images': a file whose tag is behind (an interrupted run) is rebuilt in memory when read.

Texts are embedded by the index's own model (its exported text tower when it has one), so `label IMAGE
--index NAME` ranks them for an image through faiss as a search ranks images: a million captions answer in
milliseconds instead of being embedded at every call. Adding is incremental (texts already stored are not
embedded again) and committed in batches, so an interrupted run keeps what it did.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clipengine.durable import replacing
from clipengine.index import ann
from clipengine.index.location import LEGACY_TEXTS_DATABASE, TEXTS_FAISS_FILE
from clipengine.index.store import IndexStore

BATCH = 1024
GENERATION_KEY = "texts_faiss_generation"


@dataclass(frozen=True)
class TextsReport:
    index: str
    added: int
    already: int
    total: int

    def to_dict(self) -> dict:
        return {"index": self.index, "added": self.added, "already": self.already, "total": self.total}


def index_texts(texts: Sequence[str], index_path: str | os.PathLike,
                progress: Callable[[int, int], None] | None = None) -> TextsReport:
    """Embed and store the texts the index does not hold yet, then rebuild the text search."""
    from clipengine.index.search import Searcher

    index_path = Path(index_path)
    with IndexStore.open(index_path, writable=True) as store, Searcher(index_path) as searcher:  # the lock: one writer
        _adopt_legacy(store)
        known = store.known_texts()
        todo = [t for t in dict.fromkeys(texts) if t not in known]
        for start in range(0, len(todo), BATCH):
            batch = todo[start:start + BATCH]
            vectors = np.asarray(searcher.text_vectors(batch), dtype="<f4")
            store.add_texts(batch, vectors / np.linalg.norm(vectors, axis=1, keepdims=True))
            if progress:
                progress(start + len(batch), len(todo))
        if store.read_meta(GENERATION_KEY) != str(store.texts_generation):
            import faiss

            with replacing(index_path / TEXTS_FAISS_FILE) as tmp:
                faiss.write_index(_build(store), str(tmp))
            store.write_meta(**{GENERATION_KEY: str(store.texts_generation)})
        return TextsReport(str(index_path), len(todo), len(set(texts)) - len(todo), store.text_count())


def _adopt_legacy(store: IndexStore) -> None:
    """Move a caption set kept in texts.sqlite (before it joined the catalogue) into the catalogue."""
    legacy = store.path / LEGACY_TEXTS_DATABASE
    if not legacy.is_file():
        return
    conn = sqlite3.connect(f"file:{legacy}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT text, vector FROM texts ORDER BY id").fetchall()
    finally:
        conn.close()
    known = store.known_texts()
    rows = [(t, v) for t, v in rows if t not in known]
    if rows:
        store.add_texts([t for t, _ in rows], np.frombuffer(b"".join(v for _, v in rows), "<f4").reshape(len(rows), -1))
    legacy.unlink()


def has_texts(index_path: str | os.PathLike) -> bool:
    """Whether the index holds a caption set to search (read-only: nothing on disk changes)."""
    with IndexStore.open(Path(index_path)) as store:
        return store.text_count() > 0


def _build(store: IndexStore):
    index = ann.new_index("IDMap2,Flat", store.dim)
    ann.add_chunks(index, store.text_vectors())
    return index


def search_texts(index_path: str | os.PathLike, vector: np.ndarray, k: int) -> list[tuple[float, str]]:
    """The k stored texts nearest `vector` (cosine), best first."""
    with IndexStore.open(Path(index_path)) as store:
        q = np.asarray(vector, dtype=np.float32).reshape(1, store.dim)
        q /= np.linalg.norm(q)
        index = None
        if store.read_meta(GENERATION_KEY) == str(store.texts_generation):
            try:
                index = ann.read_index(str(store.path / TEXTS_FAISS_FILE))
            except RuntimeError:  # missing or damaged: rebuilt below
                pass
        if index is None:
            index = _build(store)  # behind the catalogue (an interrupted run): rebuilt in memory
        ann.configure_threads(store.dim)
        scores, ids = index.search(q, min(k, max(1, index.ntotal)))
        found = [int(i) for i in ids[0] if i >= 0]
        text_of = store.texts_of(found) if found else {}
        return [(float(s), text_of[int(i)]) for s, i in zip(scores[0], ids[0], strict=True) if int(i) in text_of]
