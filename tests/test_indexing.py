"""Indexing a folder end to end: round trips, incremental updates, moves, bad files, crashes."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
from conftest import interrupted_run, write_bad_inputs
from synthetic import write_photo_folder

import clipengine.decode as decode_module
import clipengine.index.pipeline as indexing_module
from clipengine.errors import BadInput, IndexCorrupt, ModelMismatch
from clipengine.index.ann import index_ids
from clipengine.index.faiss_view import SearchStructure
from clipengine.index.info import index_info
from clipengine.index.location import MANIFEST
from clipengine.index.pipeline import IndexOptions, index_folder
from clipengine.index.search import Searcher
from clipengine.index.store import IndexStore
from clipengine.models import ModelSpec
from clipengine.scenes import photo_like

TINY = ModelSpec(arch="tiny")


def build(folder, index, **kw):
    kw.setdefault("workers", 0)
    return index_folder(folder, index, kw.pop("spec", TINY), **kw)


def all_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix == ".jpg")


def assert_consistent(index: Path, expected_paths) -> None:
    """Every expected file is searchable exactly once, and the faiss view agrees with the database."""
    with IndexStore.open(index) as store:
        rows = store.rows(store.ids_under("/"))
        assert sorted(r.path for r in rows.values()) == sorted(str(p) for p in expected_paths)
        view = SearchStructure(store).view()
        assert view.ntotal == len(rows)
        assert sorted(index_ids(view.index).tolist()) == sorted(rows)


def test_round_trip_every_image_finds_itself_first(photos, tmp_path):
    index = tmp_path / "idx"
    report = build(photos, index, commit_every=5)
    assert (report.embedded, report.skipped, report.count) == (12, 0, 12)
    assert_consistent(index, all_files(photos))
    copies = tmp_path / "queries"
    copies.mkdir()
    with Searcher(index) as searcher:
        for path in all_files(photos):
            hits = searcher.search_image(path, k=3)
            assert hits[0].path == str(path) and hits[0].score == pytest.approx(1.0, abs=1e-5)
            # the same picture under another name, not in the index, is embedded by the model
            shutil.copy(path, copies / path.name)
            hits = searcher.search_image(copies / path.name, k=1)
            assert hits[0].path == str(path) and hits[0].score == pytest.approx(1.0, abs=1e-4)


def test_unchanged_folder_decodes_nothing(photos, tmp_path, monkeypatch):
    index = tmp_path / "idx"
    build(photos, index)

    def refuse(*a, **k):
        raise AssertionError("nothing should be decoded or embedded")

    monkeypatch.setattr(decode_module, "open_image", refuse)
    monkeypatch.setattr("clipengine.models.load_model", refuse)
    report = build(photos, index)
    assert (report.embedded, report.reused, report.removed, report.unchanged) == (0, 0, 0, 12)


def test_new_changed_deleted_and_moved_files(photos, tmp_path):
    index = tmp_path / "idx"
    build(photos, index)
    files = all_files(photos)
    write_photo_folder(photos / "c", 2, (120, 90), seed=500)  # 2 new
    photo_like(200, 150, seed=999).save(files[0])  # 1 changed (new content)
    os.utime(files[0], ns=(1, 1))
    files[1].unlink()  # 1 deleted
    (photos / "renamed").mkdir()
    files[2].rename(photos / "renamed" / "moved.jpg")  # 1 moved
    shutil.copy(files[3], photos / "duplicate.jpg")  # 1 duplicate of an indexed file
    report = build(photos, index)
    assert report.embedded == 3  # the 2 new files and the changed one
    assert report.reused == 2  # the moved file and the duplicate: recognised by content, not decoded
    assert report.removed == 3  # the changed file's old row, the deleted file, the moved file's old path
    assert report.count == 14
    assert_consistent(index, all_files(photos))
    with Searcher(index) as searcher:
        hit = searcher.search_image(photos / "renamed" / "moved.jpg", k=1)[0]
        assert hit.path == str(photos / "renamed" / "moved.jpg") and hit.score == pytest.approx(1.0, abs=1e-5)
        changed = searcher.search_image(files[0], k=1)[0]
        assert changed.path == str(files[0]) and changed.score == pytest.approx(1.0, abs=1e-5)


def test_each_folder_updates_only_its_own_files(photos, tmp_path):
    index = tmp_path / "idx"
    build(photos / "a", index)
    build(photos / "b", index)
    assert index_info(index).count == 12
    for f in sorted((photos / "b").iterdir())[1:]:
        f.unlink()  # five of b's six photos deleted (all six: an empty folder, kept offline: tests/test_offline.py)
    report = build(photos / "b", index)
    assert report.removed == 5 and report.count == 7
    info = index_info(index)
    assert info.unique_vectors == 7  # a run that only removes files drops their vectors too
    assert sorted(info.folders) == sorted([str(photos / "a"), str(photos / "b")])


def test_options_object_and_keywords_lay_over_it(photos, tmp_path):
    options = IndexOptions(workers=0, commit_every=5, exact_decode=True)
    with pytest.raises(BadInput, match="--commit-every"):
        index_folder(photos, tmp_path / "idx", TINY, options, commit_every=0)
    with pytest.raises(TypeError, match="commit_evry"):
        index_folder(photos, tmp_path / "idx", TINY, options, commit_evry=5)
    assert not (tmp_path / "idx").exists()  # refused before anything was created
    calls = []
    report = index_folder(photos / "a", tmp_path / "idx", TINY, options, retry_skipped=True,
                          progress=lambda done, total: calls.append((done, total)))
    assert report.embedded == 6 and calls[-1] == (6, 6)


def test_every_bad_input_is_skipped_counted_and_listed(tmp_path):
    folder = tmp_path / "bad"
    expected = write_bad_inputs(folder)
    index = tmp_path / "idx"
    report = build(folder, index)
    skipped = {os.path.relpath(s["path"], folder): s["reason"] for s in index_info(index).skipped_files}
    ok = {name for name, outcome in expected.items() if outcome == "ok"}
    assert report.count == len(ok) and report.skipped == len(expected) - len(ok)
    assert set(skipped) == set(expected) - ok
    for name, reason in skipped.items():
        assert expected[name] in reason, (name, reason)
    assert_consistent(index, [folder / name for name in ok])
    rerun = build(folder, index)  # a second run changes nothing: skipped files stay skipped
    assert (rerun.embedded, rerun.skipped, rerun.removed) == (0, 0, 0)


def test_with_worker_processes(tmp_path):
    folder = tmp_path / "bad"
    expected = write_bad_inputs(folder)
    report = build(folder, tmp_path / "idx", workers=2, batch_size=3)
    assert report.count == sum(outcome == "ok" for outcome in expected.values())


def test_file_deleted_between_scan_and_decode(photos, tmp_path, monkeypatch):
    victim = all_files(photos)[4]
    real_scan = indexing_module.scan_folder

    def scan_then_delete(*args, **kwargs):
        found = list(real_scan(*args, **kwargs))
        victim.unlink()
        return iter(found)

    monkeypatch.setattr(indexing_module, "scan_folder", scan_then_delete)
    report = build(photos, tmp_path / "idx")
    assert report.count == 11
    assert report.skips == [{"path": str(victim), "reason": "file disappeared before it could be read"}]
    monkeypatch.setattr(indexing_module, "scan_folder", real_scan)
    assert build(photos, tmp_path / "idx").removed == 1  # the next run forgets it


def test_retry_skipped(tmp_path):
    folder = tmp_path / "f"
    write_photo_folder(folder, 2, (400, 300), fmt="PNG")
    index = tmp_path / "idx"
    assert build(folder, index, max_pixels=50_000).skipped == 2  # PNGs decode at full size
    assert build(folder, index, max_pixels=200_000).embedded == 0
    report = build(folder, index, max_pixels=200_000, retry_skipped=True)
    assert (report.embedded, report.count) == (2, 2)


def test_model_mismatch_refused_and_nothing_changed(photos, tmp_path):
    index = tmp_path / "idx"
    build(photos / "a", index)
    before = {p.name: p.stat().st_mtime_ns for p in index.iterdir() if p.name != "lock"}
    with pytest.raises(ModelMismatch, match="built with tiny"):
        build(photos / "b", index, spec=ModelSpec("ViT-B-32", "openai"))
    with pytest.raises(ModelMismatch):
        Searcher(index, spec=ModelSpec("ViT-B-16", "openai"))
    assert {p.name: p.stat().st_mtime_ns for p in index.iterdir() if p.name != "lock"} == before
    assert index_info(index).count == 6


def test_a_loaded_model_is_reused_and_checked_against_the_index(photos, tmp_path, tiny_model):
    from clipengine.models import load_model

    index = tmp_path / "idx"
    report = index_folder(photos / "a", index, model=tiny_model, workers=0)
    assert report.count == 6 and index_info(index).model["identity"] == tiny_model.source["identity"]
    with pytest.raises(ModelMismatch, match="the model passed in was built with tiny"):
        index_folder(photos / "a", tmp_path / "other", ModelSpec("ViT-B-32", "openai"), model=tiny_model)
    assert not (tmp_path / "other").exists()
    other = load_model(ModelSpec("tiny", "none"), device="cpu")
    other.source = {**other.source, "identity": "random:tiny:seed1", "seed": 1}
    with pytest.raises(ModelMismatch, match="index .* was built with tiny"):
        index_folder(photos / "b", index, model=other, workers=0)
    assert index_info(index).count == 6


@pytest.mark.slow
def test_corrupt_index_is_refused_untouched_and_rebuild_recovers(photos, tmp_path):
    index = tmp_path / "idx"
    build(photos, index)
    (index / MANIFEST).write_text("{broken")
    before = {p.name: p.stat().st_mtime_ns for p in index.iterdir()}
    with pytest.raises(IndexCorrupt, match="--rebuild"):
        build(photos, index)
    assert {p.name: p.stat().st_mtime_ns for p in index.iterdir()} == before
    assert build(photos, index, rebuild=True).count == 12


def test_bad_folder_and_foreign_index_directory(tmp_path):
    with pytest.raises(BadInput, match="folder not found"):
        build(tmp_path / "missing", tmp_path / "idx")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(BadInput, match="not a folder"):
        build(tmp_path / "file.txt", tmp_path / "idx")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "thesis.tex").write_text("x")
    (tmp_path / "photos").mkdir()
    with pytest.raises(BadInput, match="not a clipengine index"):
        build(tmp_path / "photos", tmp_path / "taken")


def test_search_prefix_and_vector_queries(photos, tmp_path):
    index = tmp_path / "idx"
    build(photos, index)
    with Searcher(index) as searcher:
        query = all_files(photos)[0]
        under_b = searcher.search_image(query, k=20, prefix=str(photos / "b") + os.sep)
        assert len(under_b) == 6 and all(h.path.startswith(str(photos / "b")) for h in under_b)
        assert [h.rank for h in under_b] == list(range(1, 7))
        assert searcher.search_image(query, k=5, prefix="/nowhere/") == []
        vector = searcher.image_vector(query)
        assert searcher.search_vector(vector * 7.5, k=1)[0].path == str(query)  # scale does not matter
        with pytest.raises(BadInput, match="dimension 3"):
            searcher.search_vector(np.ones(3), k=1)
        with pytest.raises(BadInput, match="zero"):
            searcher.search_vector(np.zeros(64), k=1)
        assert len(searcher.search_text("a photo of a dog", k=4)) == 4
        assert len(searcher.search_text("x", k=100)) == 12


KILL_SCRIPT = """
import sys
from clipengine.index.pipeline import index_folder
from clipengine.models import ModelSpec
index_folder(sys.argv[1], sys.argv[2], ModelSpec(arch="tiny"), workers=0, batch_size=4, commit_every=4)
"""


@pytest.fixture(scope="module")
def many_pngs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("many")
    write_photo_folder(folder, 120, (640, 480), fmt="PNG")  # PNG: no draft, so decoding takes a while
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_killed_run_resumes_and_indexes_every_file_exactly_once(many_pngs, tmp_path, sig):
    folder = many_pngs
    index = tmp_path / "idx"
    at_kill = interrupted_run(KILL_SCRIPT, folder, index, 8, sig)
    assert 8 <= at_kill < 120, "the run must be interrupted part-way for this test to mean anything"
    report = build(folder, index, batch_size=16)
    assert report.embedded == 120 - at_kill  # nothing committed is embedded again
    assert report.count == 120
    assert_consistent(index, sorted(folder.iterdir()))
