"""Keep an index in step with its folders as they change: `clipengine index FOLDER --watch`, `serve --watch`.

Events come from watchfiles (the Rust `notify` crate: inotify, FSEvents, ReadDirectoryChangesW), one watcher
thread per folder. They only say where to look: the paths a batch names are planned like an `index` run
restricted to them (`pipeline.index_changes`), so new, changed, deleted, renamed and moved files (the moves
recognised by content hash) go through the same sink and commits as a normal run, and the service and the
page see them through the generation they already follow. What decides the shape:

* **Never half-written.** A changed file is indexed once its size and modification time have held still
  for `settle` seconds (a photo still being copied keeps changing); then it is searchable about a second
  after its last write, plus the time to embed it.
* **A start catches up.** Once its watchers are up, watching runs a normal scan of each folder, so whatever
  changed while nothing watched (or a run killed mid-commit) is found, and nothing falls between the two.
* **No events, no problem.** Folders on filesystems that send no events (NFS, SMB, FUSE, 9p: read from the
  mount table) are polled, as is every folder once the OS watch limit (inotify's `max_user_watches`) is
  reached, with one warning saying how to raise it.
* **Drives come and go.** A folder that disappears, or is emptied or replaced by a bare mount point, follows
  the offline rules of any run (`pipeline.offline_reason`): its files are kept, out of searches; the watcher
  waits for it and catches up with a normal run when it is back.
* **Idle is idle.** Each watcher blocks in Rust; the loop wakes once a second to settle files.
"""

from __future__ import annotations

import os
import queue
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from clipengine.index.pipeline import IndexOptions, IndexReport, index_changes, index_folder

WHOLE = "<whole folder>"  # a watcher's message: scan the folder whole (it came back, or its events were lost)
NO_EVENT_FILESYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "afs", "ceph", "glusterfs", "davfs",
                        "fuse", "sshfs", "vboxsf", "vmhgfs")
WATCH_LIMIT_ADVICE = ("raise it with `sudo sysctl fs.inotify.max_user_watches=1048576` (and in /etc/sysctl.conf to "
                      "keep it)")


def needs_polling(folder: str, mounts: str | None = None) -> bool:
    """Whether `folder` lies on a filesystem that sends no change events (a network or FUSE mount), from the
    mount table (`/proc/mounts`, or `mounts` as its text); False where there is none to read."""
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:
            return False
    best, kind = "", ""
    real = os.path.realpath(folder)
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) > len(best):
            best, kind = point, fields[2]
    return kind.split(".")[0] in NO_EVENT_FILESYSTEMS


@dataclass
class WatchStats:
    """What a watch has done so far (`Watcher.stats`), for the CLI's lines and the tests."""

    updates: int = 0  # index updates run
    embedded: int = 0
    removed: int = 0
    polling: list[str] = field(default_factory=list)  # folders watched by polling, not events
    offline: list[str] = field(default_factory=list)  # folders found away (their files kept)
    last_update: float | None = None  # time.time() of the last update that changed the index


