"""What is served: health (for clients deciding whether to believe a service), the indexes, an index's info."""

from __future__ import annotations

from fastapi import APIRouter

from clipengine import __version__
from clipengine.serve.deps import AUTHORISED, Served, ServiceDep
from clipengine.serve.models import HealthOut, IndexOut

router = APIRouter(prefix="/api", tags=["about"])


@router.get("/health", response_model=HealthOut)
def health(running: ServiceDep) -> dict:
    """Alive, and what it serves (no token needed: it reveals only index names, paths and models)."""
    return {"status": "ok", "service": "clipengine", "version": __version__,
            "token_required": running.config.token is not None,
            "indexes": [s.describe() for s in running.indexes.values()]}


@router.get("/indexes", response_model=list[IndexOut], dependencies=AUTHORISED)
def indexes(running: ServiceDep) -> list[dict]:
    return [s.describe() for s in running.indexes.values()]


@router.get("/info", dependencies=AUTHORISED)
def info(served: Served) -> dict:
    """What `clipengine info --json` says of the index."""
    from clipengine.index.info import index_info

    return index_info(served.path).to_dict()
