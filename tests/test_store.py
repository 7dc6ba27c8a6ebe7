"""The on-disk index: creation, commits, the faiss view, crash states, corruption, locking."""

from __future__ import annotations

import json
import os
import sqlite3

import numpy as np
import pytest

from clipengine.errors import BadInput, IndexCorrupt, IndexLocked, IndexNotFound
from clipengine.index.faiss_view import FaissPolicy, SearchStructure
from clipengine.index.location import DATABASE, FAISS_FILE, MANIFEST, resolve_index_path
from clipengine.index.store import FileRecord, IndexStore, remove_index

DIM = 8


def source():
    return {"source": "random", "arch": "tiny", "seed": 0, "identity": "random:tiny:seed0", "embed_dim": DIM,
            "preprocess": {}}


def unit(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def record(name: str, seed: int, **kw) -> FileRecord:
    return FileRecord(f"/photos/{name}", 100 + seed, seed, hash=f"h{seed}", width=4, height=3, vector=unit(seed), **kw)


def snapshot(path):
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in path.iterdir()}


def search_ids(store: IndexStore, seed: int, k: int = 3) -> list[int]:
    _, ids = SearchStructure(store).view().search(unit(seed)[None], k)
    return [int(i) for i in ids[0] if i >= 0]


@pytest.fixture
def store(tmp_path):
    s = IndexStore.create(tmp_path / "idx", source(), FaissPolicy().section(DIM))
    yield s
    s.close()


def test_create_writes_a_self_describing_index(tmp_path, store):
    manifest = json.loads((tmp_path / "idx" / MANIFEST).read_text())
    assert manifest["format"] == "clipengine-index" and manifest["format_version"] == 1
    assert manifest["model"]["identity"] == "random:tiny:seed0" and manifest["dim"] == DIM
    assert manifest["metric"] == "cosine" and manifest["faiss"]["policy"]["factory"] is None
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no leftover temp directory


def test_commit_and_search_through_the_faiss_view(store):
    store.commit([record("a.jpg", 1), record("b.jpg", 2), FileRecord("/photos/bad.jpg", 1, 1, skip_reason="broken")])
    assert store.counts() == {"count": 2, "skipped": 1, "unique_vectors": 2, "videos": 0, "frames": 0}
    assert store.skipped() == [("/photos/bad.jpg", "broken")]
    ids = search_ids(store, 2)
    assert store.rows(ids)[ids[0]].path == "/photos/b.jpg"
    assert SearchStructure(store).save() and not SearchStructure(store).save()  # second call: already current


def test_ids_are_never_reused_and_changed_files_get_new_ids(store):
    store.commit([record("a.jpg", 1), record("b.jpg", 2)])
    old = store.recorded_under("/photos")
    store.commit([], remove_ids=[old["/photos/b.jpg"].id])
    store.commit([record("b.jpg", 3), record("a.jpg", 4)])  # b re-added, a replaced in place by path
    new = store.recorded_under("/photos")
    assert new["/photos/b.jpg"].id > max(r.id for r in old.values())
    assert new["/photos/a.jpg"].id != old["/photos/a.jpg"].id
    assert sorted(search_ids(store, 4, k=5)) == sorted(r.id for r in new.values())


def test_recorded_under_is_scoped_to_the_folder(store):
    store.commit([record("a.jpg", 1), FileRecord("/photos-old/x.jpg", 1, 1, "h9", 1, 1, unit(9))])
    assert list(store.recorded_under("/photos")) == ["/photos/a.jpg"]


def test_a_faiss_file_behind_the_database_is_caught_up(tmp_path, store):
    store.commit([record("a.jpg", 1), record("b.jpg", 2)])
    SearchStructure(store).save()
    # crash window: a commit landed but the process died before the faiss file was rewritten
    store.commit([record("c.jpg", 3)], remove_ids=[store.recorded_under("/photos")["/photos/a.jpg"].id])
    before = snapshot(tmp_path / "idx")
    reader = IndexStore.open(tmp_path / "idx")
    assert not SearchStructure(reader).current
    paths = {r.path for r in reader.rows(search_ids(reader, 3, k=5)).values()}
    assert paths == {"/photos/b.jpg", "/photos/c.jpg"}
    assert snapshot(tmp_path / "idx") == before  # reading repaired in memory only
    reader.close()
    assert SearchStructure(store).save() and SearchStructure(store).current


def test_a_damaged_or_missing_faiss_file_is_rebuilt(tmp_path, store):
    store.commit([record("a.jpg", 1), record("b.jpg", 2)])
    SearchStructure(store).save()
    (tmp_path / "idx" / FAISS_FILE).write_bytes(b"garbage")
    assert len(search_ids(store, 1)) == 2
    (tmp_path / "idx" / FAISS_FILE).unlink()
    assert not SearchStructure(store).current and len(search_ids(store, 1)) == 2
    assert SearchStructure(store).save()


