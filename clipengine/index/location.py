"""Where indexes live (`--index` as a name under the index directory, or a path) and what the files inside
one are called: the one place an index's file names are written. Kept apart from the store (and free of
numpy) because every command resolves an index before it does anything else, and a search answered by a
running service should cost no more than that."""

from __future__ import annotations

import os
from pathlib import Path

from clipengine.errors import BadInput

INDEX_DIR_ENV = "CLIPENGINE_INDEX_DIR"

# inside an index directory (the layout is described in clipengine.index.store)
MANIFEST = "manifest.json"  # format, model, the faiss policy, the query encoders' record
DATABASE = "meta.sqlite"  # the catalogue
LOCK_FILE = "lock"  # flock()ed by the one writer
FAISS_FILE = "vectors.faiss"  # the images' search structure (clipengine.index.faiss_view)
TEXTS_FAISS_FILE = "texts.faiss"  # the caption set's (clipengine.index.texts)
LEGACY_TEXTS_DATABASE = "texts.sqlite"  # where a caption set lived before it joined the catalogue
ENCODERS_PREFIX = "encoders-"  # directories of exported query encoders (clipengine.index.export)
THUMBNAILS_DIR = "thumbnails"  # the service's thumbnail cache (clipengine.index.thumbnails)
SERVICE_FILE = "service.json"  # a running service's address (clipengine.index.service)


def default_index_dir() -> Path:
    """$CLIPENGINE_INDEX_DIR, else the checkout's top-level indexes/, else the platform's data directory.

    An installed wheel has no checkout (its package sits in site-packages, which is no place for data): its
    indexes go where the platform keeps an application's data (~/.local/share/clipengine/indexes on Linux,
    ~/Library/Application Support/clipengine/indexes on macOS, %LOCALAPPDATA% on Windows), as rclip's do.
    """
    if os.environ.get(INDEX_DIR_ENV):
        return Path(os.environ[INDEX_DIR_ENV]).expanduser()
    checkout = Path(__file__).resolve().parents[2]  # clipengine/index/location.py -> the checkout
    if (checkout / "pyproject.toml").is_file() and (checkout / "indexes").is_dir():
        return checkout / "indexes"
    import platformdirs

    return platformdirs.user_data_path("clipengine", appauthor=False) / "indexes"


def resolve_index_path(name_or_path: str | os.PathLike, index_dir: str | os.PathLike | None = None) -> Path:
    """`--index` takes a name (looked up under the index directory) or a path (anything with a slash)."""
    text = os.fspath(name_or_path)
    if not text.strip():
        raise BadInput("--index needs a name or a path")
    if os.sep in text or text.startswith((".", "~")):
        return Path(text).expanduser().resolve()
    return (Path(index_dir).expanduser() if index_dir else default_index_dir()).resolve() / text
