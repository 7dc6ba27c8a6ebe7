"""What the routes share, as FastAPI dependencies: the running service, the token check, the index a request
names, and its path prefix."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Query, Request

from clipengine.index.hits import path_prefix
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


def prefix(prefix: PrefixQ = None) -> str | None:
    return path_prefix(prefix) if prefix else None


Served = Annotated[ServedIndex, Depends(served_index)]
Prefix = Annotated[str | None, Depends(prefix)]
AUTHORISED = [Depends(authorised)]
