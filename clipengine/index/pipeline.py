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
from collections.abc import Collection, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from clipengine.errors import BadInput
from clipengine.images import DEFAULT_MAX_PIXELS
from clipengine.index.ann import DRIFT_RATIO, n_lists
from clipengine.index.query_encoders import check_runtime
from clipengine.index.scan import FoundFile, Plan, plan_update, scan_folder
from clipengine.index.store import ENCODERS_PENDING, FileRecord, IndexStore, remove_index
from clipengine.models import ModelSpec, check_same_model, describe_source, require_same_source, resolve_source
from clipengine.progress import FileProgress, StageProgress


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
    faiss: dict = field(default_factory=dict)  # the search structure after the run (IndexStore.faiss_state)
    runtime: str = ""  # what embedded the images, and why (embedding_runtime); empty when nothing was embedded
    query_encoders: dict | None = None  # the exported towers' record, as `info` shows it (None: never exported)
    advice: list[str] = field(default_factory=list)  # what the user can do to make the index better to use

    @property
    def images_per_second(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "images_per_second": round(self.images_per_second, 2)}


@dataclass(frozen=True)
class FaissPolicy:
    """How the search structure is chosen; None leaves an existing index's setting as it is."""

    memory_budget: int | None = None  # bytes the faiss index may take (default: half the RAM)
    factory: str | None = None  # a faiss index_factory string, overriding the choice
    target_recall: float | None = None  # recall@10 vs exact that tuning must reach (default 0.95)

    def __post_init__(self) -> None:
        if self.target_recall is not None and not 0 < self.target_recall <= 1:
            raise BadInput("--target-recall must be in (0, 1], e.g. 0.95")
        if self.memory_budget is not None and self.memory_budget <= 0:
            raise BadInput("--memory-budget must be positive")

    def changes(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def _open_or_create(index_path: Path, spec: ModelSpec, model, device: str | None, rebuild: bool,
                    policy: FaissPolicy):
    """Open the index for writing, creating it (which needs the model, for its dimension) if absent.

    Returns (store, loaded model or None, whether the faiss policy changed): the model is loaded only when
    it had to be.
    """
    if rebuild:
        remove_index(index_path)
    if IndexStore.exists(index_path):
        store = IndexStore.open(index_path, writable=True)
        try:
            check_same_model(store.manifest["model"], spec, f"index {index_path}")
            if model is not None:
                require_same_source(store.manifest["model"], model.source, f"index {index_path}")
            return store, model, store.set_faiss_policy(**policy.changes())  # checked before any work
        except BaseException:
            store.close()
            raise
    if index_path.exists() and any(index_path.iterdir()):
        raise BadInput(f"{index_path} exists and is not a clipengine index: choose another --index")
    if index_path.exists():
        index_path.rmdir()
    if model is None:
        from clipengine.models import load_model

        model = load_model(resolve_source(spec), device=device)
    else:
        check_same_model(model.source, spec, "the model passed in")
    return IndexStore.create(index_path, model.source, policy.changes()), model, False


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
    exact_decode: bool = False,
    include_hidden: bool = False,
    retry_skipped: bool = False,
    rebuild: bool = False,
    faiss_policy: FaissPolicy = FaissPolicy(),
    export: bool | None = None,
    quantize: str | None = None,
    runtime: str | None = None,
    precision: str | None = None,
    progress: FileProgress | None = None,
    build_progress: StageProgress | None = None,
) -> IndexReport:
    """Bring the index at `index_path` up to date with the images under `folder`.

    `spec` names the model for a new index; for an existing one it may be left empty (the index's own
    model is used) and anything else named is refused unless it is the same model. `model`, an already
    loaded `LoadedModel`, saves loading it again when indexing several folders. A `faiss_policy` that
    differs from the index's retrains its search structure (see `IndexStore.save_faiss`). `export`: write
    the query encoders that let searches start without torch (`clipengine.index.export`); None does it for a new
    index, and advises it for an older one that has none; `quantize` "int8" adds int8 query encoders.
    `runtime`/`precision`: what embeds the images (see `embedding_runtime`).
    """
    started = time.perf_counter()
    root_str = os.path.abspath(ensure_folder(folder))
    if commit_every < 1 or (batch_size is not None and batch_size < 1):
        raise BadInput("--commit-every and --batch-size must be at least 1")
    check_runtime(runtime, precision)
    index_path = Path(index_path)
    store, model, policy_changed = _open_or_create(index_path, spec, model, device, rebuild, faiss_policy)
    with store:
        report = IndexReport(index=str(index_path), folder=root_str, model=describe_source(store.manifest["model"]))
        plan = plan_and_drop(store, root_str, report, include_hidden=include_hidden, retry_skipped=retry_skipped)
        if plan.to_embed:
            if model is None:
                from clipengine.models import load_model

                model = load_model(store.manifest["model"], device=device)
            embedder, report.runtime = embedding_runtime(store, model, runtime, precision)
            _embed_and_commit(store, embedder, plan.to_embed, report, batch_size=batch_size, workers=workers,
                              commit_every=commit_every, max_pixels=max_pixels, exact_decode=exact_decode, progress=progress)
            store.drop_unused_vectors()
        if policy_changed or not plan.is_noop or not store.faiss_current():
            store.save_faiss(rebuild=policy_changed, progress=build_progress)
        store.record_folder(root_str)
        finish_index(store, report, model, export=export, quantize=quantize, progress=build_progress)
    report.seconds = time.perf_counter() - started
    return report


