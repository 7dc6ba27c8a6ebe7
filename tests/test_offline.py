"""Libraries on drives that come and go: a folder that is away keeps its files (offline, out of searches),
they come back with no re-embedding, and only `forget` removes a folder on purpose."""

from __future__ import annotations

import json
import shutil
import sqlite3

import pytest
from conftest import CliRunner

from clipengine.cli import app
from clipengine.errors import BadInput
from clipengine.index.duplicates import find_duplicates
from clipengine.index.filters import Filter
from clipengine.index.info import index_info
from clipengine.index.pipeline import forget_folder, index_folder
from clipengine.index.search import Searcher
from clipengine.index.store import IndexStore
from clipengine.models import ModelSpec
from clipengine.scenes import photo_like

TINY = ModelSpec(arch="tiny")
runner = CliRunner()


def cli(*args, code: int = 0):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, (result.stdout, result.stderr, result.exception)
    return result


def photos(folder, n: int, seed: int):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        photo_like(96, 72, seed=seed + i).save(folder / f"{seed}-{i}.jpg")
    return folder


@pytest.fixture
def library(tmp_path):
    """~/photos (3 photos) and ~/usb/photos (4 photos, one a copy of a ~/photos one), both indexed."""
    home = photos(tmp_path / "photos", 3, seed=10)
    usb = photos(tmp_path / "usb" / "photos", 3, seed=20)
    shutil.copyfile(home / "10-0.jpg", usb / "copy.jpg")
    index = tmp_path / "idx"
    for folder in (home, usb):
        index_folder(folder, index, TINY, workers=0, export=False)
    return home, usb, index


def unplug(usb, tmp_path):
    """The drive goes away: its mount point stays, empty."""
    shutil.move(str(usb), str(tmp_path / "drive"))
    usb.mkdir()


def plug_in(usb, tmp_path):
    usb.rmdir()
    shutil.move(str(tmp_path / "drive"), str(usb))


def found_paths(index, **where) -> set[str]:
    with Searcher(index, runtime="torch") as searcher:
        return {h.path for h in searcher.search_text("a photo", k=50, where=Filter(**where))}


def test_an_empty_mount_point_keeps_the_library_offline_and_it_returns_without_embedding(library, tmp_path):
    home, usb, index = library
    assert len(found_paths(index)) == 7
    unplug(usb, tmp_path)
    report = index_folder(usb, index, workers=0)
    assert report.removed == 0 and report.count == 7  # nothing dropped: not 4 files deleted
    assert report.offline == [{"folder": str(usb), "reason": "the folder is empty", "files": 4}]
    assert found_paths(index) == {str(p) for p in home.iterdir()}  # searches leave the away files out
    assert len(found_paths(index, include_offline=True)) == 7  # unless asked
    assert [g.size for g in find_duplicates(index, 0.9999)] == []  # the copy is on the drive: no pair while it is away
    assert [g.size for g in find_duplicates(index, 0.9999, where=Filter(include_offline=True))] == [2]
    info = index_info(index)
    assert [(o["folder"], o["files"], o["reason"]) for o in info.offline] == [(str(usb), 4, "the folder is empty")]
    assert index_folder(home, index, workers=0).removed == 0  # another folder's run leaves it offline
    assert index_info(index).offline[0]["folder"] == str(usb)

    plug_in(usb, tmp_path)
    back = index_folder(usb, index, workers=0)
    assert (back.embedded, back.reused, back.unchanged, back.removed) == (0, 0, 4, 0)  # no re-embedding
    assert back.offline == [] and index_info(index).offline == []
    assert len(found_paths(index)) == 7


def test_a_missing_folder_is_offline_and_one_the_index_never_had_is_an_error(library, tmp_path):
    _, usb, index = library
    shutil.move(str(usb), str(tmp_path / "drive"))
    result = cli("index", usb, "--index", index)
    assert f"offline: {usb} (4 files: the folder is missing" in result.stdout
    assert f"clipengine forget {usb}" in result.stdout and "removed 0" in result.stdout
    assert "offline   " + str(usb) in cli("info", "--index", index).stdout
    hits = json.loads(cli("search", "a photo", "--index", index, "-k", "20", "--include-offline", "--json").stdout)
    assert len(hits) == 7 and len(json.loads(cli("search", "a photo", "--index", index, "--json").stdout)) == 3
    with pytest.raises(BadInput, match="folder not found"):
        index_folder(tmp_path / "never-indexed", index)


def test_a_folder_on_another_device_is_offline_unless_the_library_moved(library):
    _, usb, index = library
    with sqlite3.connect(index / "meta.sqlite") as db:  # as if the last scan saw the drive mounted there
        db.execute("UPDATE roots SET device = device + 1 WHERE path = ?", (str(usb),))
    (usb / "written-to-the-bare-mount-point.jpg").write_bytes((usb / "copy.jpg").read_bytes())
    report = index_folder(usb, index, workers=0)
    assert report.offline[0]["reason"].startswith("it is on another device") and report.embedded == 0
    moved = index_folder(usb, index, workers=0, new_device=True)
    assert moved.offline == [] and moved.reused == 1 and moved.unchanged == 4
    again = index_folder(usb, index, workers=0)  # the new device is recorded: an ordinary run
    assert again.offline == [] and again.unchanged == 5


def test_files_gone_from_a_folder_that_is_there_are_removed_and_an_indexed_folder_inside_stays(tmp_path):
    library = photos(tmp_path / "library", 3, seed=30)
    drive = photos(library / "drive", 2, seed=40)  # a drive mounted inside the library, indexed on its own too
    index = tmp_path / "idx"
    for folder in (library, drive):
        index_folder(folder, index, TINY, workers=0, export=False)
    (library / "30-0.jpg").unlink()
    for f in drive.iterdir():
        f.unlink()  # unmounted: an empty directory in the library's walk
    report = index_folder(library, index, workers=0)
    assert report.removed == 1 and report.count == 4  # the deleted photo goes; the drive's two stay
    assert report.offline == [{"folder": str(drive), "reason": "the folder is empty", "files": 2}]


def test_forget_removes_a_folder_on_purpose_with_its_vectors(library, tmp_path):
    home, usb, index = library
    unplug(usb, tmp_path)
    index_folder(usb, index, workers=0)
    with IndexStore.open(index) as store:
        before = store.counts()["unique_vectors"]
    result = json.loads(cli("forget", usb, "--index", index, "--json").stdout)
    assert result == {"folder": str(usb), "removed": 4}
    info = index_info(index)
    assert info.count == 3 and info.offline == [] and str(usb) not in info.folders
    assert info.unique_vectors == before - 3  # the copy's vector is shared with ~/photos and stays
    assert found_paths(index, include_offline=True) == {str(p) for p in home.iterdir()}
    with Searcher(index, runtime="torch") as searcher:
        assert searcher.faiss.ntotal == 3  # the search structure is in step
    assert "no folder or file under" in cli("forget", tmp_path / "elsewhere", "--index", index, code=1).stderr
    with pytest.raises(BadInput):
        forget_folder(index, usb)  # forgotten already
