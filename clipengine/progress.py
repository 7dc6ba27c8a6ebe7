"""The two shapes of progress callback the library calls, so that a caller (the CLI's rich bars, a
notebook, a web page) can show long work as it goes."""

from __future__ import annotations

from collections.abc import Callable

StageProgress = Callable[[str, int, int], None]  # (stage, done, total): building, tuning, exporting, evaluating
FileProgress = Callable[[int, int], None]  # (files done, files to do): indexing a folder
