"""Which files a search may return: a path prefix, a taken-time range, cameras, kinds and extensions, all
combined with AND (a repeated camera, kind or extension with OR). Plain data and SQL on the catalogue,
free of numpy and faiss: a filter is turned into the ids the search structure may answer with
(`IndexStore.ids_matching`).

Times: a file's taken time is what it says of itself (`clipengine.metadata`), else its modification time.
`--after 2023-06` means from the first moment of June 2023, `--before 2023-09` up to the first moment of
September, both in UTC; a taken time the file gave without a time zone is compared as if it were UTC, so
a photo taken at 23:30 local time on the 31st stays on the 31st.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
from dataclasses import dataclass

from clipengine.errors import BadInput
from clipengine.index.hits import path_prefix

_WHEN = re.compile(r"(\d{4})(?:-(\d{1,2})(?:-(\d{1,2})(?:[T ](\d{1,2}):(\d{2}))?)?)?")
KINDS = ("image", "video")


@dataclass(frozen=True)
class Filter:
    """What a search keeps. Empty fields keep everything."""

    prefix: str | None = None  # an absolute path prefix (`hits.path_prefix`)
    after: float | None = None  # taken at or after, seconds since 1970 UTC
    before: float | None = None  # taken before
    cameras: tuple[str, ...] = ()  # any of these words in the camera's make and model, ignoring case
    kinds: tuple[str, ...] = ()  # "image", "video"
    extensions: tuple[str, ...] = ()  # ".png", ".heic"

    @property
    def is_empty(self) -> bool:
        return self == Filter()

    def under(self, prefix: str | None) -> Filter:
        """This filter with its prefix replaced by `prefix` (an API's separate prefix argument), if one is given."""
        return self if prefix is None else dataclasses.replace(self, prefix=prefix)

    def sql(self) -> tuple[str, list]:
        """A condition on `files f` (and the media table), with its parameters."""
        where: list[str] = ["1"]
        params: list = []
        if self.prefix is not None:
            where.append("f.path >= ? AND f.path < ?")
            params += list(prefix_range(self.prefix))
        taken = "COALESCE((SELECT m.taken_at FROM media m WHERE m.hash = f.hash), f.mtime_ns / 1e9)"
        if self.after is not None:
            where.append(f"{taken} >= ?")
            params.append(self.after)
        if self.before is not None:
            where.append(f"{taken} < ?")
            params.append(self.before)
        if self.cameras:
            camera = ("(SELECT lower(COALESCE(m.make, '') || ' ' || COALESCE(m.model, '')) FROM media m "
                      "WHERE m.hash = f.hash)")
            where.append("(" + " OR ".join(f"{camera} LIKE ?" for _ in self.cameras) + ")")
            params += [f"%{c.lower()}%" for c in self.cameras]
        if self.kinds:
            where.append(f"(SELECT m.kind FROM media m WHERE m.hash = f.hash) IN ({','.join('?' * len(self.kinds))})")
            params += list(self.kinds)
        if self.extensions:
            where.append("(" + " OR ".join("lower(f.path) LIKE ?" for _ in self.extensions) + ")")
            params += [f"%{e}" for e in self.extensions]
        return " AND ".join(where), params


KEEP_ALL = Filter()


def prefix_range(prefix: str) -> tuple[str, str]:
    """The [lo, hi) range of paths that start with `prefix`, for an indexed range query."""
    return prefix, prefix[:-1] + chr(ord(prefix[-1]) + 1) if prefix else "\U0010ffff"


def parse_when(text: str, option: str) -> float:
    """'2023', '2023-06', '2023-06-14' or '2023-06-14T10:30' (UTC) as seconds since 1970: the period's first
    moment, for both bounds (`--after 2023-06 --before 2023-09` keeps June, July and August)."""
    match = _WHEN.fullmatch(text.strip())
    if match is None:
        raise BadInput(f"{option} {text!r}: give a date such as 2023, 2023-06, 2023-06-14 or 2023-06-14T10:30 (UTC)")
    year, month, day, hour, minute = (int(g) if g else None for g in match.groups())
    try:
        return dt.datetime(year or 1, month or 1, day or 1, hour or 0, minute or 0, tzinfo=dt.timezone.utc).timestamp()
    except ValueError as e:
        raise BadInput(f"{option} {text!r}: {e}") from None


def make_filter(prefix: str | None = None, after: str | None = None, before: str | None = None,
                cameras=(), kinds=(), extensions=()) -> Filter:
    """A filter from options as a user types them (`--prefix`, `--after`, `--before`, `--camera`, `--kind`,
    `--ext`), each checked with a one-line error."""
    for kind in kinds:
        if kind not in KINDS:
            raise BadInput(f"--kind {kind!r}: choose {' or '.join(KINDS)}")
    start = parse_when(after, "--after") if after else None
    stop = parse_when(before, "--before") if before else None
    if start is not None and stop is not None and start >= stop:
        raise BadInput(f"--after {after} is not before --before {before}: nothing could match")
    return Filter(path_prefix(prefix) if prefix is not None else None, start, stop,
                  tuple(c.strip() for c in cameras if c.strip()), tuple(kinds),
                  tuple("." + e.lower().lstrip(".") for e in extensions))
