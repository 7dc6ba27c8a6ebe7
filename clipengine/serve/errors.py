"""Every error a request can cause, as a JSON body {"error": "..."} with a 4xx status: a bad query or image
400, an unknown index or id 404, an upload over the cap 413, a malformed parameter 422 (FastAPI's own
validation, as one line), a missing token 401. Never a 500 or a traceback for a user's mistake."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from clipengine.errors import ClipEngineError, IndexNotFound
from clipengine.index.thumbnails import FileUnavailable


class Refused(Exception):
    """A request the service answers with a 4xx status and a one-line reason."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def upload_too_large(max_upload: int) -> Refused:
    return Refused(413, f"the upload is over {max_upload // 2**20} MiB")


def refusal(e: Exception) -> JSONResponse:
    """The JSON answer to an exception a request raised."""
    if isinstance(e, Refused):
        return JSONResponse({"error": str(e)}, status_code=e.status)
    if isinstance(e, IndexNotFound | FileUnavailable):
        return JSONResponse({"error": str(e)}, status_code=404)
    if isinstance(e, StarletteHTTPException):  # unknown routes and the like
        return JSONResponse({"error": str(e.detail)}, status_code=e.status_code, headers=e.headers)
    if isinstance(e, RequestValidationError):  # FastAPI's own, as one line
        errors = jsonable_encoder(e.errors())
        what = "; ".join(f"{'.'.join(str(p) for p in err.get('loc', [])[1:])}: {err.get('msg')}" for err in errors)
        return JSONResponse({"error": what or "malformed request", "detail": errors}, status_code=422)
    return JSONResponse({"error": str(e)}, status_code=400)  # any other ClipEngineError: the user's input


def install_handlers(app: FastAPI) -> None:
    for kind in (Refused, ClipEngineError, StarletteHTTPException, RequestValidationError):
        app.add_exception_handler(kind, lambda request, e: refusal(e))


def cap_uploads(app: FastAPI, max_upload: int) -> None:
    """Refuse a POST whose Content-Length is over the cap before its body is read, let alone parsed or spooled
    (the handler checks the bytes it reads too: a client may send no length)."""

    @app.middleware("http")
    async def capped(request: Request, call_next):
        length = request.headers.get("content-length", "")
        if request.method == "POST" and length.isdigit() and int(length) > max_upload + 65536:  # + the form's headers
            return refusal(upload_too_large(max_upload))
        return await call_next(request)
