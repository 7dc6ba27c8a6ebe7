"""The answers of the API, as pydantic models: `/docs` shows each one's schema."""

from __future__ import annotations

from pydantic import BaseModel, Field


class HitOut(BaseModel):
    """One search result: what `clipengine search --json` prints for it."""

    rank: int = Field(description="1 for the best match.")
    score: float = Field(description="Cosine similarity with the query, in [-1, 1].")
    path: str = Field(description="The file as indexed.")
    width: int
    height: int
    id: int = Field(description="The indexed file's id: /api/file/ID, /api/thumbnail/ID, /api/similar/ID.")
    seconds: float | None = Field(None, description="A video's hit: the moment of its best-matching frame "
                                                    "(/api/thumbnail/ID?t=SECONDS, /api/view/ID#t=SECONDS).")
    taken: str | None = Field(None, description="When it was taken, ISO 8601 as the file says it (with its offset "
                                                "when it gives one), else its modification time in UTC.")
    taken_at: float | None = Field(None, description="The same in seconds since 1970 (a time without a zone read "
                                                     "as UTC), for ordering.")
    place: str | None = Field(None, description="Where it was taken, from its GPS position: 'Mitte, State of Berlin, "
                                                "Germany'.")
    plan: str | None = Field(None, description="A filtered search: how it ran, an exact scan of the kept vectors or "
                                               "the index at a raised depth, and how many the filter kept.")


class TermIn(BaseModel):
    """One term of a query: a text or an indexed image's id (never a path), and its weight."""

    text: str | None = None
    id: int | None = None
    weight: float = 1.0


class IndexOut(BaseModel):
    """An index the service keeps open."""

    name: str
    path: str
    model: str = Field(description="The identity of the model that built it.")
    count: int = Field(description="Searchable files.")
    generation: int = Field(description="Commits so far: it grows while `clipengine index` adds files.")


class HealthOut(BaseModel):
    status: str
    service: str
    version: str
    token_required: bool
    indexes: list[IndexOut]
