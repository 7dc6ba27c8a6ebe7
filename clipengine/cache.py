"""Where clipengine keeps what it can always rebuild: exported query towers, decoded training images.

$CLIPENGINE_CACHE_DIR, else the platform's cache directory (~/.cache/clipengine on Linux, or
$XDG_CACHE_HOME/clipengine; ~/Library/Caches/clipengine on macOS). Deleting it loses only time.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_DIR_ENV = "CLIPENGINE_CACHE_DIR"


def cache_dir() -> Path:
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV]).expanduser()
    import platformdirs

    return platformdirs.user_cache_path("clipengine", appauthor=False)
