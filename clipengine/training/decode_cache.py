"""Decode once: training images shrunk to what the random crop needs, and kept decoded across epochs and runs.

Real collections are full-size files, and every epoch used to decode each again and hand the whole
picture to the random crop (a 12 MP JPEG: about 22 ms with draft decoding, before the crop resized it).
Two things fix that:

- `TrainingShrink`: right after decoding, an image is shrunk so that its shorter side is the least the
  training crop can take without ever upsampling: image_size / sqrt(min scale / max ratio) of the
  RandomResizedCrop (78 px for a 64-px model with open_clip's scale 0.9 and ratio 3/4-4/3). The crop
  picks the same relative box from it as from the full picture. It also keeps crops of huge images
  under PIL's decompression-bomb limits (a 150 MP PNG warned on every crop, and one over 179 MP raised).
- `DecodedCache`: the shrunk pixels in one sqlite file, keyed by the sha256 of the file's bytes and
  the shrink and transparency that made them, so a changed file is decoded anew and a run with another
  model size or policy never reads the wrong pixels. sqlite makes each entry atomic (an interrupted run
  leaves whole entries or none) and lets every data worker read and write at once (WAL). The file is
  bounded: once full nothing more is added (a training epoch visits every image in a new order, for
  which evicting would only churn). Default: 4 GiB in the cache directory, shared by all runs.
"""

from __future__ import annotations

import hashlib
import math
import os
import sqlite3
from pathlib import Path

from PIL import Image

from clipengine.cache import cache_dir

DEFAULT_CACHE_BYTES = 4 << 30
CACHE_FILE = "decoded.sqlite"
FORMAT = 1  # of the stored pixels; part of every key
MAX_HEADROOM = 4.0  # crops of under 1/16 of the image (scale 0.06) would otherwise keep near full size


def crop_headroom(transform) -> float:
    """How much larger than the model's input the shorter side must stay for `transform`'s random crop."""
    for step in getattr(transform, "transforms", [transform]):
        if type(step).__name__ == "RandomResizedCrop":
            scale, ratio = step.scale, step.ratio
            return min(MAX_HEADROOM, 1 / math.sqrt(min(scale) / max(max(ratio), 1 / min(ratio))))
    return 1.0  # resize-then-crop transforms never need more than the input size


class TrainingShrink:
    """Shrink decoded images to a shorter side of `side` pixels (never enlarge)."""

    def __init__(self, image_size: int, headroom: float) -> None:
        self.side = math.ceil(image_size * headroom)

    def __call__(self, image: Image.Image) -> Image.Image:
        w, h = image.size
        if min(w, h) <= self.side:
            return image
        scale = self.side / min(w, h)
        size = (max(self.side, round(w * scale)), max(self.side, round(h * scale)))
        return image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)


class DecodedCache:
    """Shrunk, decoded training images in one sqlite file. Safe to share between processes and runs."""

    def __init__(self, path: str | os.PathLike, variant: str, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.path = Path(path)
        self.variant = f"{FORMAT}:{variant}"
        self.max_bytes = max_bytes
        self._conn: sqlite3.Connection | None = None
        self._pid = -1
        self._full = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS images (hash BLOB, variant TEXT, mode TEXT, width INTEGER,"
                         " height INTEGER, pixels BLOB, PRIMARY KEY (hash, variant)) WITHOUT ROWID")
            conn.execute("CREATE TABLE IF NOT EXISTS size (bytes INTEGER)")
            conn.execute("INSERT INTO size SELECT 0 WHERE NOT EXISTS (SELECT 1 FROM size)")

    @classmethod
    def default_path(cls) -> Path:
        return cache_dir() / CACHE_FILE

    def _connect(self) -> sqlite3.Connection:
        """One connection per process: a data worker must not use the one it inherited from its parent."""
        if self._conn is None or self._pid != os.getpid():
            self._conn = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")  # an app crash loses nothing committed; fsync at checkpoints
            self._pid = os.getpid()
        return self._conn

    @staticmethod
    def key(data: bytes) -> bytes:
        return hashlib.sha256(data).digest()[:16]

    def get(self, key: bytes) -> Image.Image | None:
        row = self._connect().execute("SELECT mode, width, height, pixels FROM images WHERE hash = ? AND variant = ?",
                                      (key, self.variant)).fetchone()
        if row is None:
            return None
        mode, width, height, pixels = row
        return Image.frombuffer(mode, (width, height), pixels, "raw", mode, 0, 1)

    def put(self, key: bytes, image: Image.Image) -> bool:
        """Store `image` unless the cache is full; whether it was stored."""
        if self._full:
            return False
        pixels = image.tobytes()
        conn = self._connect()
        conn.execute("BEGIN IMMEDIATE")  # the size check and the insert as one step, whoever else writes
        try:
            (used,) = conn.execute("SELECT bytes FROM size").fetchone()
            if used + len(pixels) > self.max_bytes:
                self._full = True
                return False
            added = conn.execute("INSERT OR IGNORE INTO images VALUES (?, ?, ?, ?, ?, ?)",
                                 (key, self.variant, image.mode, image.width, image.height, pixels)).rowcount
            if added:
                conn.execute("UPDATE size SET bytes = bytes + ?", (len(pixels),))
            return bool(added)
        finally:
            conn.execute("COMMIT")

    def stats(self) -> dict:
        """Entries of this variant, and bytes of the whole file, for the run's report."""
        conn = self._connect()
        (entries,) = conn.execute("SELECT COUNT(*) FROM images WHERE variant = ?", (self.variant,)).fetchone()
        (used,) = conn.execute("SELECT bytes FROM size").fetchone()
        return {"path": str(self.path), "variant": self.variant, "entries": entries, "file_bytes": used,
                "max_bytes": self.max_bytes}

