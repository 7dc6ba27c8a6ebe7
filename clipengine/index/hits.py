"""What a search returns, and the --prefix it is narrowed by: plain data, kept free of numpy and faiss so
that a search answered by a running service (`clipengine.index.service`) needs neither."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

from clipengine.errors import BadInput


@dataclass(frozen=True)
class Hit:
    rank: int
    score: float  # cosine similarity, in [-1, 1]
    path: str
    width: int
    height: int
    id: int
    seconds: float | None = None  # a video's hit: the moment of its best-matching frame
    taken: str | None = None  # when it was taken, ISO 8601 as the file says it (else its modification time, UTC)
    taken_at: float | None = None  # the same in seconds since 1970, for ordering (a time without a zone as UTC)
    place: str | None = None  # where it was taken: 'Mitte, State of Berlin, Germany'
    plan: str | None = None  # a filtered search: how it ran ('exact scan: 120 of 1,000,000 kept (0.012%)')

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


SORTS = ("score", "date", "-date")
GROUPS = ("day", "month", "place")


def check_arrangement(sort: str = "score", group_by: str | None = None) -> None:
    """A one-line error for an order or grouping there is not, before anything is searched."""
    if sort not in SORTS:
        raise BadInput(f"--sort {sort!r}: choose {', '.join(SORTS)}")
    if group_by is not None and group_by not in GROUPS:
        raise BadInput(f"--group-by {group_by!r}: choose {', '.join(GROUPS)}")


def order_hits(hits: list[Hit], sort: str = "score") -> list[Hit]:
    """The top hits in the order asked: by score as found, or by taken time, oldest ("date") or newest first
    ("-date"). Only these hits are reordered; which files they are is the search's choice, by meaning. Each
    keeps its rank by score."""
    check_arrangement(sort)
    if sort == "score":
        return list(hits)
    newest = sort == "-date"
    return sorted(hits, key=lambda h: ((-1 if newest else 1) * (h.taken_at if h.taken_at is not None else 0.0), h.rank))


def group_key(hit: Hit, by: str) -> str:
    """The heading a hit falls under: its day or month as the file gives its taken time (the calendar where it
    was taken, not UTC: a photo of 23:30 on the 31st is on the 31st), or its place."""
    if by == "place":
        return hit.place or "no place"
    if not hit.taken:
        return "no date"
    return hit.taken[:10] if by == "day" else hit.taken[:7]


def group_hits(hits: list[Hit], by: str) -> list[tuple[str, list[Hit]]]:
    """(heading, hits) in the order their first hit comes: ordered by score, the group of the best hit leads;
    ordered by date, the groups follow the calendar."""
    check_arrangement(group_by=by)
    groups: dict[str, list[Hit]] = {}
    for hit in hits:
        groups.setdefault(group_key(hit, by), []).append(hit)
    return list(groups.items())