def finish_index(store: IndexStore, report: IndexReport, model, *, export: bool | None, quantize: str | None = None,
                 progress: StageProgress | None) -> None:
    """The last step of every indexing run: export the query encoders if asked (None: if the index is new and
    has not had its export yet, even when its first run was interrupted), and report the result."""
    if export or (export is None and store.query_encoders == ENCODERS_PENDING):
        from clipengine.index.export import export_query_encoders
        from clipengine.models import load_model

        export_query_encoders(model or load_model(store.manifest["model"], device="cpu"), store, quantize=quantize,
                              progress=progress)
    report.count = store.counts()["count"]
    report.faiss = store.faiss_state()
    report.query_encoders = store.query_encoders
    report.advice = encoders_advice(store)


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


def embedding_runtime(store: IndexStore, model, runtime: str | None, precision: str | None) -> tuple[object, str]:
    """The model images are embedded with, and a few words saying which runtime and why.

    "torch", or "onnx" (the index's verified image tower, `precision` fp32 or int8). None chooses by
    measurement: on a CPU, whichever of torch and onnxruntime embedded the export's check images faster on
    this machine (`info` shows the numbers); on a GPU, torch, which keeps the hot path there.
    """
    import dataclasses

    from clipengine.index.query_encoders import EncodersUnavailable, QueryEncoders

    check_runtime(runtime, precision)
    image = (store.query_encoders or {}).get("image") or {}
    speed = (image.get("speed") or {}).get("ms_per_image", {})
    reason = "asked for"
    if runtime is None and precision is None:
        if model.device.type != "cpu":
            return model, "torch (on a GPU)"
        if "onnx" not in speed:
            return model, "torch (no exported image tower)"
        reason = f"measured {speed['onnx']:.3g} ms/image, torch {speed['torch']:.3g}"
        runtime = "onnx" if speed["onnx"] < speed["torch"] else "torch"
    if runtime == "torch":
        return model, f"torch ({reason})"
    try:
        encoders = QueryEncoders.open(store.path, store.query_encoders, precision=precision or "fp32")
        if not encoders.available("image"):
            raise EncodersUnavailable(f"its image tower did not pass the export check ({image.get('reason')})")
        encoders.file_for("image")
    except EncodersUnavailable as e:
        raise BadInput(f"cannot embed with onnxruntime: {e}: `clipengine export --index {store.path}`") from None
    return dataclasses.replace(model, onnx=encoders), f"onnx {precision or 'fp32'} ({reason})"


def ensure_folder(folder: str | os.PathLike) -> Path:
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise BadInput(f"{folder} is not a folder" if root.exists() else f"folder not found: {folder}")
    return root


def plan_and_drop(store: IndexStore, root: str, report: IndexReport, *, include_hidden: bool,
                  retry_skipped: bool) -> Plan:
    """Compare the folder with the index, commit what needs no model (files gone, unreadable entries),
    and return the plan of what is left to embed."""
    plan = plan_update(scan_folder(root, include_hidden=include_hidden), store.recorded_under(root),
                       retry_skipped=retry_skipped)
    report.unchanged, report.changed, report.removed = plan.unchanged, plan.changed, len(plan.remove_ids)
    if plan.remove_ids or plan.problems:
        problems = [FileRecord(f.path, f.size, f.mtime_ns, skip_reason=f.problem) for f in plan.problems]
        _commit(store, report, problems, plan.remove_ids)
    return plan


def _commit(store: IndexStore, report: IndexReport, records: list[FileRecord], remove_ids=()) -> None:
    """Commit, then count what is now on disk: embedded, reused by content hash, or skipped (and why)."""
    store.commit(records, remove_ids)
    for r in records:
        if r.skip_reason:
            report.skipped += 1
            report.skips.append({"path": r.path, "reason": r.skip_reason})
        elif r.vector is None:
            report.reused += 1
        else:
            report.embedded += 1


