"""The index on disk: one self-describing directory, safe against a crash at any moment. This module is
its catalogue (manifest, meta.sqlite, the lock); `clipengine.index.faiss_view` keeps vectors.faiss.
File names live in `clipengine.index.location`; every durable write goes through `clipengine.durable`.

    <index>/
      manifest.json   format version, the model source (identity, embedding dim, preprocessing),
                      metric and the faiss policy (memory budget, factory override, target recall);
                      rewritten, atomically, only when the policy changes
      meta.sqlite     the source of truth: files (path, size, mtime, content hash, or skip reason),
                      vectors (content hash -> float32 embedding, width, height), a video's frames
                      (content hash, position -> seconds, embedding), folders indexed, the commit
                      generation, and what the faiss file is (kind, training, tuning, drift);
                      and a caption set (texts: text -> vector, `clipengine index-texts`)
      vectors.faiss   the search structure, derived from meta.sqlite: exact or approximate as
                      clipengine.index.ann chooses. Its ids are `faiss_id(file id, position)`: an image
                      is its file id, a video's frame is the file id plus its position << 40
      texts.faiss     exact search over the caption set (faiss id = texts.id), derived the same way
      lock            flock()ed by the single process allowed to write

Why this shape. Every change is one sqlite transaction (synchronous=FULL), so a `kill -9` leaves
the last committed state and nothing half-written. Vectors live in sqlite keyed by content hash, so a
moved or duplicated photo reuses its embedding and a changed one never overwrites another's. The faiss
file is a *view*: written to a temporary file, fsynced and renamed into place, and tagged with the
generation it reflects. A video is searched by its frames (its own vector, the frames' normalised mean,
answers "more like this" and duplicates); frames are keyed by content hash as vectors are, so a moved video
keeps them. Whenever it is behind (a crash between the two writes, say), it is brought up to
date by id-set difference with the live rows; file ids come from AUTOINCREMENT and are never reused or
rewritten (a changed file gets a new row), so that difference is all a sync needs. The catalogue gives
the structure what it needs through a handful of methods (`live_ids`, `vectors_of`, `generation`,
`read_meta`/`write_meta`) and knows nothing of faiss: the manifest's "faiss" section is the view's to
read and write (`set_manifest_section`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import fcntl
import json
import os
import shutil
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clipengine import __version__
from clipengine.durable import remove_abandoned, replace_durably, temporary_name, write_json_atomic
from clipengine.errors import BadInput, IndexCorrupt, IndexLocked, IndexNotFound
from clipengine.formats import is_video_name
from clipengine.index.filters import DISTANCE_FUNCTION, KEEP_ALL, Filter, folder_range
from clipengine.index.location import DATABASE, ENCODERS_PREFIX, LOCK_FILE, MANIFEST
from clipengine.metadata import MediaInfo
from clipengine.places import Place, distance_km, place_words

FORMAT = "clipengine-index"
FORMAT_VERSION = 1
ENCODERS_PENDING = {"status": "pending"}  # a new index's encoders record, until its first run's export
_READ_CHUNK = 65536

FRAME_SHIFT = 40  # a video frame's faiss id is its file id + (position << FRAME_SHIFT); an image's is its file id
_FILE_MASK = (1 << FRAME_SHIFT) - 1
# Tables added since the first format. An older index gets them when opened for writing; opened read-only, it gets
# empty stand-ins in sqlite's temporary schema, dropped once a writer has made the real ones (`generation`).
ADDED_TABLES = {
    # a caption set stored beside the images (clipengine.index.texts)
    "texts": "(id INTEGER PRIMARY KEY, text TEXT NOT NULL UNIQUE, vector BLOB NOT NULL)",
    # what the last walk of each folder passed over, by kind (clipengine.index.scan)
    "not_indexed": "(folder TEXT NOT NULL, kind TEXT NOT NULL, count INTEGER NOT NULL, PRIMARY KEY (folder, kind))",
    # the frames that stand for a video (clipengine.video), by the video's content hash; position from 1
    "frames": ("(hash TEXT NOT NULL, position INTEGER NOT NULL, seconds REAL NOT NULL, vector BLOB NOT NULL, "
               "PRIMARY KEY (hash, position))"),
    # what a file says of itself (clipengine.metadata), by content hash: `taken` as written (ISO 8601, an offset
    # when the file gives one), `taken_at` the same in seconds since 1970 (a time without a zone read as UTC)
    "media": ("(hash TEXT PRIMARY KEY, kind TEXT NOT NULL, taken TEXT, taken_at REAL, taken_source TEXT NOT NULL, "
              "make TEXT, model TEXT, lens TEXT, latitude REAL, longitude REAL, altitude REAL, duration REAL)"),
    # the names of where a file with a position was taken (clipengine.places), by content hash; `words` is what
    # --place matches (`Place.words`)
    "places": ("(hash TEXT PRIMARY KEY, city TEXT, district TEXT, region TEXT, country TEXT, country_code TEXT, "
               "words TEXT NOT NULL)"),
    # each folder indexed: the device it was on at its last scan, and since when (and why) it is offline, its
    # files kept but out of searches (clipengine.index.pipeline: a drive that is away)
    "roots": "(path TEXT PRIMARY KEY, device INTEGER, offline_since REAL, offline_reason TEXT)",
}
SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE vectors (
    hash TEXT PRIMARY KEY,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    vector BLOB NOT NULL
);
CREATE TABLE files (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- the faiss id; never reused
    path TEXT NOT NULL UNIQUE,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    hash TEXT,                             -- NULL when skipped
    skip_reason TEXT,                      -- NULL when searchable
    indexed_at REAL NOT NULL,
    CHECK ((hash IS NULL) = (skip_reason IS NOT NULL))
);
CREATE INDEX files_hash ON files(hash);
CREATE TABLE folders (path TEXT PRIMARY KEY, indexed_at REAL NOT NULL);
INSERT INTO meta VALUES ('generation', '0'), ('faiss_generation', '-1');
""" + "".join(f"CREATE TABLE {name} {columns};\n" for name, columns in ADDED_TABLES.items())


