"""What the routes share, as FastAPI dependencies: the running service, the token check, the index a request
names, and what its search keeps (path prefix, dates, cameras, kinds, extensions)."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Query, Request

from clipengine.index.filters import Filter, make_filter
from clipengine.index.hits import check_arrangement
from clipengine.index.service import MAX_K
from clipengine.serve.errors import Refused
from clipengine.serve.state import ServedIndex, Service

TOKEN_COOKIE = "clipengine_token"

IndexQ = Annotated[str | None, Query(description="Index name (default: the first one served).")]
KQ = Annotated[int, Query(ge=1, le=MAX_K, description="How many results.")]
PrefixQ = Annotated[str | None, Query(description="Only results whose path starts with this.")]


def service(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(service)]


def authorised(request: Request, running: ServiceDep) -> None:
    """The service's token, from an `Authorization: Bearer` header or the page's cookie (none needed without one)."""
    token = running.config.token
    if token is None:
        return
    header = request.headers.get("authorization", "")
    given = header[7:] if header.lower().startswith("bearer ") else request.cookies.get(TOKEN_COOKIE, "")
    if not secrets.compare_digest(given.encode(), token.encode()):
        raise Refused(401, "this service needs its token: send 'Authorization: Bearer TOKEN', "
                           "or open the page once as /?token=TOKEN")


def served_index(running: ServiceDep, index: IndexQ = None) -> ServedIndex:
    """The index named by `?index=` (the first one served when none is named)."""
    if index is None:
        return next(iter(running.indexes.values()))
    if index not in running.indexes:
        raise Refused(404, f"this service has no index '{index}' (it serves: {', '.join(running.indexes)})")
    return running.indexes[index]


def kept(prefix: PrefixQ = None,
         after: Annotated[str | None, Query(description="Only files taken at or after this (2023, 2023-06, "
                                                        "2023-06-14, UTC).")] = None,
         before: Annotated[str | None, Query(description="Only files taken before this.")] = None,
         camera: Annotated[list[str] | None, Query(description="A camera's make or model words (any of them).")] = None,
         kind: Annotated[list[str] | None, Query(description="image or video (any of them).")] = None,
         ext: Annotated[list[str] | None, Query(description="A file extension, e.g. png (any of them).")] = None,
         place: Annotated[list[str] | None, Query(description="A town, district, region or country name (any of "
                                                              "them).")] = None,
         near: Annotated[str | None, Query(description="LAT,LON,RADIUS with km, m or mi: 48.85,2.35,20km.")] = None,
         min_size: Annotated[str | None, Query(description="At least this many pixels: 12MP or 1920x1080.")] = None,
         max_size: Annotated[str | None, Query(description="At most this many pixels.")] = None,
         include_offline: Annotated[bool, Query(description="Also the files of folders whose drive is away.")] = False,
         ) -> Filter:
    """What a search keeps, as `clipengine search` takes it (a bad date is a 400 with the one-line error)."""
    return make_filter(prefix or None, after, before, camera or (), kind or (), ext or (), place or (), near or None,
                       min_size or None, max_size or None, include_offline)


def sort_order(sort: Annotated[str, Query(description="score, date (oldest first) or -date: the order of the top "
                                                      "hits, which the search still finds by meaning.")] = "score"
               ) -> str:
    check_arrangement(sort)
    return sort


Served = Annotated[ServedIndex, Depends(served_index)]
SortBy = Annotated[str, Depends(sort_order)]
Kept = Annotated[Filter, Depends(kept)]
AUTHORISED = [Depends(authorised)]
