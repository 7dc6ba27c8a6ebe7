"""What a running service holds: its settings and the indexes it keeps open, one resident `Searcher` each.

Each index's queries run one at a time (a lock per index: the Searcher's sqlite connection and ONNX sessions
are shared), and before each one the searcher follows any commit an `index` run has made meanwhile
(`Searcher.refresh`), so the service answers from the last commit while an index grows, with no restart.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from clipengine.errors import BadInput
from clipengine.index.search import Searcher
from clipengine.sizes import DEFAULT_MAX_PIXELS

DEFAULT_MAX_UPLOAD = 64 * 2**20  # bytes: an upload is held in memory, unlike an indexed file read from disk
REFRESH_EVERY = 0.5  # seconds between checks for new commits


@dataclass
class ServiceConfig:
    indexes: dict[str, Path]  # name -> index directory
    token: str | None = None  # required on every request when set
    max_upload: int = DEFAULT_MAX_UPLOAD
    max_pixels: int = DEFAULT_MAX_PIXELS
    watch: bool = False  # keep each index up to date with its folders as they change (clipengine.index.watch)


@dataclass
class ServedIndex:
    """One index, open for the life of the service."""

    name: str
    path: Path
    searcher: Searcher
    lock: threading.Lock = field(default_factory=threading.Lock)
    checked_at: float = 0.0

    @contextmanager
    def open(self) -> Iterator[Searcher]:
        """The searcher, alone, current with the index's last commit."""
        with self.lock:
            now = time.monotonic()
            if now - self.checked_at >= REFRESH_EVERY:
                self.searcher.refresh()
                self.checked_at = now
            yield self.searcher

    def describe(self) -> dict:
        store = self.searcher.store
        with self.lock:
            return {"name": self.name, "path": str(self.path), "model": store.manifest["model"]["identity"],
                    "count": store.counts()["count"], "generation": store.generation}


class Service:
    """The settings and the open indexes, opened all at once (a missing or damaged index fails here, before
    the socket is bound), closed together."""

    def __init__(self, config: ServiceConfig):
        if not config.indexes:
            raise BadInput("name at least one index to serve: --index NAME")
        self.config = config
        self.indexes: dict[str, ServedIndex] = {}
        self.watchers: list = []
        try:
            for name, path in config.indexes.items():
                self.indexes[name] = ServedIndex(name, path, Searcher(path))
            if config.watch:
                self._watch()
        except BaseException:
            self.close()
            raise

    def _watch(self) -> None:
        """A watcher for every folder of every index, each catching up first; the searchers follow their
        commits as they follow any `index` run's."""
        from clipengine.index.watch import Watcher

        for served in self.indexes.values():
            folders = [path for path, _ in served.searcher.store.folders()]
            if folders:
                self.watchers.append(Watcher(served.path, folders).start())

    def close(self) -> None:
        for watcher in self.watchers:
            watcher.stop()
        for served in self.indexes.values():
            served.searcher.close()