_ADD_MEDIA = "INSERT OR IGNORE INTO media VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"


def _media_row(digest: str, path: str, info: MediaInfo, duration: float | None) -> tuple:
    taken_at = None
    if info.taken:
        moment = dt.datetime.fromisoformat(info.taken)
        taken_at = (moment if moment.tzinfo else moment.replace(tzinfo=dt.timezone.utc)).timestamp()
    kind = "video" if is_video_name(path) else "image"
    return (digest, kind, info.taken, taken_at, info.taken_source or "mtime", info.make, info.model, info.lens,
            info.latitude, info.longitude, info.altitude, duration)


def faiss_id(file_id: int, position: int = 0) -> int:
    """The search structure's id of a file (position 0) or of a video's frame (position from 1)."""
    return int(file_id) + (int(position) << FRAME_SHIFT)


def file_id_of(ids: np.ndarray) -> np.ndarray:
    """The file ids of search structure ids (a video's frames all give the video's)."""
    return np.asarray(ids, dtype=np.int64) & _FILE_MASK



@dataclass(frozen=True)
class FileRecord:
    """One file's outcome, ready to commit: searchable (hash set) or skipped (skip_reason set)."""

    path: str
    size: int
    mtime_ns: int
    hash: str | None = None
    width: int = 0
    height: int = 0
    vector: np.ndarray | None = None  # None when the hash's vector is already stored (a moved file)
    skip_reason: str | None = None
    frames: tuple[float, ...] = ()  # a video's frames: their moments in seconds, with their vectors below
    frame_vectors: np.ndarray | None = None
    metadata: MediaInfo | None = None  # what the file says of itself, when read (a video: with its duration)
    duration: float | None = None


@dataclass(frozen=True)
class Root:
    """A folder indexed, as `clipengine info` lists it."""

    path: str
    device: int | None  # st_dev at its last scan (None: indexed before devices were recorded)
    offline_since: float | None  # seconds since 1970; None: online
    offline_reason: str | None  # "the folder is empty", ...
    files: int  # searchable files recorded under it

    @property
    def offline(self) -> bool:
        return self.offline_since is not None


@dataclass(frozen=True)
class Recorded:
    """What an index knows of a path: enough to tell whether the file changed (`clipengine.index.scan` plans
    an update from these and a walk of the folder)."""

    id: int
    size: int
    mtime_ns: int
    skipped: bool


@dataclass(frozen=True)
class FileRow:
    id: int
    path: str
    width: int
    height: int
    size: int = 0  # bytes and mtime when indexed (read by `file`): a file that differs now is not the one indexed
    mtime_ns: int = 0
    seconds: float | None = None  # for a video's frame (`rows` of a frame's faiss id): its moment
    taken: str | None = None  # when it was taken (ISO 8601, as the file says it), or else modified (UTC)
    taken_at: float | None = None  # the same in seconds since 1970 (a time without a zone read as UTC)
    place: str | None = None  # where it was taken (`Place.label`), if it has a position


def _file_row(file_id: int, path: str, width: int, height: int, mtime_ns: int, taken: str | None,
              taken_at: float | None, *names: str | None) -> FileRow:
    """A search result's row: a file that gives no taken time is dated by its modification time (as filters do)."""
    if taken_at is None:
        taken_at = mtime_ns / 1e9
        taken = dt.datetime.fromtimestamp(taken_at, dt.timezone.utc).isoformat(timespec="seconds")
    label = Place(*names).label if any(names) else None
    return FileRow(file_id, path, width, height, taken=taken, taken_at=taken_at, place=label)


# --------------------------------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------------------------------


