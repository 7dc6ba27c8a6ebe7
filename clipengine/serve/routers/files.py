"""Indexed files by id only, never by path: a thumbnail, or the original as it was indexed."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse

from clipengine.index.thumbnails import indexed_file, thumbnail, viewable
from clipengine.serve.deps import AUTHORISED, Served

router = APIRouter(prefix="/api", tags=["files"], dependencies=AUTHORISED)


@router.get("/thumbnail/{file_id}", response_class=FileResponse)
def get_thumbnail(file_id: int, served: Served, size: Annotated[int, Query(ge=16, le=1024)] = 256,
                  t: Annotated[float | None, Query(ge=0, description="A video's moment, in seconds.")] = None
                  ) -> FileResponse:
    """A JPEG thumbnail, at most `size` pixels a side, made once and kept in the index; of a video, its frame at
    `t` seconds (a hit's `seconds`)."""
    with served.lock:
        path = thumbnail(served.searcher.store, file_id, size, t)
    return FileResponse(path, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=86400"})


@router.get("/view/{file_id}", response_class=FileResponse)
def get_view(file_id: int, served: Served) -> FileResponse:
    """The file to look at in a browser: the original, or a JPEG rendering of a format browsers do not display
    (HEIC, JPEG XL, camera RAW, TIFF); /api/file/ID is always the original."""
    with served.lock:
        path = viewable(served.searcher.store, file_id)
    return FileResponse(path, content_disposition_type="inline")


@router.get("/file/{file_id}", response_class=FileResponse)
def get_file(file_id: int, served: Served) -> FileResponse:
    """The original file, while it is the file that was indexed."""
    with served.lock:
        row = indexed_file(served.searcher.store, file_id)
    return FileResponse(row.path, filename=Path(row.path).name, content_disposition_type="inline")
