"""Searching: by text, by an indexed image, by a sum of terms, by an uploaded image, by a raw vector."""

from __future__ import annotations

from typing import Annotated

import numpy as np
from fastapi import APIRouter, Body, File, Query, UploadFile

from clipengine.index.hits import Hit, order_hits
from clipengine.index.terms import Term
from clipengine.serve.deps import AUTHORISED, KQ, Kept, Served, ServiceDep, SortBy
from clipengine.serve.errors import upload_too_large
from clipengine.serve.models import HitOut, TermIn

router = APIRouter(prefix="/api", tags=["search"], dependencies=AUTHORISED)
Hits = list[HitOut]


def answer(hits: list[Hit], sort: str) -> list[dict]:
    return [h.to_dict() for h in order_hits(hits, sort)]


@router.get("/search", response_model=Hits)
def search_text(q: Annotated[str, Query(min_length=1, max_length=10_000)], served: Served, where: Kept,
                sort: SortBy,
                k: KQ = 10) -> list[dict]:
    """Images for a text."""
    with served.open() as searcher:
        return answer(searcher.search_text(q, k, where=where), sort)


@router.get("/similar/{file_id}", response_model=Hits)
def search_similar(file_id: int, served: Served, where: Kept, sort: SortBy, k: KQ = 10) -> list[dict]:
    """Images like an indexed one ("more like this"), by its id."""
    with served.open() as searcher:
        return answer(searcher.search_id(file_id, k, where=where), sort)


@router.post("/search/terms", response_model=Hits)
def search_terms(terms: Annotated[list[TermIn], Body(embed=True, min_length=1, max_length=64)], served: Served,
                 where: Kept, sort: SortBy, k: KQ = 10) -> list[dict]:
    """Images for a weighted sum of texts and indexed images (query arithmetic): `[{"text": "a cat"},
    {"text": "indoors", "weight": -1}, {"id": 12, "weight": 0.5}]`."""
    parsed = [Term(text=t.text, id=t.id, weight=t.weight) for t in terms]
    with served.open() as searcher:
        return answer(searcher.search_terms(parsed, k, where=where), sort)


@router.post("/search/image", response_model=Hits)
async def search_image(file: Annotated[UploadFile, File(description="An image file.")], served: Served,
                       running: ServiceDep, where: Kept, sort: SortBy, k: KQ = 10) -> list[dict]:
    """Images like an uploaded one (the bytes of an indexed image use its stored vector)."""
    cap = running.config.max_upload
    data = await file.read(cap + 1)
    if len(data) > cap:
        raise upload_too_large(cap)
    import anyio.to_thread

    def run() -> list[dict]:
        with served.open() as searcher:
            vector = searcher.image_bytes_vector(data, running.config.max_pixels, file.filename)
            return answer(searcher.search_vector(vector, k, where=where), sort)

    return await anyio.to_thread.run_sync(run)


@router.post("/search/vector", response_model=Hits)
def search_vector(vector: Annotated[list[float], Body(embed=True, max_length=65536)], served: Served, where: Kept,
                  sort: SortBy,
                  k: KQ = 10) -> list[dict]:
    """Images nearest a raw query embedding (normalised here)."""
    with served.open() as searcher:
        return answer(searcher.search_vector(np.asarray(vector, np.float32), k, where=where), sort)
