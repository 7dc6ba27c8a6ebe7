"""What an index holds and what should be done about it: `clipengine info`."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

from clipengine.index.faiss_view import FaissState, SearchStructure
from clipengine.index.store import IndexStore


@dataclass
class IndexInfo:
    path: str
    model: dict
    count: int  # searchable files, videos among them
    videos: int  # searchable videos, and the frames that stand for them in the search structure
    frames: int
    media: dict  # what the files say of themselves: taken span, cameras, positions (IndexStore.media_summary)
    skipped_files: list[dict]  # {path, reason} of each file that could not be used (IndexReport.skipped counts them)
    not_indexed: dict[str, int]  # what the walks of its folders passed over, by kind (clipengine.index.scan)
    unique_vectors: int
    dim: int
    metric: str
    faiss: FaissState
    faiss_policy: dict
    folders: list[str]
    offline: list[dict]  # {folder, files, since, reason}: folders whose drive is away, kept but out of searches
    created_at: str
    size_bytes: int
    faiss_current: bool
    query_encoders: dict | None  # the exported towers: verified (how closely) or failed (why); None: not exported
    advice: list[str]  # what to do about the search structure or the query encoders, if anything

    def to_dict(self) -> dict:
        return asdict(self)


def index_info(index_path: str | os.PathLike) -> IndexInfo:
    """What an index holds: its model, how many files are searchable, and what was skipped and why."""
    path = Path(index_path)
    with IndexStore.open(path) as store:
        structure = SearchStructure(store)
        counts, state, policy = store.counts(), structure.state, structure.policy
        advice = state.advice(counts["count"], bool(policy["factory"]), f"run `clipengine reindex --index {path}`")
        return IndexInfo(
            path=str(path),
            model=store.manifest["model"],
            count=counts["count"],
            videos=counts["videos"],
            frames=counts["frames"],
            media=store.media_summary(),
            skipped_files=[{"path": p, "reason": r} for p, r in store.skipped()],
            not_indexed=store.not_indexed(),
            unique_vectors=counts["unique_vectors"],
            dim=store.dim,
            metric=store.manifest["metric"],
            faiss=state,
            faiss_policy=policy,
            folders=[p for p, _ in store.folders()],
            offline=[{"folder": r.path, "files": r.files, "since": r.offline_since, "reason": r.offline_reason}
                     for r in store.roots() if r.offline],
            created_at=store.manifest["created_at"],
            size_bytes=sum(p.stat().st_size for p in path.rglob("*") if p.is_file()),
            faiss_current=structure.current,
            query_encoders=store.query_encoders,
            advice=advice + encoders_advice(store),
        )


def encoders_advice(store: IndexStore) -> list[str]:
    """What to do when searches must load torch though they need not: no query encoders, or damaged ones.
    (A model that does not export has nothing to do: `info` shows why, tower by tower.)"""
    from clipengine.index.query_encoders import EncodersUnavailable, QueryEncoders, fallback_advice

    try:
        QueryEncoders.open(store.path, store.query_encoders)
    except EncodersUnavailable as e:
        advice = fallback_advice(store.query_encoders, e, store.path)
        return [advice] if advice else []
    return []
