"""Build or update an index from a folder: scan -> plan -> embed -> commit -> sync faiss.

Incremental and resumable by construction: the plan compares the folder with what the index holds,
so only new and changed files are embedded, deleted ones are dropped, and moved ones are recognised
by content hash and reuse their vectors without being decoded. Progress is committed every
`commit_every` files, so an interrupted run (Ctrl-C, kill -9, power loss) loses at most the batch in
flight and the next run carries on from there. A run over an unchanged folder never imports torch.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from clipengine.errors import BadInput
from clipengine.images import DEFAULT_MAX_PIXELS
from clipengine.models import ModelSpec, check_same_model, describe_source, require_same_source, resolve_source
from clipengine.scan import FoundFile, plan_update, scan_folder
from clipengine.store import FileRecord, IndexStore, remove_index

ProgressCallback = Callable[[int, int], None]  # (files done, files to do)


@dataclass
class IndexReport:
    index: str
    folder: str
    model: str
    embedded: int = 0  # decoded and run through the model
    reused: int = 0  # recognised by content hash (moved, renamed or duplicated files)
    skipped: int = 0  # new skips in this run
    removed: int = 0  # rows dropped: files deleted, or the old rows of changed files
    unchanged: int = 0
    changed: int = 0
    count: int = 0  # searchable files in the index after the run
    seconds: float = 0.0
    skips: list[dict] = field(default_factory=list)  # {path, reason} of this run's skips

    @property
    def images_per_second(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "images_per_second": round(self.images_per_second, 2)}


def _open_or_create(index_path: Path, spec: ModelSpec, model, device: str | None, rebuild: bool):
    """Open the index for writing, creating it (which needs the model, for its dimension) if absent.

    Returns (store, loaded model or None): the model is loaded only when it had to be.
    """
    if rebuild:
        remove_index(index_path)
    if IndexStore.exists(index_path):
        store = IndexStore.open(index_path, writable=True)
        try:
            check_same_model(store.manifest["model"], spec, f"index {index_path}")
            if model is not None:
                require_same_source(store.manifest["model"], model.source, f"index {index_path}")
        except BaseException:
            store.close()
            raise
        return store, model
    if index_path.exists() and any(index_path.iterdir()):
        raise BadInput(f"{index_path} exists and is not a clipengine index: choose another --index")
    if index_path.exists():
        index_path.rmdir()
    if model is None:
        from clipengine.models import load_model

        model = load_model(resolve_source(spec), device=device)
    else:
        check_same_model(model.source, spec, "the model passed in")
    return IndexStore.create(index_path, model.source), model


def index_folder(
    folder: str | os.PathLike,
    index_path: str | os.PathLike,
    spec: ModelSpec = ModelSpec(),
    *,
    model=None,
    device: str | None = None,
    batch_size: int | None = None,
    workers: int | None = None,
    commit_every: int = 256,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft: bool = True,
    include_hidden: bool = False,
    retry_skipped: bool = False,
    rebuild: bool = False,
    progress: ProgressCallback | None = None,
) -> IndexReport:
    """Bring the index at `index_path` up to date with the images under `folder`.

    `spec` names the model for a new index; for an existing one it may be left empty (the index's own
    model is used) and anything else named is refused unless it is the same model. `model`, an already
    loaded `LoadedModel`, saves loading it again when indexing several folders.
    """
    started = time.perf_counter()
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise BadInput(f"{folder} is not a folder" if root.exists() else f"folder not found: {folder}")
    root_str = os.path.abspath(root)
    if commit_every < 1 or (batch_size is not None and batch_size < 1):
        raise BadInput("--commit-every and --batch-size must be at least 1")
    index_path = Path(index_path)
    store, model = _open_or_create(index_path, spec, model, device, rebuild)
    with store:
        report = IndexReport(index=str(index_path), folder=root_str, model=describe_source(store.manifest["model"]))
        plan = plan_update(scan_folder(root_str, include_hidden=include_hidden),
                           store.recorded_under(root_str), retry_skipped=retry_skipped)
        report.unchanged, report.changed = plan.unchanged, plan.changed
        if plan.remove_ids or plan.problems:
            problems = [FileRecord(f.path, f.size, f.mtime_ns, skip_reason=f.problem) for f in plan.problems]
            _commit(store, report, problems, plan.remove_ids)
        report.removed = len(plan.remove_ids)
        if plan.to_embed:
            if model is None:
                from clipengine.models import load_model

                model = load_model(store.manifest["model"], device=device)
            _embed_and_commit(store, model, plan.to_embed, report, batch_size=batch_size, workers=workers,
                              commit_every=commit_every, max_pixels=max_pixels, draft=draft, progress=progress)
            store.drop_unused_vectors()
        if not plan.is_noop or not store.faiss_current():
            store.save_faiss()
        store.record_folder(root_str)
        report.count = store.counts()["count"]
    report.seconds = time.perf_counter() - started
    return report


def _commit(store: IndexStore, report: IndexReport, records: list[FileRecord], remove_ids=()) -> None:
    """Commit, then report the skips that are now on disk."""
    store.commit(records, remove_ids)
    for r in records:
        if r.skip_reason:
            report.skipped += 1
            report.skips.append({"path": r.path, "reason": r.skip_reason})


def _embed_and_commit(store: IndexStore, model, files: list[FoundFile], report: IndexReport, *,
                      batch_size: int | None, workers: int | None, commit_every: int, max_pixels: int, draft: bool,
                      progress: ProgressCallback | None) -> None:
    from clipengine.embed import embed_images

    by_path = {f.path: f for f in files}
    pending: list[FileRecord] = []
    done = 0
    if progress:
        progress(0, len(files))
    outcomes = embed_images(model, [f.path for f in files], batch_size=batch_size, workers=workers,
                            known_hashes=store.known_hashes(), max_pixels=max_pixels, draft=draft)
    for batch in outcomes:
        for e in batch:
            f = by_path[e.path]
            pending.append(FileRecord(f.path, f.size, f.mtime_ns, e.hash, e.width, e.height, e.vector,
                                      e.skip_reason))
            report.embedded += e.vector is not None
            report.reused += e.reused
        done += len(batch)
        if len(pending) >= commit_every:
            _commit(store, report, pending)
            pending = []
        if progress:
            progress(done, len(files))
    _commit(store, report, pending)


@dataclass
class IndexInfo:
    path: str
    model: dict
    count: int
    skipped: list[dict]
    unique_vectors: int
    dim: int
    metric: str
    faiss: dict
    folders: list[str]
    created_at: str
    size_bytes: int
    faiss_current: bool

    def to_dict(self) -> dict:
        return asdict(self)


def index_info(index_path: str | os.PathLike) -> IndexInfo:
    """What an index holds: its model, how many files are searchable, and what was skipped and why."""
    path = Path(index_path)
    with IndexStore.open(path) as store:
        counts = store.counts()
        return IndexInfo(
            path=str(path),
            model=store.manifest["model"],
            count=counts["count"],
            skipped=[{"path": p, "reason": r} for p, r in store.skipped()],
            unique_vectors=counts["unique_vectors"],
            dim=store.dim,
            metric=store.manifest["metric"],
            faiss=store.manifest["faiss"],
            folders=[p for p, _ in store.folders()],
            created_at=store.manifest["created_at"],
            size_bytes=sum(p.stat().st_size for p in path.iterdir() if p.is_file()),
            faiss_current=store.faiss_current(),
        )