def _connect(db_path: Path, *, readonly: bool) -> sqlite3.Connection:
    uri = f"file:{db_path}?mode={'ro' if readonly else 'rw'}"
    # check_same_thread off: a resident service opens an index once and queries it from its worker threads,
    # one at a time (clipengine.serve holds a lock per index)
    conn = sqlite3.connect(uri, uri=True, timeout=30, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout = 30000")
    conn.create_function(DISTANCE_FUNCTION, 4, distance_km, deterministic=True)  # --near (`Filter.sql`)
    if not readonly:
        conn.execute("PRAGMA synchronous = FULL")
    return conn


def _hint(path: Path) -> str:
    return f"--index {path}"


class IndexStore:
    """One open index. Open it with `IndexStore.open` or `IndexStore.create`; close it (or use `with`)."""

    def __init__(self, path: Path, manifest: dict, conn: sqlite3.Connection, lock_fd: int | None):
        self.path = path
        self.manifest = manifest
        self._conn = conn
        self._lock_fd = lock_fd
        self._stand_ins: set[str] = set()
        self._add_tables()

    def _add_tables(self) -> None:
        """Give an older index the tables added since its format (see ADDED_TABLES)."""
        present = {name for (name,) in self._conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        missing = [name for name in ADDED_TABLES if name not in present]
        if not missing:
            return
        if self.writable:
            with self._transaction():
                for name in missing:
                    self._conn.execute(f"CREATE TABLE IF NOT EXISTS {name} {ADDED_TABLES[name]}")
            return
        for name in missing:
            self._conn.execute(f"CREATE TEMP TABLE IF NOT EXISTS {name} {ADDED_TABLES[name]}")
        self._stand_ins.update(missing)

    def _follow_tables(self) -> None:
        """Drop the stand-ins of tables a writer has since added, so that reads see the real ones."""
        present = {name for (name,) in self._conn.execute("SELECT name FROM main.sqlite_master WHERE type = 'table'")}
        for name in self._stand_ins & present:
            self._conn.execute(f"DROP TABLE temp.{name}")
        self._stand_ins -= present

    # ---- opening -----------------------------------------------------------------------------

    @staticmethod
    def exists(path: Path) -> bool:
        return (path / MANIFEST).is_file()

    @classmethod
    def open(cls, path: str | os.PathLike, *, writable: bool = False) -> IndexStore:
        """Open an existing index; nothing on disk changes unless `writable` (which takes the lock)."""
        path = Path(path)
        if not path.is_dir():
            raise IndexNotFound(f"no index at {path}: build one with `clipengine index FOLDER {_hint(path)}`")
        manifest = cls._read_manifest(path)
        db_path = path / DATABASE
        if not db_path.is_file():
            raise IndexCorrupt(f"index {path} has no {DATABASE}: rebuild it with "
                               f"`clipengine index FOLDER {_hint(path)} --rebuild`")
        try:
            conn = _connect(db_path, readonly=not writable)
            conn.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
        except sqlite3.DatabaseError as e:
            raise IndexCorrupt(f"index {path} is damaged ({DATABASE}: {e}): rebuild it with "
                               f"`clipengine index FOLDER {_hint(path)} --rebuild`") from None
        try:
            lock_fd = cls._lock(path) if writable else None
        except BaseException:
            conn.close()
            raise
        return cls(path, manifest, conn, lock_fd)

    @staticmethod
    def _read_manifest(path: Path) -> dict:
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise IndexNotFound(f"{path} is not a clipengine index (no {MANIFEST}): build one with "
                                f"`clipengine index FOLDER {_hint(path)}`")
        try:
            manifest = json.loads(manifest_path.read_text())
            if manifest.get("format") != FORMAT:
                raise ValueError("not a clipengine manifest")
            if int(manifest["format_version"]) > FORMAT_VERSION:
                raise IndexCorrupt(f"index {path} was written by a newer clipengine (format "
                                   f"{manifest['format_version']}): upgrade clipengine to read it")
            model = manifest["model"]
            int(manifest["dim"]), model["identity"], model["source"], model["arch"]
        except IndexCorrupt:
            raise
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise IndexCorrupt(f"index {path} has a damaged {MANIFEST} ({type(e).__name__}: {e}): rebuild it "
                               f"with `clipengine index FOLDER {_hint(path)} --rebuild`") from None
        return manifest

    @staticmethod
    def _lock(path: Path) -> int:
        fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise IndexLocked(f"index {path} is being updated by process {holder}: wait for it to finish") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        return fd

    @classmethod
    def create(cls, path: str | os.PathLike, model_source: dict, faiss: dict | None = None) -> IndexStore:
        """Create an empty index for vectors of `model_source` (a loaded model's source, with
        embed_dim and preprocess); `faiss` is the manifest's section for the search structure
        (`FaissPolicy.section`; by default the view's defaults apply). Built in a temporary directory
        and renamed into place, so a crash never leaves a half-created index behind."""
        path = Path(path)
        if path.exists():
            raise BadInput(f"{path} already exists")
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_abandoned(path.parent, path.name)  # an index being created when a process was killed
        tmp = temporary_name(path)
        tmp.mkdir()
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "created_by": f"clipengine {__version__}",
            "model": model_source,
            "dim": int(model_source["embed_dim"]),
            "metric": "cosine",
            "faiss": faiss or {},
            "query_encoders": dict(ENCODERS_PENDING),
        }
        conn = sqlite3.connect(tmp / DATABASE)
        conn.executescript(SCHEMA)
        conn.commit()
        conn.close()
        write_json_atomic(tmp / MANIFEST, manifest)
        try:
            replace_durably(tmp, path, exclusive=True)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise BadInput(f"{path} appeared while the index was being created") from None
        return cls.open(path, writable=True)

    def close(self) -> None:
        self._conn.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> IndexStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def writable(self) -> bool:
        return self._lock_fd is not None

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    # ---- reading -----------------------------------------------------------------------------

    def read_meta(self, key: str) -> str | None:
        """A value of the meta table (what derived files such as the search structure record about themselves)."""
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def write_meta(self, **values: str) -> None:
        """Set meta values, all in one transaction."""
        self._require_writable()
        with self._transaction():
            self._conn.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", values.items())

    @property
    def generation(self) -> int:
        """How many commits the catalogue has had: a derived file tagged with an older one is behind."""
        if self._stand_ins:
            self._follow_tables()
        return int(self.read_meta("generation") or 0)

    def recorded_under(self, folder: str) -> dict[str, Recorded]:
        """What the index holds for paths under `folder` (a directory path, absolute)."""
        rows = self._conn.execute(
            "SELECT id, path, size, mtime_ns, skip_reason IS NOT NULL FROM files WHERE path >= ? AND path < ?",
            folder_range(folder))
        return {path: Recorded(i, size, mtime, bool(skipped)) for i, path, size, mtime, skipped in rows}

    def recorded_at(self, paths: Iterable[str]) -> dict[str, Recorded]:
        """What the index holds for exactly these paths (those it has)."""
        found: dict[str, Recorded] = {}
        paths = list(paths)
        for start in range(0, len(paths), 500):
            part = paths[start:start + 500]
            rows = self._conn.execute("SELECT id, path, size, mtime_ns, skip_reason IS NOT NULL FROM files WHERE path "
                                      f"IN ({','.join('?' * len(part))})", part)
            found.update({path: Recorded(i, size, mtime, bool(skipped)) for i, path, size, mtime, skipped in rows})
        return found

    def known_hashes(self) -> set[str]:
        return {h for (h,) in self._conn.execute("SELECT hash FROM vectors")}

    def counts(self) -> dict[str, int]:
        """Searchable files, skipped files, distinct contents; and of the searchable files, the videos and their frames."""
        searchable, skipped = self._conn.execute(
            "SELECT COUNT(hash), COUNT(skip_reason) FROM files").fetchone()
        (unique,) = self._conn.execute("SELECT COUNT(*) FROM vectors").fetchone()
        videos, frames = self._conn.execute(
            "SELECT COUNT(DISTINCT f.id), COUNT(*) FROM frames fr CROSS JOIN files f ON f.hash = fr.hash").fetchone()
        return {"count": searchable, "skipped": skipped, "unique_vectors": unique, "videos": videos, "frames": frames}

    def skipped(self) -> list[tuple[str, str]]:
        return list(self._conn.execute(
            "SELECT path, skip_reason FROM files WHERE skip_reason IS NOT NULL ORDER BY path"))

    def not_indexed(self) -> dict[str, int]:
        """What the walks of every folder passed over, by kind, most first."""
        return dict(self._conn.execute(
            "SELECT kind, SUM(count) AS n FROM not_indexed GROUP BY kind ORDER BY n DESC, kind"))

    def folders(self) -> list[tuple[str, float]]:
        return list(self._conn.execute("SELECT path, indexed_at FROM folders ORDER BY path"))

    def roots(self) -> list[Root]:
        """Every folder indexed, with the device it was last scanned on and whether it is offline."""
        rows = list(self._conn.execute(
            "SELECT f.path, r.device, r.offline_since, r.offline_reason FROM folders f LEFT JOIN roots r ON r.path = f.path "
            "ORDER BY f.path"))
        return [Root(path, device, since, reason, self._conn.execute(
            "SELECT COUNT(hash) FROM files WHERE path >= ? AND path < ?", folder_range(path)).fetchone()[0])
            for path, device, since, reason in rows]

    def is_folder(self, path: str) -> bool:
        """Whether `path` is a folder the index was built from (its drive may be away now)."""
        return self._conn.execute("SELECT 1 FROM folders WHERE path = ?", (path,)).fetchone() is not None

    def folder_device(self, path: str) -> int | None:
        """The device an indexed folder was on at its last scan (None: not recorded, or indexed before that was)."""
        row = self._conn.execute("SELECT device FROM roots WHERE path = ?", (path,)).fetchone()
        return None if row is None else row[0]

    def has_files_under(self, folder: str) -> bool:
        """Whether any searchable file lies inside `folder` (one index read, however many there are)."""
        return self._conn.execute("SELECT 1 FROM files WHERE path >= ? AND path < ? AND hash IS NOT NULL LIMIT 1",
                                  folder_range(folder)).fetchone() is not None

    def visible(self, where: Filter) -> Filter:
        """`where`, leaving out the files of offline folders unless it includes them."""
        offline = () if where.include_offline else tuple(self.offline_roots())
        return dataclasses.replace(where, outside=offline) if offline else where

    def offline_roots(self) -> list[str]:
        """The folders whose files are kept but left out of searches: their drive is away."""
        return [path for (path,) in self._conn.execute(
            "SELECT path FROM roots WHERE offline_since IS NOT NULL ORDER BY path")]

    def rows(self, ids: Iterable[int]) -> dict[int, FileRow]:
        """The files of search structure ids, by those ids: a video's frame gives its video with the moment."""
        ids = [int(i) for i in ids]
        if not ids:
            return {}
        file_ids = sorted({i & _FILE_MASK for i in ids})
        marks = ",".join("?" * len(file_ids))
        files = {r[0]: _file_row(*r) for r in self._conn.execute(
            "SELECT f.id, f.path, v.width, v.height, f.mtime_ns, m.taken, m.taken_at, p.city, p.district, p.region, "
            "p.country FROM files f JOIN vectors v ON v.hash = f.hash LEFT JOIN media m ON m.hash = f.hash "
            f"LEFT JOIN places p ON p.hash = f.hash WHERE f.id IN ({marks})", file_ids)}
        moments: dict[int, float] = {}
        videos = sorted({i & _FILE_MASK for i in ids if i >> FRAME_SHIFT})
        if videos:
            marks = ",".join("?" * len(videos))
            moments = {faiss_id(i, position): seconds for i, position, seconds in self._conn.execute(
                f"SELECT f.id, fr.position, fr.seconds FROM files f JOIN frames fr ON fr.hash = f.hash "
                f"WHERE f.id IN ({marks})", videos)}
        found = {}
        for i in ids:
            row = files.get(i & _FILE_MASK)
            if row is not None and (i in moments or not i >> FRAME_SHIFT):
                found[i] = dataclasses.replace(row, seconds=moments[i]) if i in moments else row
        return found

    def file(self, file_id: int) -> FileRow | None:
        """One searchable file by id, with the size and mtime it had when indexed (None: no such file)."""
        row = self._conn.execute(
            "SELECT f.id, f.path, v.width, v.height, f.size, f.mtime_ns FROM files f JOIN vectors v ON v.hash = f.hash "
            "WHERE f.id = ?", (int(file_id),)).fetchone()
        return None if row is None else FileRow(*row)

    def ids_under(self, prefix: str) -> np.ndarray:
        """Search structure ids of searchable files whose path starts with `prefix` (a plain string prefix)."""
        return self.ids_matching(Filter(prefix=prefix))

    def ids_matching(self, where: Filter) -> np.ndarray:
        """Search structure ids of the searchable files that `where` keeps (a video: its frames'). A place no
        file of the index was taken at is a one-line error naming the nearest names it has (a typo, most
        likely); a filter that keeps nothing otherwise is an empty answer."""
        for place in where.places:
            if self._conn.execute("SELECT 1 FROM places WHERE words LIKE ? LIMIT 1", (f"% {place} %",)).fetchone() is None:
                raise BadInput(self._unknown_place(place))
        condition, params = where.sql()
        return self._faiss_ids(condition, params)

    def _unknown_place(self, place: str) -> str:
        import difflib

        names: dict[str, str] = {}  # folded name or one of its words -> the name: "berlin" -> "State of Berlin"
        for name in self.place_names():
            folded = place_words(name)
            names.setdefault(folded, name)
            for word in folded.split():
                if len(word) >= 3:
                    names.setdefault(word, name)
        if not names:
            return f"--place {place!r}: no file in this index has a GPS position"
        near = difflib.get_close_matches(place, list(names), n=3, cutoff=0.5)
        suggested = list(dict.fromkeys(names[n] for n in near))
        hint = f"; the nearest names here: {', '.join(suggested)}" if near else \
            f"; its {len(set(names.values())):,} place names are none like it"
        return f"--place {place!r}: no file in this index was taken there{hint}"

    def _faiss_ids(self, where: str = "1", params: Sequence = ()) -> np.ndarray:
        """Search structure ids of the searchable files that meet `where` (on f): an image's file id, a video's
        frames' ids instead of its own. (Two plain queries and a set difference: a NOT EXISTS per file made
        this 1.7x slower at 500,000 photos, and every search's first read of the structure calls it.)"""
        files = np.fromiter((r[0] for r in self._conn.execute(
            f"SELECT f.id FROM files f WHERE f.hash IS NOT NULL AND {where} ORDER BY f.id", params)), dtype=np.int64)
        frames = np.array(self._conn.execute(
            f"SELECT f.id, fr.position FROM frames fr CROSS JOIN files f ON f.hash = fr.hash WHERE {where}", params
        ).fetchall(), dtype=np.int64).reshape(-1, 2)
        if not len(frames):
            return files
        images = np.setdiff1d(files, np.unique(frames[:, 0]), assume_unique=True)
        return np.sort(np.concatenate([images, frames[:, 0] + (frames[:, 1] << FRAME_SHIFT)]))

    def file_hashes(self, where: Filter = KEEP_ALL) -> list[tuple[int, str, str]]:
        """(id, path, content hash) of every searchable file that `where` keeps, by path."""
        condition, params = where.sql()
        return list(self._conn.execute(
            f"SELECT f.id, f.path, f.hash FROM files f WHERE f.hash IS NOT NULL AND {condition} ORDER BY f.path",
            params))

    def content_vectors(self, digests: Sequence[str]) -> np.ndarray:
        """The stored vectors of these content hashes, in their order (one pass over the vectors table)."""
        row_of = {d: r for r, d in enumerate(digests)}
        out = np.zeros((len(digests), self.dim), dtype=np.float32)
        for digest, blob in self._conn.execute("SELECT hash, vector FROM vectors"):
            row = row_of.get(digest)
            if row is not None:
                out[row] = np.frombuffer(blob, dtype="<f4")
        return out

    def ids_of_paths(self, paths: Iterable[str]) -> dict[str, int]:
        """The ids of those of `paths` that the index holds searchable (absolute paths, as stored)."""
        found: dict[str, int] = {}
        paths = list(paths)
        for start in range(0, len(paths), 900):
            chunk = paths[start:start + 900]
            marks = ",".join("?" * len(chunk))
            found.update(self._conn.execute(
                f"SELECT path, id FROM files WHERE hash IS NOT NULL AND path IN ({marks})", chunk))
        return found

    def vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """Every searchable file's id and vector, in id order: the gallery for exact search."""
        return self.gather(self.live_ids())

    def live_ids(self) -> np.ndarray:
        """The search structure's ids, ascending: every searchable image's, and every frame's of every video."""
        return self._faiss_ids()

    def vectors_of(self, ids: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, vectors) in chunks for the given search structure ids, read straight from sqlite (a video's
        file id gives its own vector, the mean of its frames')."""
        ids = np.asarray(ids, dtype=np.int64)
        frame_ids = ids[ids > _FILE_MASK]
        yield from self._chunks(ids[ids <= _FILE_MASK], "SELECT f.id, v.vector FROM files f "
                                "JOIN vectors v ON v.hash = f.hash", "f.id IN ({marks})", lambda chunk: chunk)
        yield from self._chunks(frame_ids, f"SELECT f.id + (fr.position << {FRAME_SHIFT}), fr.vector FROM files f "
                                "JOIN frames fr ON fr.hash = f.hash", "f.id IN ({marks})",
                                lambda chunk: sorted({i & _FILE_MASK for i in chunk}))

    def _chunks(self, ids: np.ndarray, select: str, where: str, keys) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Rows of `select` whose first column is in `ids`: one ordered pass for most of the index, IN queries
        (on `keys` of each chunk of ids) for a few."""
        if not ids.size:
            return
        wanted = set(ids.tolist())
        if ids.size > _READ_CHUNK:  # most of the index: one ordered pass beats many IN queries
            cursor = self._conn.execute(select)
            while batch := cursor.fetchmany(_READ_CHUNK):
                batch = [r for r in batch if r[0] in wanted]
                if batch:
                    yield self._unpack(batch)
            return
        for start in range(0, ids.size, 900):
            chunk = keys(ids[start:start + 900].tolist())
            marks = ",".join("?" * len(chunk))
            batch = [r for r in self._conn.execute(f"{select} WHERE {where.format(marks=marks)}", chunk)
                     if r[0] in wanted]
            if batch:
                yield self._unpack(batch)

    def _unpack(self, batch: list[tuple[int, bytes]]) -> tuple[np.ndarray, np.ndarray]:
        ids = np.fromiter((r[0] for r in batch), dtype=np.int64, count=len(batch))
        vecs = np.frombuffer(b"".join(r[1] for r in batch), dtype="<f4").reshape(len(batch), self.dim)
        return ids, np.ascontiguousarray(vecs, dtype=np.float32)

    def gather(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) of those of `ids` that have a vector, in id order."""
        chunks = list(self.vectors_of(ids))
        if not chunks:
            return np.empty(0, np.int64), np.empty((0, self.dim), np.float32)
        got = np.concatenate([c[0] for c in chunks])
        order = np.argsort(got, kind="stable")
        return got[order], np.concatenate([c[1] for c in chunks])[order]

    def vector_of_content(self, digest: str) -> np.ndarray | None:
        """The embedding stored for this content hash (`images.content_hash`), if the index holds one."""
        row = self._conn.execute("SELECT vector FROM vectors WHERE hash = ?", (digest,)).fetchone()
        return None if row is None else np.frombuffer(row[0], dtype="<f4").astype(np.float32)

    def stored_vector(self, path: str, size: int, mtime_ns: int) -> np.ndarray | None:
        """The embedding of `path` if the index holds it and the file is unchanged, else None."""
        row = self._conn.execute(
            "SELECT v.vector FROM files f JOIN vectors v ON v.hash = f.hash "
            "WHERE f.path = ? AND f.size = ? AND f.mtime_ns = ?", (path, size, mtime_ns)).fetchone()
        return None if row is None else np.frombuffer(row[0], dtype="<f4").astype(np.float32)

    def frames_of_contents(self, digests: Sequence[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """The frames of those of these content hashes that are videos: hash -> (seconds, vectors), in time order."""
        found: dict[str, tuple[list[float], list[bytes]]] = {}
        for start in range(0, len(digests), 900):
            chunk = list(digests[start:start + 900])
            marks = ",".join("?" * len(chunk))
            for digest, seconds, blob in self._conn.execute(
                    f"SELECT hash, seconds, vector FROM frames WHERE hash IN ({marks}) ORDER BY hash, position", chunk):
                times, blobs = found.setdefault(digest, ([], []))
                times.append(seconds)
                blobs.append(blob)
        return {d: (np.asarray(t), np.frombuffer(b"".join(b), dtype="<f4").reshape(len(b), self.dim).astype(np.float32))
                for d, (t, b) in found.items()}

    def frames_of_file(self, file_id: int) -> np.ndarray | None:
        """The frame vectors of an indexed video, in time order (None: no such video)."""
        return self._frames_of_row("id = ?", (int(file_id),))

    def stored_frames(self, path: str, size: int, mtime_ns: int) -> np.ndarray | None:
        """The frame vectors of the video at `path` if the index holds it and the file is unchanged, else None."""
        return self._frames_of_row("path = ? AND size = ? AND mtime_ns = ?", (path, size, mtime_ns))

    def _frames_of_row(self, where: str, params: tuple) -> np.ndarray | None:
        row = self._conn.execute(f"SELECT hash FROM files WHERE hash IS NOT NULL AND {where}", params).fetchone()
        frames = self.frames_of_contents([row[0]]).get(row[0]) if row else None
        return None if frames is None else frames[1]

    # ---- a caption set (clipengine.index.texts) -------------------------------------------------

    @property
    def texts_generation(self) -> int:
        """How many commits the caption set has had (0: none): texts.faiss is tagged with the one it reflects."""
        return int(self.read_meta("texts_generation") or 0)

    def text_count(self) -> int:
        return self._conn.execute("SELECT COUNT(*) FROM texts").fetchone()[0]

    def known_texts(self) -> set[str]:
        return {t for (t,) in self._conn.execute("SELECT text FROM texts")}

    def add_texts(self, texts: Sequence[str], vectors: np.ndarray) -> None:
        """Store new texts with their embeddings, in one transaction (texts already stored are refused)."""
        self._require_writable()
        blobs = (np.asarray(v, dtype="<f4").tobytes() for v in vectors)
        with self._transaction():
            self._conn.executemany("INSERT INTO texts (text, vector) VALUES (?, ?)", zip(texts, blobs, strict=True))
            self._conn.execute("INSERT INTO meta VALUES ('texts_generation', '1') "
                               "ON CONFLICT(key) DO UPDATE SET value = value + 1")

    def text_vectors(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, vectors) of the caption set in chunks, in id order."""
        cursor = self._conn.execute("SELECT id, vector FROM texts ORDER BY id")
        while batch := cursor.fetchmany(_READ_CHUNK):
            yield self._unpack(batch)

    def text_ids(self) -> np.ndarray:
        return np.fromiter((i for (i,) in self._conn.execute("SELECT id FROM texts ORDER BY id")), dtype=np.int64)

    def text_vectors_of(self, ids: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, vectors) of these caption-set rows, in chunks: a sample is read without reading every vector."""
        yield from self._chunks(np.asarray(ids, dtype=np.int64), "SELECT id, vector FROM texts", "id IN ({marks})",
                                lambda chunk: chunk)

    def texts_of(self, ids: Sequence[int]) -> dict[int, str]:
        marks = ",".join("?" * len(ids))
        return dict(self._conn.execute(f"SELECT id, text FROM texts WHERE id IN ({marks})", [int(i) for i in ids]))

    # ---- sections of the manifest that derived files own -----------------------------------------

    def set_manifest_section(self, name: str, value: dict) -> None:
        """Replace one top-level section of the manifest (one atomic write): the faiss view keeps its policy
        in "faiss", the export its record in "query_encoders"."""
        self._require_writable()
        manifest = {**self.manifest, name: value}
        write_json_atomic(self.path / MANIFEST, manifest)
        self.manifest = manifest

    # ---- exported query encoders ---------------------------------------------------------------

    @property
    def query_encoders(self) -> dict | None:
        """What `clipengine.index.export` recorded: per tower, verified (and how closely) or failed (and why)."""
        return self.manifest.get("query_encoders")

    def set_query_encoders(self, record: dict) -> None:
        """Point the index at a new encoders directory (one atomic manifest write), then delete the others."""
        self.set_manifest_section("query_encoders", record)
        for old in self.path.glob(f"{ENCODERS_PREFIX}*"):
            if old.name != record.get("dir"):
                shutil.rmtree(old, ignore_errors=True)
        remove_abandoned(self.path, f"{ENCODERS_PREFIX}*")  # left by an export that was killed

    # ---- writing -----------------------------------------------------------------------------

    def _require_writable(self) -> None:
        if not self.writable:
            raise RuntimeError("index opened read-only")

    def commit(self, records: Sequence[FileRecord] = (), remove_ids: Sequence[int] = ()) -> None:
        """Apply removals and new records in one transaction: all of it lands, or none of it."""
        self._require_writable()
        now = time.time()
        with self._transaction():
            self._conn.executemany("DELETE FROM files WHERE id = ?", ((int(i),) for i in remove_ids))
            self._conn.executemany(
                "INSERT OR IGNORE INTO vectors (hash, width, height, vector) VALUES (?, ?, ?, ?)",
                ((r.hash, r.width, r.height, np.asarray(r.vector, dtype="<f4").tobytes())
                 for r in records if r.vector is not None),
            )
            self._conn.executemany(
                "INSERT OR IGNORE INTO frames (hash, position, seconds, vector) VALUES (?, ?, ?, ?)",
                ((r.hash, position, seconds, np.asarray(vector, dtype="<f4").tobytes())
                 for r in records if r.frame_vectors is not None
                 for position, (seconds, vector) in enumerate(zip(r.frames, r.frame_vectors, strict=True), start=1)),
            )
            # REPLACE deletes a row with the same path and inserts a fresh id: rows are never edited.
            self._conn.executemany(
                "INSERT OR REPLACE INTO files (path, size, mtime_ns, hash, skip_reason, indexed_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                ((r.path, r.size, r.mtime_ns, None if r.skip_reason else r.hash, r.skip_reason, now)
                 for r in records),
            )
            self._conn.executemany(_ADD_MEDIA, (_media_row(r.hash, r.path, r.metadata, r.duration)
                                                for r in records if r.hash and r.metadata is not None))
            self._bump_generation()

    def without_metadata(self, folder: str) -> list[tuple[str, str]]:
        """(path, content hash) of one file per searchable content under `folder` whose metadata was never read
        (indexed before it was), for `clipengine.index.pipeline` to read from the headers."""
        lo = folder.rstrip(os.sep) + os.sep
        return list(self._conn.execute(
            "SELECT MIN(f.path), f.hash FROM files f LEFT JOIN media m ON m.hash = f.hash "
            "WHERE f.hash IS NOT NULL AND m.hash IS NULL AND f.path >= ? AND f.path < ? GROUP BY f.hash",
            (lo, lo[:-1] + chr(ord(os.sep) + 1))))

    def add_metadata(self, rows: Sequence[tuple[str, str, MediaInfo, float | None]]) -> None:
        """Store read metadata: (content hash, path, MediaInfo, duration) each, in one transaction."""
        self._require_writable()
        with self._transaction():
            self._conn.executemany(_ADD_MEDIA, (_media_row(*row) for row in rows))

    def unnamed_positions(self) -> list[tuple[str, float, float]]:
        """(content hash, latitude, longitude) of the files with a position whose place was never named."""
        return list(self._conn.execute(
            "SELECT m.hash, m.latitude, m.longitude FROM media m LEFT JOIN places p ON p.hash = m.hash "
            "WHERE m.latitude IS NOT NULL AND m.longitude IS NOT NULL AND p.hash IS NULL"))

    def add_places(self, rows: Sequence[tuple[str, Place]]) -> None:
        """Store named places: (content hash, Place) each, in one transaction."""
        self._require_writable()
        with self._transaction():
            self._conn.executemany("INSERT OR IGNORE INTO places VALUES (?, ?, ?, ?, ?, ?, ?)",
                                   ((digest, p.city, p.district, p.region, p.country, p.country_code, p.words)
                                    for digest, p in rows))

    def place_names(self) -> list[str]:
        """Every name of a place a searchable file was taken at (cities, districts, regions, countries)."""
        return [name for (name,) in self._conn.execute(
            "SELECT DISTINCT name FROM (SELECT city AS name FROM places UNION SELECT district FROM places "
            "UNION SELECT region FROM places UNION SELECT country FROM places) WHERE name IS NOT NULL ORDER BY name")]

    def media_summary(self) -> dict:
        """What the searchable files say of themselves: the span of taken times (a file with none counts by its
        modification time), how many cameras, how many with a position, in how many places (towns or city
        districts), how many have been read at all."""
        files, read, dated, placed, first, last, cameras, places = self._conn.execute(
            "SELECT COUNT(*), COUNT(m.hash), COUNT(m.taken), COUNT(m.latitude), "
            "MIN(COALESCE(m.taken_at, f.mtime_ns / 1e9)), MAX(COALESCE(m.taken_at, f.mtime_ns / 1e9)), "
            "COUNT(DISTINCT COALESCE(m.make, '') || '|' || COALESCE(m.model, '')) "
            "FILTER (WHERE m.make IS NOT NULL OR m.model IS NOT NULL), COUNT(DISTINCT p.words) "
            "FROM files f LEFT JOIN media m ON m.hash = f.hash LEFT JOIN places p ON p.hash = f.hash "
            "WHERE f.hash IS NOT NULL").fetchone()

        def day(seconds: float | None) -> str | None:
            return None if seconds is None else dt.datetime.fromtimestamp(seconds, dt.timezone.utc).date().isoformat()
        return {"files": files, "read": read, "with_taken_time": dated, "with_position": placed,
                "cameras": cameras, "places": places, "first_taken": day(first), "last_taken": day(last)}

    def record_folder(self, folder: str, not_indexed: Mapping[str, int] | None = None, device: int | None = None) -> None:
        """Record a walk of `folder` on `device`, and what it passed over by kind (replacing the last walk's
        count). An offline folder's files come back into searches (which read `offline_roots` each time)."""
        self._require_writable()
        with self._transaction():
            self._conn.execute("INSERT OR REPLACE INTO folders VALUES (?, ?)", (folder, time.time()))
            self._conn.execute("INSERT OR REPLACE INTO roots VALUES (?, ?, NULL, NULL)", (folder, device))
            self._conn.execute("DELETE FROM not_indexed WHERE folder = ?", (folder,))
            self._conn.executemany("INSERT INTO not_indexed VALUES (?, ?, ?)",
                                   ((folder, kind, n) for kind, n in (not_indexed or {}).items()))

    def mark_offline(self, folder: str, reason: str) -> None:
        """Keep the files under `folder`, vectors and all, but leave them out of searches until a scan finds
        the folder again (its drive is away): an unplugged drive must not cost its library. The search
        structure keeps their vectors; searches leave them out by path (`visible`)."""
        self._require_writable()
        with self._transaction():
            self._conn.execute("INSERT OR IGNORE INTO folders VALUES (?, ?)", (folder, time.time()))
            self._conn.execute(
                "INSERT INTO roots VALUES (?, NULL, ?, ?) ON CONFLICT (path) DO UPDATE SET offline_reason = "
                "excluded.offline_reason, offline_since = excluded.offline_since WHERE offline_since IS NULL",
                (folder, time.time(), reason))

    def forget(self, folder: str) -> int:
        """Remove `folder` and every file under it, on purpose (`clipengine forget`); their vectors go with
        the next `drop_unused_vectors`. Returns the files removed."""
        self._require_writable()
        inside = folder_range(folder)
        with self._transaction():
            removed = self._conn.execute("DELETE FROM files WHERE path >= ? AND path < ?", inside).rowcount
            for table, column in (("folders", "path"), ("roots", "path"), ("not_indexed", "folder")):
                self._conn.execute(f"DELETE FROM {table} WHERE {column} = ? OR ({column} >= ? AND {column} < ?)",
                                   (folder, *inside))
            self._bump_generation()
        return removed

    def _bump_generation(self) -> None:
        self._conn.execute("UPDATE meta SET value = value + 1 WHERE key = 'generation'")

    def drop_unused_vectors(self) -> int:
        """Delete embeddings no file refers to any more (kept until now so moved files could reuse them)."""
        self._require_writable()
        with self._transaction():
            cursor = self._conn.execute(
                "DELETE FROM vectors WHERE hash NOT IN (SELECT hash FROM files WHERE hash IS NOT NULL)")
            self._conn.execute("DELETE FROM frames WHERE hash NOT IN (SELECT hash FROM files WHERE hash IS NOT NULL)")
            self._conn.execute("DELETE FROM media WHERE hash NOT IN (SELECT hash FROM files WHERE hash IS NOT NULL)")
            self._conn.execute("DELETE FROM places WHERE hash NOT IN (SELECT hash FROM files WHERE hash IS NOT NULL)")
        return cursor.rowcount

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")


def remove_index(path: Path) -> None:
    """Delete an index directory, refusing anything that does not look like one."""
    if not path.exists():
        return
    if not ((path / MANIFEST).exists() or (path / DATABASE).exists()):
        raise BadInput(f"refusing to delete {path}: it does not look like a clipengine index")
    fd = IndexStore._lock(path)
    try:
        shutil.rmtree(path)
    finally:
        os.close(fd)
