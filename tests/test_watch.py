"""Watching: an index follows its folders as files appear, change, move and go, never indexes a file still being
written, survives a burst, a folder deleted and made again, a filesystem with no events, the watch limit and
kill -9, and sits idle without using the CPU."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
import warnings

import pytest
from conftest import committed_count

import clipengine.index.watch as watch_module
from clipengine.index.info import index_info
from clipengine.index.pipeline import IndexOptions, index_folder
from clipengine.index.search import Searcher
from clipengine.index.store import IndexStore
from clipengine.index.watch import Watcher, needs_polling
from clipengine.models import ModelSpec
from clipengine.scenes import photo_like

TINY = ModelSpec(arch="tiny")
OPTIONS = IndexOptions(workers=0, runtime="torch")
TIMEOUT = 60  # seconds any change may take to land, on a loaded 2-core machine (the latency is benchmarked)


def jpeg(seed: int) -> bytes:
    import io

    buffer = io.BytesIO()
    photo_like(96, 72, seed=seed).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def searchable(index) -> dict[str, str]:
    """path -> content hash of every searchable file."""
    with IndexStore.open(index) as store:
        return {path: digest for _, path, digest in store.file_hashes()}


def eventually(condition, what: str, timeout: float = TIMEOUT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout} s: {what}")


@pytest.fixture
def library(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.jpg").write_bytes(jpeg(i))
    index_folder(folder, tmp_path / "idx", TINY, OPTIONS, export=False)
    return folder, tmp_path / "idx"


@pytest.fixture
def watching(library):
    folder, index = library
    watcher = Watcher(index, [folder], OPTIONS, settle=0.3).start()
    assert watcher.wait_ready(TIMEOUT)
    yield folder, index, watcher
    watcher.stop()


def test_new_changed_renamed_moved_and_deleted_files_follow_the_folder(watching):
    folder, index, watcher = watching
    (folder / "new.jpg").write_bytes(jpeg(10))
    eventually(lambda: str(folder / "new.jpg") in searchable(index), "a new photo searchable")
    digest = searchable(index)[str(folder / "new.jpg")]
    (folder / "new.jpg").rename(folder / "renamed.jpg")
    (folder / "trip").mkdir()
    (folder / "0.jpg").rename(folder / "trip" / "0.jpg")
    eventually(lambda: {str(folder / "renamed.jpg"), str(folder / "trip" / "0.jpg")} <= set(searchable(index))
               and str(folder / "new.jpg") not in searchable(index), "renamed and moved")
    time.sleep(1)  # the update has finished (its stats are counted after its commits)
    assert searchable(index)[str(folder / "renamed.jpg")] == digest and watcher.stats.embedded == 1  # reused by hash
    old = searchable(index)[str(folder / "1.jpg")]
    (folder / "1.jpg").write_bytes(jpeg(11))  # changed content under the same name
    (folder / "2.jpg").unlink()
    eventually(lambda: searchable(index).get(str(folder / "1.jpg")) not in (None, old)
               and str(folder / "2.jpg") not in searchable(index) and watcher.stats.embedded == 2,
               "changed and deleted")  # (the stats count an update once it has finished, after its commits)
    assert len(searchable(index)) == 3 and index_info(index).count == 3
    with Searcher(index, runtime="torch") as searcher:  # the search structure follows too
        assert {h.path for h in searcher.search_text("a photo", k=10)} == set(searchable(index))


def test_a_file_still_being_written_is_indexed_once_it_is_whole(watching, monkeypatch):
    folder, index, watcher = watching
    seen: list[set[str]] = []
    real = watch_module.index_changes

    def index_changes(*args):
        seen.append(set(args[2]))
        return real(*args)

    monkeypatch.setattr(watch_module, "index_changes", index_changes)
    data = jpeg(20)
    with open(folder / "copying.jpg", "wb") as f:  # a slow copy: a piece every 0.1 s for 1.5 s
        for start in range(0, len(data), len(data) // 15 + 1):
            f.write(data[start:start + len(data) // 15 + 1])
            f.flush()
            time.sleep(0.1)
    eventually(lambda: str(folder / "copying.jpg") in searchable(index), "the copied photo")
    assert sum(str(folder / "copying.jpg") in paths for paths in seen) == 1  # one update, after the last write
    with IndexStore.open(index) as store:
        assert store.skipped() == []  # never read half-written (a truncated JPEG would be skipped)


def test_a_burst_of_files_dropped_at_once_all_land(watching):
    folder, index, _ = watching
    burst = folder / "card"
    burst.mkdir()
    for i in range(300):
        (burst / f"IMG_{i:04d}.jpg").write_bytes(jpeg(1000 + i))
    eventually(lambda: len(searchable(index)) == 303, "all 300", timeout=180)


def test_a_folder_deleted_and_made_again_keeps_its_files_then_catches_up(watching, tmp_path):
    folder, index, watcher = watching
    shutil.move(str(folder), str(tmp_path / "away"))
    eventually(lambda: index_info(index).offline, "marked offline")
    assert len(searchable(index)) == 3  # kept, not removed
    folder.mkdir()  # made again, empty: still offline
    time.sleep(1.5)
    assert index_info(index).offline and len(searchable(index)) == 3
    for f in (tmp_path / "away").iterdir():
        shutil.copy2(f, folder / f.name)
    (folder / "more.jpg").write_bytes(jpeg(30))
    eventually(lambda: not index_info(index).offline and len(searchable(index)) == 4 and watcher.stats.embedded,
               "back, and the new photo")
    time.sleep(1)
    assert watcher.stats.embedded == 1  # the three came back unchanged: not embedded again


def test_a_filesystem_without_events_is_polled(library):
    folder, index = library
    watcher = Watcher(index, [folder], OPTIONS, settle=0.3, poll=True, poll_interval=0.3).start()
    try:
        assert watcher.wait_ready(TIMEOUT) and eventually(lambda: watcher.stats.polling, "polling")
        (folder / "polled.jpg").write_bytes(jpeg(40))
        eventually(lambda: str(folder / "polled.jpg") in searchable(index), "found by polling")
    finally:
        watcher.stop()
    mounts = ("/dev/sda1 / ext4 rw 0 0\nserver:/photos /mnt/nas nfs4 rw 0 0\n"
              "me@host:/pics /home/me/remote fuse.sshfs rw 0 0\n")
    assert needs_polling("/mnt/nas/2024", mounts) and needs_polling("/home/me/remote", mounts)
    assert not needs_polling("/home/me/photos", mounts) and not needs_polling("/mnt/nasty", mounts)


def test_at_the_watch_limit_it_polls_with_one_warning(library, monkeypatch):
    import watchfiles

    folder, index = library
    real = watchfiles.watch

    def limited(*args, force_polling=None, **kwargs):
        if not force_polling:
            raise OSError("OS file watch limit reached. about [\"/photos\"] (Error { kind: MaxFilesWatch })")
        return real(*args, force_polling=force_polling, **kwargs)

    monkeypatch.setattr(watchfiles, "watch", limited)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        watcher = Watcher(index, [folder, folder.parent / "empty"], OPTIONS, settle=0.3, poll_interval=0.3)
        (folder.parent / "empty").mkdir()
        watcher.start()
        try:
            assert watcher.wait_ready(TIMEOUT)
            (folder / "limited.jpg").write_bytes(jpeg(50))
            eventually(lambda: str(folder / "limited.jpg") in searchable(index), "found by polling")
        finally:
            watcher.stop()
    limits = [w for w in caught if "max_user_watches" in str(w.message)]
    assert len(limits) == 1 and "polling" in str(limits[0].message)  # one warning for both folders


def test_idle_it_uses_no_cpu(watching):
    start = time.process_time()
    time.sleep(3)
    assert time.process_time() - start < 0.3  # a busy loop would take the whole 3 s


@pytest.mark.slow
def test_kill_9_mid_commit_and_the_next_start_catches_up(library):
    folder, index = library
    proc = subprocess.Popen([sys.executable, "-m", "clipengine", "index", str(folder), "--index", str(index),
                             "--watch", "--runtime", "torch", "--workers", "0", "--commit-every", "8"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        time.sleep(4)  # its run over the folder, then its watcher (a burst before it is up is caught up anyway)
        burst = folder / "burst"
        burst.mkdir()
        for i in range(120):
            (burst / f"{i}.jpg").write_bytes(jpeg(2000 + i))
        eventually(lambda: committed_count(index) > 3 + 8, "a first commit of the burst", timeout=120)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert committed_count(index) < 123
    watcher = Watcher(index, [folder], OPTIONS, settle=0.3).start()
    try:
        assert watcher.wait_ready(TIMEOUT)  # its catch-up is a normal run
        assert len(searchable(index)) == 123
    finally:
        watcher.stop()


def test_serve_watch_keeps_a_served_index_in_step(library):
    from clipengine.serve.state import Service, ServiceConfig

    folder, index = library
    service = Service(ServiceConfig({"photos": index}, watch=True))
    try:
        (served,) = service.indexes.values()
        assert len(service.watchers) == 1 and service.watchers[0].folders == [str(folder)]
        (folder / "served.jpg").write_bytes(jpeg(60))
        eventually(lambda: served.describe()["count"] == 4, "the served index's count")
        with served.open() as searcher:
            assert str(folder / "served.jpg") in {h.path for h in searcher.search_text("a photo", k=10)}
    finally:
        service.close()
