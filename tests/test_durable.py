"""The one crash-safe write: all or nothing, nothing left behind on failure, leftovers of dead writers found."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from clipengine.durable import (
    abandoned,
    remove_abandoned,
    replace_durably,
    replacing,
    temporary_name,
    write_atomic,
    write_json_atomic,
)


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing(tmp_path):
    target = tmp_path / "f.json"
    write_json_atomic(target, {"a": 1})
    with pytest.raises(RuntimeError), replacing(target) as tmp:
        tmp.write_text("half of it")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == '{\n  "a": 1\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]


def test_a_directory_replaces_a_directory_whole(tmp_path):
    final = tmp_path / "d"
    final.mkdir()
    (final / "old").write_text("old")
    with replacing(final) as tmp:
        tmp.mkdir()
        (tmp / "new").write_text("new")
    assert [p.name for p in final.iterdir()] == ["new"]
    other = tmp_path / "e"
    other.mkdir()
    with pytest.raises(FileExistsError):
        replace_durably(other, final, exclusive=True)
    assert [p.name for p in final.iterdir()] == ["new"]


def test_a_secret_is_never_readable_by_others(tmp_path):
    write_atomic(tmp_path / "s", "token", mode=0o600)
    assert oct((tmp_path / "s").stat().st_mode)[-3:] == "600" and (tmp_path / "s").read_text() == "token"


def test_leftovers_of_dead_writers_are_told_from_live_ones(tmp_path):
    mine = temporary_name(tmp_path / "x")
    dead_pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout.strip()
    theirs = mine.with_name(mine.name.replace(f"-{os.getpid()}-", f"-{dead_pid}-"))
    assert theirs != mine and not abandoned(mine) and abandoned(theirs)
    assert not abandoned(tmp_path / "plain-name")
    mine.write_text("being written")
    theirs.mkdir()
    (theirs / "part").write_text("left by a kill -9")
    assert remove_abandoned(tmp_path) == 1
    assert mine.exists() and not theirs.exists()