def test_uncommitted_work_is_rolled_back(store):
    store.commit([record("a.jpg", 1)])
    bad = FileRecord("/photos/x.jpg", 1, 1, hash=None, skip_reason=None)  # violates the schema's CHECK
    with pytest.raises(sqlite3.IntegrityError):
        store.commit([record("b.jpg", 2), bad])
    assert store.counts()["count"] == 1 and store.generation == 1


def test_unused_vectors_are_dropped_only_when_asked(store):
    store.commit([record("a.jpg", 1), record("b.jpg", 2)])
    store.commit([], remove_ids=[store.recorded_under("/photos")["/photos/a.jpg"].id])
    assert "h1" in store.known_hashes()  # still reusable, e.g. by a moved file later in the run
    assert store.drop_unused_vectors() == 1 and store.known_hashes() == {"h2"}


def test_missing_and_foreign_directories(tmp_path):
    with pytest.raises(IndexNotFound, match="clipengine index FOLDER"):
        IndexStore.open(tmp_path / "nope")
    (tmp_path / "other").mkdir()
    with pytest.raises(IndexNotFound, match="not a clipengine index"):
        IndexStore.open(tmp_path / "other")


@pytest.mark.parametrize("damage", ["garbage", "wrong-format", "missing-key", "newer", "no-database", "bad-database"])
def test_damaged_index_is_refused_and_left_untouched(tmp_path, store, damage):
    store.commit([record("a.jpg", 1)])
    SearchStructure(store).save()
    store.close()
    root = tmp_path / "idx"
    manifest = json.loads((root / MANIFEST).read_text())
    if damage == "garbage":
        (root / MANIFEST).write_text("{not json")
    elif damage == "wrong-format":
        (root / MANIFEST).write_text(json.dumps({**manifest, "format": "something-else"}))
    elif damage == "missing-key":
        del manifest["model"]
        (root / MANIFEST).write_text(json.dumps(manifest))
    elif damage == "newer":
        (root / MANIFEST).write_text(json.dumps({**manifest, "format_version": 99}))
    elif damage == "no-database":
        (root / DATABASE).unlink()
    else:
        (root / DATABASE).write_bytes(b"this is not sqlite" * 100)
    before = snapshot(root)
    for writable in (False, True):
        with pytest.raises(IndexCorrupt) as e:
            IndexStore.open(root, writable=writable)
        assert ("newer clipengine" if damage == "newer" else "--rebuild") in str(e.value)
    assert snapshot(root) == before


def test_one_writer_at_a_time(tmp_path, store):
    with pytest.raises(IndexLocked, match=str(os.getpid())):
        IndexStore.open(tmp_path / "idx", writable=True)
    IndexStore.open(tmp_path / "idx").close()  # readers are welcome
    store.close()
    IndexStore.open(tmp_path / "idx", writable=True).close()


def test_remove_index_refuses_what_is_not_an_index(tmp_path, store):
    store.close()
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "thesis.tex").write_text("...")
    with pytest.raises(BadInput, match="refusing"):
        remove_index(tmp_path / "precious")
    remove_index(tmp_path / "idx")
    assert not (tmp_path / "idx").exists()


def test_index_names_and_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPENGINE_INDEX_DIR", str(tmp_path / "home"))
    assert resolve_index_path("photos") == (tmp_path / "home" / "photos").resolve()
    assert resolve_index_path("photos", tmp_path / "elsewhere") == (tmp_path / "elsewhere" / "photos").resolve()
    assert resolve_index_path(str(tmp_path / "p")) == tmp_path / "p"
    assert resolve_index_path("./rel").is_absolute()
    monkeypatch.delenv("CLIPENGINE_INDEX_DIR")
    from pathlib import Path

    import clipengine

    checkout = Path(clipengine.__file__).resolve().parent.parent
    assert resolve_index_path("photos") == checkout / "indexes" / "photos"


def test_an_installed_package_keeps_indexes_and_caches_in_the_users_directories(tmp_path, monkeypatch):
    """A wheel's package sits in site-packages with no checkout around it: indexes must not go there."""
    from clipengine import cache
    from clipengine.index import location

    site = tmp_path / "venv" / "lib" / "site-packages"
    (site / "clipengine" / "index").mkdir(parents=True)
    (site / "indexes").mkdir()  # even a folder of that name beside the package is not a checkout's
    monkeypatch.setattr(location, "__file__", str(site / "clipengine" / "index" / "location.py"))
    monkeypatch.delenv("CLIPENGINE_INDEX_DIR")
    monkeypatch.delenv("CLIPENGINE_CACHE_DIR")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert resolve_index_path("photos") == (tmp_path / "data" / "clipengine" / "indexes" / "photos").resolve()
    assert cache.cache_dir() == tmp_path / "cache" / "clipengine"
    monkeypatch.setenv("CLIPENGINE_INDEX_DIR", str(tmp_path / "mine"))  # the variable still wins
    assert resolve_index_path("photos") == (tmp_path / "mine" / "photos").resolve()
