"""Which files a search may return: a path prefix, a taken-time range, places, a distance from a position,
cameras, kinds, extensions and pixel counts, all combined with AND (a repeated place, camera, kind or
extension with OR). Plain data and SQL on the catalogue,
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
import os
import re
from dataclasses import dataclass

from clipengine.errors import BadInput
from clipengine.index.hits import path_prefix
from clipengine.places import Near, parse_near, place_words

_WHEN = re.compile(r"(\d{4})(?:-(\d{1,2})(?:-(\d{1,2})(?:[T ](\d{1,2}):(\d{2}))?)?)?")
KINDS = ("image", "video")
DISTANCE_FUNCTION = "clip_distance_km"  # the great-circle distance, which the store gives its connections
_PIXELS = re.compile(r"\s*(?:(\d+(?:\.\d+)?)\s*mp|(\d+)\s*x\s*(\d+))\s*", re.IGNORECASE)


@dataclass(frozen=True)
class Filter:
    """What a search keeps. Empty fields keep everything."""

    prefix: str | None = None  # an absolute path prefix (`hits.path_prefix`)
    after: float | None = None  # taken at or after, seconds since 1970 UTC
    before: float | None = None  # taken before
    cameras: tuple[str, ...] = ()  # any of these words in the camera's make and model, ignoring case
    kinds: tuple[str, ...] = ()  # "image", "video"
    extensions: tuple[str, ...] = ()  # ".png", ".heic"
    places: tuple[str, ...] = ()  # names as `place_words` folds them: any of a file's place names, as whole words
    near: Near | None = None  # taken within a distance of a position
    min_pixels: int | None = None  # width x height at least
    max_pixels: int | None = None  # at most
    include_offline: bool = False  # also the files of folders whose drive is away (`--include-offline`)
    outside: tuple[str, ...] = ()  # folders whose files are left out: an index's offline ones (`IndexStore.visible`)

    @property
    def is_empty(self) -> bool:
        """Whether it keeps every file (of the folders that are online)."""
        return dataclasses.replace(self, include_offline=False) == Filter()

    def under(self, prefix: str | None) -> Filter:
        """This filter with its prefix replaced by `prefix` (an API's separate prefix argument), if one is given."""
        return self if prefix is None else dataclasses.replace(self, prefix=prefix)

    def to_params(self) -> dict[str, str | list[str]]:
        """The query parameters that ask a service (`clipengine.serve`) for this filter: `make_filter` reads them
        back to the same Filter."""
        def when(seconds: float) -> str:
            return dt.datetime.fromtimestamp(seconds, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M")
        params: dict[str, str | list[str]] = {}
        if self.prefix is not None:
            params["prefix"] = self.prefix
        if self.after is not None:
            params["after"] = when(self.after)
        if self.before is not None:
            params["before"] = when(self.before)
        for name, values in (("camera", self.cameras), ("kind", self.kinds), ("ext", self.extensions),
                             ("place", self.places)):
            if values:
                params[name] = list(values)
        if self.near is not None:
            params["near"] = f"{self.near.latitude!r},{self.near.longitude!r},{self.near.radius_km!r}km"
        if self.min_pixels is not None:
            params["min_size"] = f"{self.min_pixels}x1"
        if self.max_pixels is not None:
            params["max_size"] = f"{self.max_pixels}x1"
        if self.include_offline:
            params["include_offline"] = "true"
        return params

    def sql(self) -> tuple[str, list]:
        """A condition on `files f` (and the media table), with its parameters."""
        where: list[str] = ["1"]
        params: list = []

        def add(condition: str, *values) -> None:
            where.append(condition)
            params.extend(values)

        def any_like(column: str, patterns: list[str]) -> None:  # a repeated option: any of them
            if patterns:
                add("(" + " OR ".join(f"{column} LIKE ?" for _ in patterns) + ")", *patterns)

        def within(column: str, low, high, below: str) -> None:  # bounds: `below` is "<" (before) or "<=" (at most)
            if low is not None:
                add(f"{column} >= ?", low)
            if high is not None:
                add(f"{column} {below} ?", high)

        if self.prefix is not None:
            add("f.path >= ? AND f.path < ?", *prefix_range(self.prefix))
        for folder in self.outside:
            add("NOT (f.path >= ? AND f.path < ?)", *folder_range(folder))
        within("COALESCE((SELECT m.taken_at FROM media m WHERE m.hash = f.hash), f.mtime_ns / 1e9)", self.after,
               self.before, "<")
        any_like("(SELECT lower(COALESCE(m.make, '') || ' ' || COALESCE(m.model, '')) FROM media m WHERE m.hash = f.hash)",
                 [f"%{c.lower()}%" for c in self.cameras])
        if self.kinds:
            add(f"(SELECT m.kind FROM media m WHERE m.hash = f.hash) IN ({','.join('?' * len(self.kinds))})", *self.kinds)
        any_like("lower(f.path)", [f"%{e}" for e in self.extensions])
        any_like("(SELECT p.words FROM places p WHERE p.hash = f.hash)", [f"% {p} %" for p in self.places])
        if self.near is not None:
            near = self.near
            add("EXISTS (SELECT 1 FROM media m WHERE m.hash = f.hash AND m.latitude BETWEEN ? AND ? AND m.longitude "
                f"BETWEEN ? AND ? AND {DISTANCE_FUNCTION}(m.latitude, m.longitude, ?, ?) <= ?)", *near.box(),
                near.latitude, near.longitude, near.radius_km)
        within("(SELECT v.width * v.height FROM vectors v WHERE v.hash = f.hash)", self.min_pixels, self.max_pixels,
               "<=")
        return " AND ".join(where), params


KEEP_ALL = Filter()


def prefix_range(prefix: str) -> tuple[str, str]:
    """The [lo, hi) range of paths that start with `prefix`, for an indexed range query."""
    return prefix, prefix[:-1] + chr(ord(prefix[-1]) + 1) if prefix else "\U0010ffff"


def folder_range(folder: str) -> tuple[str, str]:
    """The [lo, hi) range of the paths inside the directory `folder`."""
    return prefix_range(folder.rstrip(os.sep) + os.sep)


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


def parse_pixels(text: str, option: str) -> int:
    """'12MP' or '1920x1080' as a pixel count, or a one-line error."""
    match = _PIXELS.fullmatch(text)
    if match is None:
        raise BadInput(f"{option} {text!r}: give megapixels such as 12MP, or a size such as 1920x1080")
    return round(float(match[1]) * 1e6) if match[1] else int(match[2]) * int(match[3])


def make_filter(prefix: str | None = None, after: str | None = None, before: str | None = None,
                cameras=(), kinds=(), extensions=(), places=(), near: str | None = None,
                min_size: str | None = None, max_size: str | None = None, include_offline: bool = False) -> Filter:
    """A filter from options as a user types them (`--prefix`, `--after`, `--before`, `--camera`, `--kind`,
    `--ext`, `--place`, `--near`, `--min-size`, `--max-size`, `--include-offline`), each checked with a
    one-line error."""
    for kind in kinds:
        if kind not in KINDS:
            raise BadInput(f"--kind {kind!r}: choose {' or '.join(KINDS)}")
    start = parse_when(after, "--after") if after else None
    stop = parse_when(before, "--before") if before else None
    if start is not None and stop is not None and start >= stop:
        raise BadInput(f"--after {after} is not before --before {before}: nothing could match")
    folded = tuple(place_words(p) for p in places)
    if any(not p for p in folded):
        raise BadInput("--place needs a name, such as Berlin, Bavaria or Germany")
    low = parse_pixels(min_size, "--min-size") if min_size else None
    high = parse_pixels(max_size, "--max-size") if max_size else None
    if low is not None and high is not None and low > high:
        raise BadInput(f"--min-size {min_size} is more than --max-size {max_size}: nothing could match")
    return Filter(path_prefix(prefix) if prefix is not None else None, start, stop,
                  tuple(c.strip() for c in cameras if c.strip()), tuple(kinds),
                  tuple("." + e.lower().lstrip(".") for e in extensions), folded,
                  parse_near(near) if near else None, low, high, include_offline)
