"""Walking folders (links, loops, hidden files) and planning what an update must do."""

from __future__ import annotations

import os
from collections import Counter

from conftest import write_bad_inputs

from clipengine.index.scan import FoundFile, describe_not_indexed, plan_update, scan_folder
from clipengine.index.store import Recorded


def test_scan_finds_images_recursively_and_reports_unreadable_entries(tmp_path):
    expected = write_bad_inputs(tmp_path)
    (tmp_path / "readme.txt").write_text("not an image extension")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "x.jpg").write_bytes(b"x")
    (tmp_path / "._IMG_0001.jpg").write_bytes(b"apple double")
    found = list(scan_folder(tmp_path))
    by_name = {os.path.relpath(f.path, tmp_path): f for f in found}
    assert len(by_name) == len(found), "every file is reported exactly once, despite the directory loop"
    assert set(by_name) == set(expected)
    for name, outcome in expected.items():
        problem = by_name[name].problem
        if "link" in outcome or "loop" in outcome:
            assert problem == outcome, name
        else:
            assert problem is None, name


def test_everything_the_walk_passes_over_is_counted_by_kind(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"x")
    for name in ("b.xmp", "c.XMP", "d.pdf", "README", "clip.mp4", "VID.MOV", ".DS_Store"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "x.jpg").write_bytes(b"x")  # inside a hidden folder: the folder is what is passed over
    os.mkfifo(tmp_path / "pipe.jpg")  # named like an image, and not a file
    passed: Counter[str] = Counter()
    assert [os.path.basename(f.path) for f in scan_folder(tmp_path, videos=False, passed_over=passed)] == ["a.jpg"]
    assert passed == {".xmp": 2, ".pdf": 1, "no extension": 1, ".mp4": 1, ".mov": 1, "hidden": 2,
                      "not a regular file": 1}
    assert [os.path.basename(f.path) for f in scan_folder(tmp_path)] == ["VID.MOV", "a.jpg", "clip.mp4"]
    line = describe_not_indexed(dict(passed.most_common()))
    assert "2 .xmp" in line and "1 .pdf" in line and "(no decoder)" in line
    assert "1 .mov, 1 .mp4 (--no-video)" in line and "2 hidden (--include-hidden indexes them)" in line
    assert "1 with no extension" in line and "1 not a regular file (sockets, pipes or devices)" in line
    counted: Counter[str] = Counter()
    list(scan_folder(tmp_path, include_hidden=True, passed_over=counted))
    assert "hidden" not in counted and counted["no extension"] == 2  # walked into, .DS_Store is a file like any other


def test_scan_includes_hidden_files_when_asked(tmp_path):
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "x.jpg").write_bytes(b"x")
    assert [f.path for f in scan_folder(tmp_path)] == []
    assert [f.path for f in scan_folder(tmp_path, include_hidden=True)] == [str(tmp_path / ".hidden" / "x.jpg")]


def test_scan_follows_directory_links_once(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "a.png").write_bytes(b"x")
    (tmp_path / "link").symlink_to(tmp_path / "real", target_is_directory=True)
    paths = [os.path.relpath(f.path, tmp_path) for f in scan_folder(tmp_path)]
    assert paths == ["link/a.png"]  # 'link' sorts first; the same directory is not walked twice


def test_scan_reports_unreadable_directory(tmp_path, monkeypatch):
    (tmp_path / "locked").mkdir()
    real_scandir = os.scandir

    def scandir(path):
        if os.path.basename(path) == "locked":  # chmod cannot lock out root, who runs CI
            raise PermissionError(13, "Permission denied", path)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    found = list(scan_folder(tmp_path))
    assert [(f.path, f.problem) for f in found] == [(str(tmp_path / "locked"), "directory permission denied")]


def rec(i, size=10, mtime=1, skipped=False):
    return Recorded(i, size, mtime, skipped)


def test_plan_new_changed_unchanged_and_gone():
    found = [FoundFile("/r/new.jpg", 1, 1), FoundFile("/r/same.jpg", 10, 1), FoundFile("/r/edit.jpg", 11, 1),
             FoundFile("/r/touched.jpg", 10, 2), FoundFile("/r/bad.jpg", 0, 0, "broken symbolic link")]
    recorded = {"/r/same.jpg": rec(1), "/r/edit.jpg": rec(2), "/r/touched.jpg": rec(3), "/r/gone.jpg": rec(4)}
    plan = plan_update(iter(found), recorded)
    assert [f.path for f in plan.to_embed] == ["/r/new.jpg", "/r/edit.jpg", "/r/touched.jpg"]
    assert [f.path for f in plan.problems] == ["/r/bad.jpg"]
    assert sorted(plan.remove_ids) == [2, 3, 4]  # changed files lose their old rows; gone ones too
    assert plan.unchanged == 1 and plan.changed == 2 and not plan.is_noop


def test_plan_unchanged_folder_is_a_noop_and_skips_are_retried_only_on_request():
    found = [FoundFile("/r/a.jpg", 10, 1), FoundFile("/r/b.jpg", 10, 1)]
    recorded = {"/r/a.jpg": rec(1), "/r/b.jpg": rec(2, skipped=True)}
    assert plan_update(iter(found), recorded).is_noop
    retry = plan_update(iter(found), recorded, retry_skipped=True)
    assert [f.path for f in retry.to_embed] == ["/r/b.jpg"] and retry.remove_ids == [2]
