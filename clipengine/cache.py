"""Where clipengine keeps what it can always rebuild: exported query towers, decoded training images.

$CLIPENGINE_CACHE_DIR, else $XDG_CACHE_HOME/clipengine, else ~/.cache/clipengine. Deleting it loses only time.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_DIR_ENV = "CLIPENGINE_CACHE_DIR"


def cache_dir() -> Path:
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "clipengine"
