"""The HTTP API and the web page of `clipengine serve`: parse a request, call the library, answer in JSON.

Each index is opened once, as a resident `Searcher`, so a query after the first costs milliseconds. Its
queries run one at a time (a lock per index: the Searcher's sqlite connection and ONNX sessions are shared),
and before each one the searcher follows any commit an `index` run has made meanwhile (`Searcher.refresh`),
so the service answers from the last commit while an index grows, with no restart.

Every error a request can cause is a JSON body {"error": "..."} with a 4xx status: a bad query or image
400, an unknown index or id 404, an upload over the cap 413, a malformed parameter 422 (FastAPI's own
validation), a missing token 401. Files are reached only by id (`clipengine.index.thumbnails`).
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated

import numpy as np
from fastapi import Body, Depends, FastAPI, File, Query, Request, UploadFile
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from clipengine import __version__
from clipengine.errors import BadInput, ClipEngineError, IndexNotFound
from clipengine.images import DEFAULT_MAX_PIXELS
from clipengine.index.hits import path_prefix
from clipengine.index.search import Searcher
from clipengine.index.terms import Term
from clipengine.index.thumbnails import FileUnavailable, indexed_file, thumbnail
from clipengine.serve.discovery import MAX_K

DEFAULT_MAX_UPLOAD = 64 * 2**20  # bytes: an upload is held in memory, unlike an indexed file read from disk
TOKEN_COOKIE = "clipengine_token"
REFRESH_EVERY = 0.5  # seconds between checks for new commits


IndexQ = Annotated[str | None, Query(description="Index name (default: the first one served).")]
KQ = Annotated[int, Query(ge=1, le=MAX_K, description="How many results.")]
PrefixQ = Annotated[str | None, Query(description="Only results whose path starts with this.")]


class TermIn(BaseModel):
    """One term of a query: a text or an indexed image's id (never a path), and its weight."""

    text: str | None = None
    id: int | None = None
    weight: float = 1.0


class Refused(Exception):
    """A request the service answers with a 4xx status and a one-line reason."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class ServedIndex:
    """One index, open for the life of the service."""

    name: str
    path: Path
    searcher: Searcher
    lock: threading.Lock = field(default_factory=threading.Lock)
    checked_at: float = 0.0

    @contextmanager
    def open(self) -> Iterator[Searcher]:
        """The searcher, alone, current with the index's last commit."""
        with self.lock:
            now = time.monotonic()
            if now - self.checked_at >= REFRESH_EVERY:
                self.searcher.refresh()
                self.checked_at = now
            yield self.searcher

    def describe(self) -> dict:
        store = self.searcher.store
        with self.lock:
            return {"name": self.name, "path": str(self.path), "model": store.manifest["model"]["identity"],
                    "count": store.counts()["count"], "generation": store.generation}


@dataclass
class ServiceConfig:
    indexes: dict[str, Path]  # name -> index directory
    token: str | None = None  # required on every request when set
    max_upload: int = DEFAULT_MAX_UPLOAD
    max_pixels: int = DEFAULT_MAX_PIXELS


