"""The HTTP API and the web page of `clipengine serve`, in FastAPI's own layout: the routes by area in
`routers/`, what they share as dependencies (`deps`), the answers as pydantic models (`models`, so `/docs`
shows each schema), and every refusal as one-line JSON (`errors`). Each index is opened once, before the
socket is bound, as a resident `Searcher` (`state`), so a query after the first costs milliseconds."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from clipengine import __version__
from clipengine.serve.errors import cap_uploads, install_handlers
from clipengine.serve.routers import about, files, page, search
from clipengine.serve.state import Service, ServiceConfig


def create_app(config: ServiceConfig) -> FastAPI:
    """The service over `config.indexes`, all opened now (a missing or damaged index fails here, not later)."""
    running = Service(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        running.close()

    app = FastAPI(title="clipengine", version=__version__, lifespan=lifespan,
                  description="Search image indexes by text, by image, by an indexed image, or by a vector.")
    app.state.service = running
    install_handlers(app)
    cap_uploads(app, config.max_upload)
    for area in (about, search, files, page):
        app.include_router(area.router)
    app.mount("/static", StaticFiles(directory=str(page.STATIC)), name="static")
    return app
