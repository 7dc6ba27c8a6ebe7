"""What a search returns, and the --prefix it is narrowed by: plain data, kept free of numpy and faiss so
that a search answered by a running service (`clipengine.index.service`) needs neither."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Hit:
    rank: int
    score: float  # cosine similarity, in [-1, 1]
    path: str
    width: int
    height: int
    id: int
    seconds: float | None = None  # a video's hit: the moment of its best-matching frame

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def moment(self) -> str:
        """Where in a video the hit is, as a player shows it ('at 0:42', 'at 1:02:07'); empty for an image."""
        if self.seconds is None:
            return ""
        minutes, seconds = divmod(int(self.seconds), 60)
        hours, minutes = divmod(minutes, 60)
        return f"at {hours}:{minutes:02d}:{seconds:02d}" if hours else f"at {minutes}:{seconds:02d}"


def path_prefix(text: str) -> str:
    """A --prefix argument as an absolute path prefix; an existing directory matches only inside it."""
    expanded = os.path.abspath(os.path.expanduser(text))
    return expanded.rstrip(os.sep) + os.sep if os.path.isdir(expanded) else expanded