def create_app(config: ServiceConfig) -> FastAPI:
    """The service over `config.indexes`, all opened now (a missing or damaged index fails here, not later)."""
    if not config.indexes:
        raise BadInput("name at least one index to serve: --index NAME")
    served: dict[str, ServedIndex] = {}
    try:
        for name, path in config.indexes.items():
            served[name] = ServedIndex(name, path, Searcher(path))
    except BaseException:
        for s in served.values():
            s.searcher.close()
        raise
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        for s in served.values():
            s.searcher.close()

    app = FastAPI(title="clipengine", version=__version__, lifespan=lifespan,
                  description="Search image indexes by text, by image, by an indexed image, or by a vector.")
    app.state.served = served

    @app.exception_handler(Refused)
    def refused(request: Request, e: Refused) -> JSONResponse:
        return JSONResponse({"error": str(e)}, status_code=e.status)

    @app.exception_handler(IndexNotFound)
    def not_found(request: Request, e: IndexNotFound) -> JSONResponse:
        return JSONResponse({"error": str(e)}, status_code=404)

    @app.exception_handler(FileUnavailable)
    def unavailable(request: Request, e: FileUnavailable) -> JSONResponse:
        return JSONResponse({"error": str(e)}, status_code=404)

    @app.exception_handler(ClipEngineError)
    def user_error(request: Request, e: ClipEngineError) -> JSONResponse:
        return JSONResponse({"error": str(e)}, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:  # unknown routes and the like
        return JSONResponse({"error": str(e.detail)}, status_code=e.status_code, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    def invalid(request: Request, e: RequestValidationError) -> JSONResponse:  # FastAPI's own, as one line
        errors = jsonable_encoder(e.errors())
        what = "; ".join(f"{'.'.join(str(p) for p in err.get('loc', [])[1:])}: {err.get('msg')}" for err in errors)
        return JSONResponse({"error": what or "malformed request", "detail": errors}, status_code=422)

    @app.middleware("http")
    async def cap_uploads(request: Request, call_next):  # before the body is read, let alone parsed or spooled
        length = request.headers.get("content-length", "")
        if request.method == "POST" and length.isdigit() and int(length) > config.max_upload + 65536:
            return JSONResponse({"error": f"the upload is over {config.max_upload // 2**20} MiB"}, status_code=413)
        return await call_next(request)

    def authorised(request: Request) -> None:
        if config.token is None:
            return
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else request.cookies.get(TOKEN_COOKIE, "")
        if not secrets.compare_digest(given.encode(), config.token.encode()):
            raise Refused(401, "this service needs its token: send 'Authorization: Bearer TOKEN', "
                               "or open the page once as /?token=TOKEN")

    def index_named(name: str | None) -> ServedIndex:
        if name is None:
            return next(iter(served.values()))
        if name not in served:
            raise Refused(404, f"this service has no index '{name}' (it serves: {', '.join(served)})")
        return served[name]

    def prefix_of(prefix: str | None) -> str | None:
        return path_prefix(prefix) if prefix else None

    auth = [Depends(authorised)]

    @app.get("/api/health")
    def health() -> dict:
        """Alive, and what it serves (no token needed: it reveals only index names, paths and models)."""
        return {"status": "ok", "service": "clipengine", "version": __version__,
                "token_required": config.token is not None,
                "indexes": [s.describe() for s in served.values()]}

    @app.get("/api/indexes", dependencies=auth)
    def indexes() -> list[dict]:
        return [s.describe() for s in served.values()]

    @app.get("/api/info", dependencies=auth)
    def info(index: IndexQ = None) -> dict:
        from clipengine.index.info import index_info

        return index_info(index_named(index).path).to_dict()

    @app.get("/api/search", dependencies=auth)
    def search_text(q: Annotated[str, Query(min_length=1, max_length=10_000)], k: KQ = 10, prefix: PrefixQ = None,
                    index: IndexQ = None) -> list[dict]:
        """Images for a text."""
        with index_named(index).open() as searcher:
            return [h.to_dict() for h in searcher.search_text(q, k, prefix_of(prefix))]

    @app.get("/api/similar/{file_id}", dependencies=auth)
    def search_similar(file_id: int, k: KQ = 10, prefix: PrefixQ = None, index: IndexQ = None) -> list[dict]:
        """Images like an indexed one ("more like this"), by its id."""
        with index_named(index).open() as searcher:
            return [h.to_dict() for h in searcher.search_id(file_id, k, prefix_of(prefix))]

    @app.post("/api/search/terms", dependencies=auth)
    def search_terms(terms: Annotated[list[TermIn], Body(embed=True, min_length=1, max_length=64)], k: KQ = 10,
                     prefix: PrefixQ = None, index: IndexQ = None) -> list[dict]:
        """Images for a weighted sum of texts and indexed images (query arithmetic): `[{"text": "a cat"},
        {"text": "indoors", "weight": -1}, {"id": 12, "weight": 0.5}]`."""
        parsed = [Term(text=t.text, id=t.id, weight=t.weight) for t in terms]
        with index_named(index).open() as searcher:
            return [h.to_dict() for h in searcher.search_terms(parsed, k, prefix_of(prefix))]

    @app.post("/api/search/image", dependencies=auth)
    async def search_image(file: Annotated[UploadFile, File(description="An image file.")], k: KQ = 10,
                           prefix: PrefixQ = None, index: IndexQ = None) -> list[dict]:
        """Images like an uploaded one."""
        data = await file.read(config.max_upload + 1)
        if len(data) > config.max_upload:
            raise Refused(413, f"the upload is over {config.max_upload // 2**20} MiB")
        served_index = index_named(index)
        import anyio.to_thread

        def run() -> list[dict]:
            with served_index.open() as searcher:
                vector = searcher.image_bytes_vector(data, config.max_pixels)
                return [h.to_dict() for h in searcher.search_vector(vector, k, prefix_of(prefix))]

        return await anyio.to_thread.run_sync(run)

    @app.post("/api/search/vector", dependencies=auth)
    def search_vector(vector: Annotated[list[float], Body(embed=True, max_length=65536)], k: KQ = 10,
                      prefix: PrefixQ = None, index: IndexQ = None) -> list[dict]:
        """Images nearest a raw query embedding (normalised here)."""
        with index_named(index).open() as searcher:
            return [h.to_dict() for h in searcher.search_vector(np.asarray(vector, np.float32), k, prefix_of(prefix))]

    @app.get("/api/thumbnail/{file_id}", dependencies=auth)
    def get_thumbnail(file_id: int, size: Annotated[int, Query(ge=16, le=1024)] = 256,
                      index: IndexQ = None) -> FileResponse:
        served_index = index_named(index)
        with served_index.lock:
            path = thumbnail(served_index.searcher.store, file_id, size)
        return FileResponse(path, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=86400"})

    @app.get("/api/file/{file_id}", dependencies=auth)
    def get_file(file_id: int, index: IndexQ = None) -> FileResponse:
        """The original file, as indexed."""
        served_index = index_named(index)
        with served_index.lock:
            row = indexed_file(served_index.searcher.store, file_id)
        return FileResponse(row.path, filename=Path(row.path).name, content_disposition_type="inline")

    page = resources.files("clipengine.serve") / "static"

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def home(request: Request, token: str | None = None) -> Response:
        if config.token is not None and token is not None:  # /?token=...: keep it in a cookie, drop it from the URL
            if not secrets.compare_digest(token.encode(), config.token.encode()):
                raise Refused(401, "wrong token")
            response = RedirectResponse("/", status_code=303)
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
            return response
        authorised(request)
        return HTMLResponse((page / "index.html").read_text(encoding="utf-8"))

    app.mount("/static", StaticFiles(directory=str(page)), name="static")
    return app
