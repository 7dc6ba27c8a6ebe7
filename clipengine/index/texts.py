"""A caption set stored in an index, beside its images: `clipengine index-texts CAPTIONS --index NAME`.

    <index>/texts.sqlite   id, text, vector (float32), one row per distinct text
    <index>/texts.faiss    exact inner-product search over those vectors (faiss id = row id)

Texts are embedded by the index's own model (its exported text tower when it has one), so `label IMAGE
--index NAME` ranks them for an image through faiss as a search ranks images: a million captions answer in
milliseconds instead of being embedded at every call. Adding is incremental (texts already stored are not
embedded again) and committed in batches, so an interrupted run keeps what it did; the faiss file is
rebuilt from the database at the end, written to a temporary name and renamed, and a file older than the
database is rebuilt in memory when read.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clipengine.index import ann
from clipengine.index.store import IndexStore, replace_durably

DATABASE = "texts.sqlite"
FAISS_FILE = "texts.faiss"
BATCH = 1024
SCHEMA = "CREATE TABLE IF NOT EXISTS texts (id INTEGER PRIMARY KEY, text TEXT NOT NULL UNIQUE, vector BLOB NOT NULL)"


@dataclass(frozen=True)
class TextsReport:
    index: str
    added: int
    already: int
    total: int

    def to_dict(self) -> dict:
        return {"index": self.index, "added": self.added, "already": self.already, "total": self.total}


def _connect(index_path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(index_path / DATABASE, timeout=30, isolation_level=None)
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute(SCHEMA)
    return conn


def has_texts(index_path: Path) -> bool:
    return (Path(index_path) / DATABASE).is_file()


def index_texts(texts: Sequence[str], index_path: str | os.PathLike,
                progress: Callable[[int, int], None] | None = None) -> TextsReport:
    """Embed and store the texts the index does not hold yet, then rebuild the text search."""
    from clipengine.index.search import Searcher

    index_path = Path(index_path)
    with IndexStore.open(index_path, writable=True), Searcher(index_path) as searcher:  # the lock: one writer
        conn = _connect(index_path)
        try:
            known = {t for (t,) in conn.execute("SELECT text FROM texts")}
            todo = [t for t in dict.fromkeys(texts) if t not in known]
            for start in range(0, len(todo), BATCH):
                batch = todo[start:start + BATCH]
                vectors = np.asarray(searcher.text_vectors(batch), dtype="<f4")
                vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
                conn.execute("BEGIN IMMEDIATE")
                conn.executemany("INSERT INTO texts (text, vector) VALUES (?, ?)",
                                 zip(batch, (v.tobytes() for v in vectors), strict=True))
                conn.execute("COMMIT")
                if progress:
                    progress(start + len(batch), len(todo))
            _write_faiss(conn, index_path, searcher.store.dim)
            (total,) = conn.execute("SELECT COUNT(*) FROM texts").fetchone()
        finally:
            conn.close()
    return TextsReport(str(index_path), len(todo), len(set(texts)) - len(todo), total)


def _build(conn: sqlite3.Connection, dim: int):
    index = ann.new_index("IDMap2,Flat", dim)
    cursor = conn.execute("SELECT id, vector FROM texts ORDER BY id")
    while rows := cursor.fetchmany(65536):
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        vectors = np.frombuffer(b"".join(r[1] for r in rows), dtype="<f4").reshape(len(rows), dim)
        index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), ids)
    return index


def _write_faiss(conn: sqlite3.Connection, index_path: Path, dim: int) -> None:
    import faiss

    tmp = index_path / f".{FAISS_FILE}.tmp-{os.getpid()}"
    faiss.write_index(_build(conn, dim), str(tmp))
    replace_durably(tmp, index_path / FAISS_FILE)


def search_texts(index_path: str | os.PathLike, vector: np.ndarray, k: int) -> list[tuple[float, str]]:
    """The k stored texts nearest `vector` (cosine), best first."""
    import faiss

    index_path = Path(index_path)
    conn = sqlite3.connect(f"file:{index_path / DATABASE}?mode=ro", uri=True, timeout=30)
    try:
        (count,) = conn.execute("SELECT COUNT(*) FROM texts").fetchone()
        q = np.asarray(vector, dtype=np.float32).reshape(1, -1)
        q /= np.linalg.norm(q)
        path = index_path / FAISS_FILE
        current = path.is_file() and path.stat().st_mtime_ns >= (index_path / DATABASE).stat().st_mtime_ns
        index = faiss.read_index(str(path)) if current else None
        if index is None or index.ntotal != count or index.d != q.shape[1]:
            index = _build(conn, q.shape[1])  # behind the database (an interrupted run): rebuilt in memory
        ann.configure_threads(q.shape[1])
        scores, ids = index.search(q, min(k, max(1, index.ntotal)))
        found = [int(i) for i in ids[0] if i >= 0]
        if not found:
            return []
        text_of = dict(conn.execute(f"SELECT id, text FROM texts WHERE id IN ({','.join('?' * len(found))})", found))
        return [(float(s), text_of[int(i)]) for s, i in zip(scores[0], ids[0], strict=True) if int(i) in text_of]
    finally:
        conn.close()