class Watcher:
    """Watches the folders of one index and keeps it up to date, until `stop()`. `run()` blocks; `start()` runs
    it in a thread (the service's way). `on_update` sees each update's report."""

    def __init__(self, index_path: str | os.PathLike, folders: Sequence[str | os.PathLike],
                 options: IndexOptions | None = None, *, settle: float = 1.0, poll: bool = False,
                 poll_interval: float = 2.0, on_update: Callable[[IndexReport], None] | None = None):
        self.index_path = Path(index_path)
        self.folders = [os.path.abspath(os.path.expanduser(os.fspath(f))) for f in folders]
        self.options = options or IndexOptions()
        self.settle = settle
        self.poll = poll
        self.poll_interval = poll_interval
        self.on_update = on_update
        self.stats = WatchStats()
        self._stop = threading.Event()
        self._events: queue.Queue[tuple[str, set[str]]] = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._embedder: object = None
        self._warned_limit = False
        self._ready = threading.Event()  # the first catch-up is done and every folder has its watcher

    # ---- running ---------------------------------------------------------------------------------

    def start(self) -> Watcher:
        thread = threading.Thread(target=self.run, name="clipengine-watch", daemon=True)
        thread.start()
        self._threads.append(thread)
        return self

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout=10)

    def run(self) -> None:
        """Watch each folder, catch up with a normal run over it (what changed while nothing watched), then
        follow the changes until stopped. Watching starts first, so that nothing falls between the two."""
        for folder in self.folders:
            thread = threading.Thread(target=self._watch_folder, args=(folder,), name=f"watch {folder}", daemon=True)
            thread.start()
            self._threads.append(thread)
        for folder in self.folders:
            self._update(folder, {WHOLE})
        self._ready.set()
        pending: dict[tuple[str, str], tuple | None] = {}  # (folder, path) -> the path's state at the last look
        looked = time.monotonic()
        while not self._stop.is_set():
            try:
                folder, paths = self._events.get(timeout=min(1.0, self.settle / 2))
                for path in paths:
                    if path != folder:  # the folder itself: its thread sees it go and come back
                        pending[folder, path] = None
            except queue.Empty:
                pass
            if time.monotonic() - looked < min(1.0, self.settle / 2):
                continue  # a stream of events: still look at least twice per settle time
            looked = time.monotonic()
            ready = self._settled(pending)
            for folder in sorted({f for f, _ in ready}):
                self._update(folder, {p for f, p in ready if f == folder})

    def _settled(self, pending: dict[tuple[str, str], tuple | None]) -> list[tuple[str, str]]:
        """Take from `pending` the (folder, path)s that have held still for `settle` seconds: gone, or a file
        (a folder: everything in it) whose sizes and modification times are as at the last look and older than
        `settle`."""
        ready = []
        now = time.time()
        for key, seen in list(pending.items()):
            state = None if key[1] == WHOLE else _state(key[1])
            if state is None or (seen == state and now - state[-1] / 1e9 >= self.settle):
                del pending[key]
                ready.append(key)
            else:
                pending[key] = state
        return ready

    def _update(self, folder: str, paths: set[str]) -> None:
        """One update of the index: the whole folder, or the paths under it that changed."""
        try:
            if WHOLE in paths or not os.path.isdir(folder) or self._offline(folder):
                report = index_folder(folder, self.index_path, options=self.options)
                assert report is not None
            else:
                report, self._embedder = index_changes(self.index_path, folder, paths, self.options, self._embedder)
        except Exception as e:  # a bad moment (the folder vanished mid-walk): the next event or catch-up retries
            warnings.warn(f"watching {folder}: an update failed ({str(e).splitlines()[0][:200]}); the next change "
                          "retries it", RuntimeWarning, stacklevel=1)
            return
        self.stats.updates += 1
        self.stats.embedded += report.embedded
        self.stats.removed += report.removed
        away = {o["folder"] for o in report.offline}
        self.stats.offline = sorted(away | (set(self.stats.offline) - {folder}))
        if report.embedded or report.removed or report.reused:
            self.stats.last_update = time.time()
        if self.on_update is not None:
            self.on_update(report)

    def _offline(self, folder: str) -> bool:
        """Whether the index holds `folder` as offline: back now, it is scanned whole (it may have changed
        while it was away), which also brings it back into searches."""
        from clipengine.index.store import IndexStore

        with IndexStore.open(self.index_path) as store:
            return folder in store.offline_roots()

    # ---- one folder's events ------------------------------------------------------------------------

    def _watch_folder(self, folder: str) -> None:
        """Feed the folder's changes to the loop; while it is away, wait for it and have it scanned whole when
        it is back; fall back to polling where events cannot be had."""
        polling = self.poll or needs_polling(folder)
        while not self._stop.is_set():
            if not os.path.isdir(folder):
                self._events.put((folder, {WHOLE}))  # marked offline by the update
                while not os.path.isdir(folder) and not self._stop.wait(self.poll_interval):
                    pass
                self._events.put((folder, {WHOLE}))  # back (or made again): catch up
                continue
            if polling and folder not in self.stats.polling:
                self.stats.polling.append(folder)
            try:
                for changes in self._changes(folder, polling):
                    if changes:
                        self._events.put((folder, changes))
                    if not os.path.isdir(folder):
                        break
            except FileNotFoundError:
                continue  # the folder went while the watcher started: wait for it above
            except OSError as e:  # no events to be had here (the watch limit, most likely): poll instead
                if polling:
                    raise
                polling = True
                if not self._warned_limit:
                    self._warned_limit = True
                    warnings.warn(f"watching {folder} by polling every {self.poll_interval:g} s: change events are "
                                  f"not available ({str(e).splitlines()[0][:160]}); if it is inotify's watch limit, "
                                  f"{WATCH_LIMIT_ADVICE}", RuntimeWarning, stacklevel=1)

    def _changes(self, folder: str, polling: bool) -> Iterable[set[str]]:
        import watchfiles

        for changes in watchfiles.watch(folder, watch_filter=None, debounce=400, step=100, stop_event=self._stop,
                                        rust_timeout=1000, yield_on_timeout=True, force_polling=polling,
                                        poll_delay_ms=int(self.poll_interval * 1000), raise_interrupt=False,
                                        ignore_permission_denied=True):
            yield {path for _, path in changes}


def _state(path: str) -> tuple | None:
    """What tells whether `path` still changes: a file's size and mtime; a folder's file count, total size and
    newest mtime (it may be filling up); None when it is gone."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not os.path.isdir(path):
        return st.st_size, st.st_mtime_ns
    count, size, newest = 0, 0, st.st_mtime_ns
    for directory, _, files in os.walk(path):
        for name in files:
            try:
                f = os.stat(os.path.join(directory, name))
            except OSError:
                continue
            count, size, newest = count + 1, size + f.st_size, max(newest, f.st_mtime_ns)
    return count, size, newest


def watch_index(index_path: str | os.PathLike, folders: Sequence[str | os.PathLike], options: IndexOptions | None = None,
                *, settle: float = 1.0, poll: bool = False,
                on_update: Callable[[IndexReport], None] | None = None) -> None:
    """Keep the index at `index_path` up to date with `folders` until interrupted (Ctrl-C)."""
    watcher = Watcher(index_path, folders, options, settle=settle, poll=poll, on_update=on_update)
    try:
        watcher.run()
    except KeyboardInterrupt:
        pass
    finally:
        watcher.stop()
