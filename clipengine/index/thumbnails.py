"""Small pictures of indexed files, made once and kept in the index directory (<index>/thumbnails/).

A file is reached only by its id in the catalogue, never by a path someone supplies, and only while it is
the file that was indexed (same size and mtime): a path swapped since for a link to somewhere else, or a
file replaced, is refused. Decoding goes through `open_image`, so a thumbnail obeys the same pixel cap and
reduced-size JPEG decoding as indexing, and EXIF-rotated photos come out upright; a video's thumbnail is its
frame at the moment asked for (the one a search found).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

from clipengine.durable import write_atomic
from clipengine.errors import ClipEngineError
from clipengine.index.location import THUMBNAILS_DIR
from clipengine.index.store import FileRow, IndexStore

SIZES = (128, 256, 512)  # the sides offered: a handful, so that the cache holds few versions of a file
VIEW_SIZE = 2048  # a rendering to look at, for a file whose format browsers do not display
QUALITY = 85
# what every browser displays (or plays) as it is: a file of another format (HEIC, JPEG XL, RAW, TIFF; an MKV
# or AVI video) is shown as a JPEG
BROWSER_FORMATS = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".webp", ".avif", ".bmp",
                             ".mp4", ".m4v", ".mov", ".webm"})


class FileUnavailable(ClipEngineError):
    """No indexed file has this id, or the file on disk is no longer the one indexed."""


def indexed_file(store: IndexStore, file_id: int) -> FileRow:
    """The indexed file with this id, checked to be unchanged on disk since it was indexed."""
    row = store.file(file_id)
    if row is None:
        raise FileUnavailable(f"no searchable file has id {file_id}")
    try:
        st = os.stat(row.path)
    except OSError:
        raise FileUnavailable(f"file {file_id} is no longer on disk") from None
    if (st.st_size, st.st_mtime_ns) != (row.size, row.mtime_ns):
        raise FileUnavailable(f"file {file_id} has changed since it was indexed: index its folder again")
    return row


def viewable(store: IndexStore, file_id: int) -> Path:
    """What a browser can show of an indexed file: the file itself, or a JPEG rendering of it (at most
    VIEW_SIZE a side, made once) when browsers cannot display its format."""
    row = indexed_file(store, file_id)
    if os.path.splitext(row.path)[1].lower() in BROWSER_FORMATS:
        return Path(row.path)
    return _rendered(store, row, VIEW_SIZE)


def thumbnail(store: IndexStore, file_id: int, size: int = 256, seconds: float | None = None) -> Path:
    """The JPEG thumbnail of an indexed file, at most `size` pixels a side (rounded up to one of SIZES); of a
    video, its frame at `seconds` (the moment a search found; its first frame when None)."""
    side = next((s for s in SIZES if s >= size), SIZES[-1])
    return _rendered(store, indexed_file(store, file_id), side, seconds)


def _rendered(store: IndexStore, row: FileRow, side: int, seconds: float | None = None) -> Path:
    """A JPEG of the file (a video's frame at `seconds`) at most `side` pixels a side, made once and kept in
    the index's thumbnails/."""
    folder = store.path / THUMBNAILS_DIR
    # ids are never reused: a changed file gets a new id and a new name
    path = folder / (f"{row.id}-{side}.jpg" if seconds is None else f"{row.id}-{side}-{round(seconds * 1000)}ms.jpg")
    if path.is_file():
        return path
    from clipengine.images import Decoded
    from clipengine.video import still_of

    decoded = still_of(row.path, seconds, draft_size=side)
    if not isinstance(decoded, Decoded):
        raise FileUnavailable(f"file {row.id} cannot be decoded any more: {decoded.reason}")
    image = decoded.image
    image.thumbnail((side, side))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=QUALITY)
    folder.mkdir(exist_ok=True)
    write_atomic(path, buffer.getvalue())
    return path
