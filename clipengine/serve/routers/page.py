"""The web page: one HTML file and its static script and style, no build step, no network."""

from __future__ import annotations

import secrets
from importlib import resources

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from clipengine.serve.deps import TOKEN_COOKIE, ServiceDep, authorised
from clipengine.serve.errors import Refused

STATIC = resources.files("clipengine.serve") / "static"
router = APIRouter(include_in_schema=False)


@router.get("/", response_class=HTMLResponse)
def home(request: Request, running: ServiceDep, token: str | None = None) -> Response:
    expected = running.config.token
    if expected is not None and token is not None:  # /?token=...: keep it in a cookie, drop it from the URL
        if not secrets.compare_digest(token.encode(), expected.encode()):
            raise Refused(401, "wrong token")
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
        return response
    authorised(request, running)
    return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))