def _embed_and_commit(store: IndexStore, model, files: list[FoundFile], report: IndexReport, *,
                      batch_size: int | None, workers: int | None, commit_every: int, max_pixels: int, exact_decode: bool,
                      progress: FileProgress | None) -> None:
    groups = embed_records(model, files, store.known_hashes(), batch_size=batch_size, workers=workers,
                           commit_every=commit_every, max_pixels=max_pixels, exact_decode=exact_decode, progress=progress)
    for records in groups:
        _commit(store, report, records)


def embed_records(model, files: list[FoundFile], known_hashes: Collection[str], *, batch_size: int | None,
                  workers: int | None, commit_every: int, max_pixels: int, exact_decode: bool,
                  progress: FileProgress | None) -> Iterator[list[FileRecord]]:
    """Embed files into records ready to commit, yielded in groups of at least `commit_every` (the last one
    smaller): each group is what one commit, or one shard's part file, holds."""
    from clipengine.embed import embed_images

    by_path = {f.path: f for f in files}
    pending: list[FileRecord] = []
    done = 0
    if progress:
        progress(0, len(files))
    outcomes = embed_images(model, [f.path for f in files], batch_size=batch_size, workers=workers,
                            known_hashes=known_hashes, max_pixels=max_pixels, exact_decode=exact_decode)
    for batch in outcomes:
        for e in batch:
            f = by_path[e.path]
            pending.append(FileRecord(f.path, f.size, f.mtime_ns, e.hash, e.width, e.height, e.vector,
                                      e.skip_reason))
        done += len(batch)
        if len(pending) >= commit_every:
            yield pending
            pending = []
        if progress:
            progress(done, len(files))
    if pending:
        yield pending


@dataclass
class IndexInfo:
    path: str
    model: dict
    count: int
    skipped_files: list[dict]  # {path, reason} of each file that could not be used (IndexReport.skipped counts them)
    unique_vectors: int
    dim: int
    metric: str
    faiss: dict
    faiss_policy: dict
    folders: list[str]
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
        counts, state = store.counts(), store.faiss_state()
        return IndexInfo(
            path=str(path),
            model=store.manifest["model"],
            count=counts["count"],
            skipped_files=[{"path": p, "reason": r} for p, r in store.skipped()],
            unique_vectors=counts["unique_vectors"],
            dim=store.dim,
            metric=store.manifest["metric"],
            faiss=state,
            faiss_policy=store.faiss_policy,
            folders=[p for p, _ in store.folders()],
            created_at=store.manifest["created_at"],
            size_bytes=sum(p.stat().st_size for p in path.rglob("*") if p.is_file()),
            faiss_current=store.faiss_current(),
            query_encoders=store.query_encoders,
            advice=_advice(state, counts["count"], path, store.faiss_policy) + encoders_advice(store),
        )


def _advice(state: dict, count: int, path: Path, policy: dict) -> list[str]:
    """What the measurements say about the search structure: drifted, outgrown, or off its recall target."""
    fix = f"run `clipengine reindex --index {path}`"
    advice = []
    drift = state.get("drift", {})
    ratio = drift.get("error_ratio")
    if ratio and ratio > DRIFT_RATIO:
        advice.append(f"new vectors sit {ratio:.1f}x further from the trained lists than the training sample "
                      f"did (data has drifted): {fix} to retrain")
    lists = state.get("lists")
    if lists and not policy["factory"] and n_lists(count) >= 4 * lists:  # a named factory stays as named
        advice.append(f"{count:,} vectors have outgrown {lists} inverted lists (searches slow down): {fix}")
    stale = drift.get("stale_in_index", 0)
    if stale and stale > 0.2 * max(count, 1):
        advice.append(f"{stale:,} deleted vectors still take space in the index: {fix} to drop them")
    tuning = state.get("tuning") or {}
    if tuning and not tuning.get("reached", True):
        advice.append(f"measured recall@10 is {tuning['recall_at_10']:.3f}, under the target {tuning['target']}: "
                      f"{fix} with a larger --memory-budget or another --faiss")
    return advice


def reindex(index_path: str | os.PathLike, faiss_policy: FaissPolicy = FaissPolicy(),
            progress: StageProgress | None = None) -> IndexInfo:
    """Retrain and re-tune an index's search structure from its stored vectors (no image is read again),
    under a new policy if one is given: after drift, growth, many deletions, or to trade memory for recall."""
    path = Path(index_path)
    with IndexStore.open(path, writable=True) as store:
        store.set_faiss_policy(**faiss_policy.changes())
        store.save_faiss(rebuild=True, progress=progress)
    return index_info(path)
