"""Build or update an index from a folder: scan -> plan -> embed -> sink -> finish.

One pipeline for one process and for a torchrun job, cut the way clip-retrieval cuts its inference
(reader -> mapper -> writer): the plan says which files to embed, `embed_records` turns them into
records in groups, and a sink takes each group. In one process the sink commits it to the store; under
torchrun each rank's sink writes it to a part file, and rank 0 commits the parts. Either way `finish`
closes the run: unused vectors dropped, the search structure synced, the query encoders exported.

Incremental and resumable by construction: the plan compares the folder with what the index holds,
so only new and changed files are embedded, deleted ones are dropped, and moved ones are recognised
by content hash and reuse their vectors without being decoded. Progress is committed every
`commit_every` files, so an interrupted run (Ctrl-C, kill -9, power loss) loses at most the batch in
flight and the next run carries on from there. A run over an unchanged folder never imports torch.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from clipengine.decode import check_decode_choice
from clipengine.errors import BadInput, ClipEngineError
from clipengine.formats import DEFAULT_SAMPLING, VideoSampling
from clipengine.images import DEFAULT_MAX_PIXELS
from clipengine.index import sharded
from clipengine.index.faiss_view import FaissPolicy, FaissState, SearchStructure, TextQueries
from clipengine.index.info import encoders_advice
from clipengine.index.query_encoders import check_runtime
from clipengine.index.scan import FoundFile, Plan, found_file, plan_update, scan_folder
from clipengine.index.store import ENCODERS_PENDING, FileRecord, IndexStore, Recorded, remove_index
from clipengine.index.text_queries import for_store as text_queries_of
from clipengine.models import (
    LoadedModel,
    ModelSpec,
    check_same_model,
    describe_source,
    require_same_source,
    resolve_source,
)
from clipengine.progress import FileProgress, StageProgress

if TYPE_CHECKING:
    from clipengine.decode import ImageEmbedding


@dataclass(frozen=True)
class IndexOptions:
    """How a run embeds and what it does around that; every field is also an option of `clipengine index`."""

    device: str | None = None
    batch_size: int | None = None  # images per model call (default: by device)
    workers: int | None = None  # decoding processes (default: by device and cores)
    commit_every: int = 256  # files per commit (or per part file under torchrun)
    max_pixels: int = DEFAULT_MAX_PIXELS
    exact_decode: bool = False  # decode JPEGs at full size instead of the reduced size preprocessing needs
    include_hidden: bool = False
    retry_skipped: bool = False
    rebuild: bool = False  # delete the index and build it again
    faiss_policy: FaissPolicy = FaissPolicy()
    export: bool | None = None  # export the query encoders (None: for a new index)
    quantize: str | None = None  # "int8": also export int8 query encoders
    runtime: str | None = None  # what embeds the images (`embedding_runtime`)
    precision: str | None = None
    video: VideoSampling | None = DEFAULT_SAMPLING  # how videos become frames; None: videos are not indexed
    new_device: bool = False  # a folder on another device than at its last scan has really moved: scan it
    decode: str = "auto"  # where JPEGs are decoded: auto, gpu (nvJPEG), cpu (clipengine.device_decode)

    def __post_init__(self) -> None:
        if self.commit_every < 1 or (self.batch_size is not None and self.batch_size < 1):
            raise BadInput("--commit-every and --batch-size must be at least 1")
        check_runtime(self.runtime, self.precision)
        check_decode_choice(self.decode)


@dataclass
class IndexReport:
    index: str
    folder: str
    model: str
    embedded: int = 0  # decoded and run through the model
    formats: dict[str, int] = field(default_factory=dict)  # of those, how many of each format ("HEIC", "MP4"), most first
    videos: int = 0  # of those, videos, and the frames that stand for them
    frames: int = 0
    reused: int = 0  # recognised by content hash (moved, renamed or duplicated files)
    skipped: int = 0  # new skips in this run
    removed: int = 0  # rows dropped: files deleted, or the old rows of changed files
    unchanged: int = 0
    changed: int = 0
    count: int = 0  # searchable files in the index after the run
    seconds: float = 0.0
    skips: list[dict] = field(default_factory=list)  # {path, reason} of this run's skips
    not_indexed: dict[str, int] = field(default_factory=dict)  # what the walk passed over, by kind (scan.kind_of)
    metadata_read: int = 0  # files indexed before metadata was, whose headers this run read
    places_named: int = 0  # contents whose GPS position this run named (clipengine.places)
    faiss: FaissState | None = None  # the search structure after the run
    runtime: str = ""  # what embedded the images, and why (embedding_runtime); empty when nothing was embedded
    query_encoders: dict | None = None  # the exported towers' record, as `info` shows it (None: never exported)
    advice: list[str] = field(default_factory=list)  # what the user can do to make the index better to use
    offline: list[dict] = field(default_factory=list)  # {folder, reason, files} of folders this run found away

    @property
    def images_per_second(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "images_per_second": round(self.images_per_second, 2)}


def index_folder(
    folder: str | os.PathLike,
    index_path: str | os.PathLike,
    spec: ModelSpec = ModelSpec(),
    options: IndexOptions | None = None,
    *,
    model=None,
    progress: FileProgress | None = None,
    build_progress: StageProgress | None = None,
    **settings,
) -> IndexReport | None:
    """Bring the index at `index_path` up to date with the images under `folder`.

    `spec` names the model for a new index; for an existing one it may be left empty (the index's own
    model is used) and anything else named is refused unless it is the same model. `model`, an already
    loaded `LoadedModel`, saves loading it again when indexing several folders. `options` (or the same
    fields as keywords, laid over it) say how to embed; a `faiss_policy` that differs from the index's
    retrains its search structure (`SearchStructure.save`).

    Under torchrun every process calls this; each embeds its share of the files, and rank 0 merges them
    and returns the report (the others return None).
    """
    options = dataclasses.replace(options or IndexOptions(), **settings)
    started = time.perf_counter()
    root = os.path.abspath(os.path.expanduser(os.fspath(folder)))
    index_path = Path(index_path)
    if not os.path.isdir(root) and not is_indexed_folder(index_path, root):
        ensure_folder(folder)  # a folder the index never had: the one-line error
    if sharded.in_torchrun():
        report = _index_sharded(root, index_path, spec, options, progress, build_progress)
    else:
        report = _index_here(root, index_path, spec, options, model, progress, build_progress)
    if report is not None:
        report.seconds = time.perf_counter() - started
    return report


def _index_here(root: str, index_path: Path, spec: ModelSpec, options: IndexOptions, model,
                progress: FileProgress | None, build_progress: StageProgress | None) -> IndexReport:
    """One process: the sink commits each group to the store."""
    store, model, policy_changed = open_for_update(index_path, spec, model, options)
    with store:
        report = IndexReport(index=str(index_path), folder=root, model=describe_source(store.manifest["model"]))
        commit = StoreSink(store, report)
        plan = plan_and_drop(store, root, report, commit, options)
        if plan.to_embed:
            embedder, report.runtime = embedding_runtime(store, model, options, len(plan.to_embed))
            for records in embed_records(embedder, plan.to_embed, store.known_hashes(), options, progress):
                commit(records)
            if isinstance(embedder, LoadedModel):
                model = embedder  # loaded for this run: finish needs no second one
        finish(store, report, root, model, options, changed=not plan.is_noop, policy_changed=policy_changed,
               progress=build_progress)
    return report


def _index_sharded(root: str, index_path: Path, spec: ModelSpec, options: IndexOptions,
                   progress: FileProgress | None, build_progress: StageProgress | None) -> IndexReport | None:
    """A process of a torchrun job (see `clipengine.index.sharded`): rank 0 plans, every rank embeds its
    share into part files, rank 0 commits the parts and finishes."""
    if options.rebuild:
        raise BadInput("--rebuild is not available under torchrun: delete the index first")
    if options.runtime == "onnx" or options.precision == "int8":
        raise BadInput("under torchrun images are embedded with torch: drop --runtime onnx / --precision int8")
    rank, world = sharded.join_job()
    try:
        store: IndexStore | None = None
        report: IndexReport | None = None
        job: dict = {}
        if rank == 0:
            try:
                store, _, policy_changed = open_for_update(index_path, spec, None, options)
                report = IndexReport(index=str(index_path), folder=root, model=describe_source(store.manifest["model"]))
                try:
                    commit = StoreSink(store, report)
                    sharded.merge_parts(index_path, store.known_hashes(), commit)  # an interrupted run's work
                    plan = plan_and_drop(store, root, report, commit, options)
                except BaseException:
                    store.close()
                    raise
                job = {"files": [(f.path, f.size, f.mtime_ns) for f in plan.to_embed],
                       "source": store.manifest["model"], "known_hashes": sorted(store.known_hashes()),
                       "policy_changed": policy_changed}
            except ClipEngineError as e:
                sharded.broadcast({"error": str(e)})
                raise
        job = sharded.broadcast(job)
        if job.get("error"):
            raise BadInput(f"rank 0 stopped: {job['error']}")
        error = None
        try:
            share = [FoundFile(*f) for f in job["files"][rank::world]]
            if share:
                model, workers = sharded.rank_model(job["source"], options.device, options.workers)
                write_part = sharded.PartWriter(index_path, rank, model.embed_dim)
                records = embed_records(model, share, set(job["known_hashes"]), dataclasses.replace(options, workers=workers),
                                        progress if rank == 0 else None)
                for group in records:
                    write_part(group)
        except Exception as e:  # reported to rank 0, which merges what every rank did write
            error = f"rank {rank}: {e}"
        errors = sharded.gather(error)
        if rank == 0:
            assert store is not None and report is not None  # rank 0 planned the job
            with store:
                sharded.merge_parts(index_path, store.known_hashes(), StoreSink(store, report))
                finish(store, report, root, None, options, changed=True, policy_changed=job["policy_changed"],
                       progress=build_progress)
        sharded.barrier()  # the job ends when the index is ready, on every rank
        failed = [e for e in errors if e is not None]
        if failed:
            raise BadInput("; ".join(failed) + " (what was embedded is kept: run the same command again)")
        return report
    finally:
        sharded.leave_job()


# --------------------------------------------------------------------------------------------------
# The stages
# --------------------------------------------------------------------------------------------------


def is_indexed_folder(index_path: Path, root: str) -> bool:
    """Whether `root` is a folder the index at `index_path` was built from (its drive may be away)."""
    if not IndexStore.exists(index_path):
        return False
    with IndexStore.open(index_path) as store:
        return store.is_folder(root)


def offline_reason(store: IndexStore, root: str, new_device: bool = False) -> str | None:
    """Why the indexed folder `root` counts as away, its files kept rather than removed, or None when it is
    there to scan: it is missing; it is empty though files were indexed from it; or it is on another device
    than at its last scan (a mount point with its drive unplugged), unless `new_device` says the library
    moved. A folder the index never had is never away: there is nothing to lose."""
    if not store.is_folder(root):
        return None
    try:
        st = os.stat(root)
        with os.scandir(root) as entries:
            empty = not any(not e.name.startswith(".") for e in entries)
    except FileNotFoundError:
        return "the folder is missing"
    except NotADirectoryError:
        return "it is no longer a folder"
    except OSError as e:
        return f"the folder cannot be read ({e.strerror or e})"
    device = store.folder_device(root)
    if device is not None and st.st_dev != device and not new_device:
        return "it is on another device than at its last scan (a drive not mounted?)"
    if empty and store.has_files_under(root):
        return "the folder is empty"
    return None


def ensure_folder(folder: str | os.PathLike) -> Path:
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise BadInput(f"{folder} is not a folder" if root.exists() else f"folder not found: {folder}")
    return root


def open_for_update(index_path: Path, spec: ModelSpec, model, options: IndexOptions):
    """Open the index for writing, creating it (which needs the model, for its dimension) if absent.

    Returns (store, loaded model or None, whether the faiss policy changed): the model is loaded only when
    it had to be.
    """
    if options.rebuild:
        remove_index(index_path)
    policy = options.faiss_policy
    if IndexStore.exists(index_path):
        store = IndexStore.open(index_path, writable=True)
        try:
            check_same_model(store.manifest["model"], spec, f"index {index_path}")
            if model is not None:
                require_same_source(store.manifest["model"], model.source, f"index {index_path}")
            return store, model, SearchStructure(store).set_policy(policy)  # checked before any work
        except BaseException:
            store.close()
            raise
    if index_path.exists() and any(index_path.iterdir()):
        raise BadInput(f"{index_path} exists and is not a clipengine index: choose another --index")
    if index_path.exists():
        index_path.rmdir()
    load_s = None
    if model is None:
        model, load_s = load_model_timed(resolve_source(spec), options.device)
    else:
        check_same_model(model.source, spec, "the model passed in")
    store = IndexStore.create(index_path, model.source, policy.section(model.source["embed_dim"]))
    if load_s is not None:
        store.write_meta(**{TORCH_START_KEY: f"{load_s:.3f}"})
    return store, model, False


TORCH_START_KEY = "torch_start_s"  # what importing torch and loading the model cost a fresh run here, last measured


def load_model_timed(source: dict, device: str | None) -> tuple[LoadedModel, float | None]:
    """The model, and the seconds that importing torch and loading it took, when this process had not imported
    torch yet: what a fresh `index` run pays to embed with torch (None: torch was already there)."""
    from clipengine.models import load_model

    fresh = "torch" not in sys.modules
    started = time.perf_counter()
    model = load_model(source, device=device)
    return model, (time.perf_counter() - started if fresh else None)


class StoreSink:
    """The one-process sink: commit each group of records, then count what is now on disk in the report
    (embedded, reused by content hash, or skipped and why)."""

    def __init__(self, store: IndexStore, report: IndexReport):
        self.store = store
        self.report = report

    def __call__(self, records: Sequence[FileRecord], remove_ids: Sequence[int] = ()) -> None:
        self.store.commit(records, remove_ids)
        for r in records:
            if r.skip_reason:
                self.report.skipped += 1
                self.report.skips.append({"path": r.path, "reason": r.skip_reason})
            elif r.vector is None:
                self.report.reused += 1
            else:
                self.report.embedded += 1
                kind = os.path.splitext(r.path)[1].lstrip(".").upper() or "no extension"
                self.report.formats[kind] = self.report.formats.get(kind, 0) + 1
                if r.frame_vectors is not None:
                    self.report.videos += 1
                    self.report.frames += len(r.frames)
        self.report.formats = dict(sorted(self.report.formats.items(), key=lambda item: (-item[1], item[0])))


def plan_and_drop(store: IndexStore, root: str, report: IndexReport, commit: StoreSink, options: IndexOptions) -> Plan:
    """Compare the folder with the index, commit what needs no model (files gone, unreadable entries),
    and return the plan of what is left to embed. A folder that is away (`offline_reason`), or an indexed
    folder inside it that is, has its files marked offline instead: nothing of it is removed."""
    recorded = store.recorded_under(root)
    for folder in [path for path, _ in store.folders() if path == root or path.startswith(root.rstrip(os.sep) + os.sep)]:
        reason = offline_reason(store, folder, options.new_device and folder == root)
        if reason is None:
            continue
        store.mark_offline(folder, reason)
        inside = folder.rstrip(os.sep) + os.sep
        kept = [path for path in recorded if path.startswith(inside)]
        report.offline.append({"folder": folder, "reason": reason, "files": len(kept)})
        for path in kept:
            del recorded[path]
        if folder == root:
            return Plan()
    passed_over: Counter[str] = Counter()
    plan = plan_update(scan_folder(root, include_hidden=options.include_hidden, videos=options.video is not None,
                                   passed_over=passed_over),
                       recorded, retry_skipped=options.retry_skipped)
    report.not_indexed = dict(sorted(passed_over.items(), key=lambda item: (-item[1], item[0])))
    return _drop(plan, report, commit)


def _drop(plan: Plan, report: IndexReport, commit: StoreSink) -> Plan:
    """Count the plan into the report and commit what needs no model: removals and unreadable entries."""
    report.unchanged, report.changed, report.removed = plan.unchanged, plan.changed, len(plan.remove_ids)
    if plan.remove_ids or plan.problems:
        commit([FileRecord(f.path, f.size, f.mtime_ns, skip_reason=f.problem) for f in plan.problems], plan.remove_ids)
    return plan


def index_changes(index_path: str | os.PathLike, root: str, paths: Collection[str], options: IndexOptions,
                  embedder: object = None) -> tuple[IndexReport, object]:
    """Bring the index up to date with `paths` under its folder `root`, without walking the rest of it: the
    files and folders a watcher saw change (`clipengine.index.watch`). New and changed files are embedded,
    moved ones reused by content hash, removed ones dropped, through the same sink, commits and `finish` as a
    whole run; a folder that is away keeps its files (`offline_reason`). `embedder` (what a previous call
    returned) saves loading the model again. Returns the report and the embedder."""
    started = time.perf_counter()
    with IndexStore.open(Path(index_path), writable=True) as store:
        report = IndexReport(index=str(index_path), folder=root, model=describe_source(store.manifest["model"]))
        commit = StoreSink(store, report)
        reason = offline_reason(store, root, options.new_device)
        if reason is not None:
            store.mark_offline(root, reason)
            report.offline.append({"folder": root, "reason": reason, "files": len(store.recorded_under(root))})
            return report, embedder
        found, recorded = _changed_files(store, root, paths, options)
        plan = _drop(plan_update(iter(found), recorded), report, commit)
        if plan.to_embed:
            if embedder is None:
                embedder, _ = embedding_runtime(store, None, options, len(plan.to_embed))
            report.runtime = "torch" if isinstance(embedder, LoadedModel) else "onnx"
            for records in embed_records(embedder, plan.to_embed, store.known_hashes(), options, None):
                commit(records)
        finish(store, report, root, embedder if isinstance(embedder, LoadedModel) else None, options,
               changed=not plan.is_noop, policy_changed=False, progress=None, whole_folder=False)
    report.seconds = time.perf_counter() - started
    return report, embedder


def _changed_files(store: IndexStore, root: str, paths: Collection[str], options: IndexOptions
                   ) -> tuple[list[FoundFile], dict[str, Recorded]]:
    """What `paths` under `root` hold now (a folder: everything in it), and what the index recorded there."""
    found: dict[str, FoundFile] = {}
    recorded: dict[str, Recorded] = {}
    inside = root.rstrip(os.sep) + os.sep
    videos = options.video is not None
    kept = [path for path in sorted(set(paths)) if path.startswith(inside) and (options.include_hidden or not any(
        part.startswith(".") for part in os.path.relpath(path, root).split(os.sep)))]  # what a walk would see
    for path in kept:
        if os.path.isdir(path):
            found.update((f.path, f) for f in scan_folder(path, include_hidden=options.include_hidden, videos=videos))
            recorded.update(store.recorded_under(path))  # a folder made (or made again)
        elif (f := found_file(path, videos=videos)) is not None:
            found[f.path] = f
        else:  # gone, or not a file to index any more: perhaps a folder was, with everything in it
            recorded.update(store.recorded_under(path))
    recorded.update(store.recorded_at(kept))
    return list(found.values()), recorded


def embed_records(embedder, files: list[FoundFile], known_hashes: Collection[str], options: IndexOptions,
                  progress: FileProgress | None) -> Iterator[list[FileRecord]]:
    """Embed files into records ready for a sink, yielded in groups of at least `commit_every` (the last one
    smaller): each group is what one commit, or one part file, holds. `embedder` is a `LoadedModel` (torch)
    or an index's `QueryEncoders` (its ONNX image tower, no torch)."""
    from clipengine.index.query_encoders import QueryEncoders

    embed: Callable[..., Iterator[list[ImageEmbedding]]]
    where: dict[str, str] = {}
    if isinstance(embedder, QueryEncoders):
        from clipengine.index.onnx_embed import embed_files as embed

        if options.decode == "gpu":
            raise BadInput("--decode gpu decodes JPEGs on a CUDA device: it needs --runtime torch and a GPU")
    else:
        from clipengine.embed import embed_images as embed

        where = {"decode": options.decode}
    by_path = {f.path: f for f in files}
    pending: list[FileRecord] = []
    done = 0
    if progress:
        progress(0, len(files))
    outcomes = embed(embedder, [f.path for f in files], batch_size=options.batch_size, workers=options.workers,
                     known_hashes=known_hashes, max_pixels=options.max_pixels, exact_decode=options.exact_decode,
                     video=options.video or DEFAULT_SAMPLING, **where)
    for batch in outcomes:
        for e in batch:
            f = by_path[e.path]
            pending.append(FileRecord(f.path, f.size, f.mtime_ns, e.hash, e.width, e.height, e.vector, e.skip_reason,
                                      e.frames, e.frame_vectors, e.metadata, e.duration))
        done += len(batch)
        if len(pending) >= options.commit_every:
            yield pending
            pending = []
        if progress:
            progress(done, len(files))
    if pending:
        yield pending


def finish(store: IndexStore, report: IndexReport, root: str, model, options: IndexOptions, *, changed: bool,
           policy_changed: bool, progress: StageProgress | None, whole_folder: bool = True) -> None:
    """The last step of every indexing run, one process or many: drop vectors no file uses any more, bring
    the search structure up to date, export the query encoders if asked (None: if the index is new and has
    not had its export yet, even when its first run was interrupted), and fill in the report."""
    away = any(o["folder"] == root for o in report.offline)
    if changed and whole_folder:  # a watcher's: kept until the next scan, for a file whose move it sees in two halves
        store.drop_unused_vectors()
    if not away:
        report.metadata_read = read_missing_metadata(store, root, progress)
    report.places_named = name_missing_places(store, progress)
    structure = SearchStructure(store)
    if changed or policy_changed or not structure.current:
        structure.save(rebuild=policy_changed, progress=progress, text_queries=text_queries_of(store, model))
    if not away and whole_folder:  # a watcher's update saw part of the folder: the last walk's counts stand
        store.record_folder(root, report.not_indexed, os.stat(root).st_dev)
    if options.export or (options.export is None and store.query_encoders == ENCODERS_PENDING):
        from clipengine.index.export import export_query_encoders
        from clipengine.models import load_model

        export_query_encoders(model or load_model(store.manifest["model"], device="cpu"), store,
                              quantize=options.quantize, progress=progress)
    report.count = store.counts()["count"]
    report.faiss = structure.state
    report.query_encoders = store.query_encoders
    report.advice = encoders_advice(store)


def forget_folder(index_path: str | os.PathLike, folder: str | os.PathLike,
                  progress: StageProgress | None = None) -> int:
    """Remove a folder and every file under it from the index, on purpose: a drive that will not come back, or
    a library moved for good (`clipengine forget`). Their vectors go unless other files share them, and the
    search structure is brought up to date. Returns the files removed; a folder the index has no file of is
    a one-line error."""
    root = os.path.abspath(os.path.expanduser(os.fspath(folder)))
    with IndexStore.open(Path(index_path), writable=True) as store:
        if not (store.is_folder(root) or store.recorded_under(root)):
            raise BadInput(f"the index has no folder or file under {root}: `clipengine info` lists its folders")
        removed = store.forget(root)
        store.drop_unused_vectors()
        SearchStructure(store).save(progress=progress, text_queries=text_queries_of(store))
    return removed


def reindex(index_path: str | os.PathLike, faiss_policy: FaissPolicy = FaissPolicy(),
            progress: StageProgress | None = None, text_queries: TextQueries | None = None) -> FaissState:
    """Retrain and re-tune an index's search structure from its stored vectors (no image is read again),
    under a new policy if one is given: after drift, growth, many deletions, or to trade memory for recall.
    The text queries it is tuned on come from the index's own text tower unless `text_queries` gives them."""
    with IndexStore.open(Path(index_path), writable=True) as store:
        structure = SearchStructure(store)
        structure.set_policy(faiss_policy)
        structure.save(rebuild=True, progress=progress, text_queries=text_queries or text_queries_of(store))
        return structure.state


def read_missing_metadata(store: IndexStore, root: str, progress: StageProgress | None = None,
                          commit_every: int = 256) -> int:
    """Read, from their headers alone, the metadata of files under `root` indexed before metadata was read
    (or merged from a torchrun job's parts): nothing is decoded or embedded again, and each group is one
    commit, so an interrupted run keeps what it read. Returns how many contents were read."""
    missing = store.without_metadata(root)
    if not missing:
        return 0
    from clipengine.video import metadata_of

    for start in range(0, len(missing), commit_every):
        if progress:
            progress("reading metadata", start, len(missing))
        store.add_metadata([(digest, path, *metadata_of(path)) for path, digest in missing[start:start + commit_every]])
    if progress:
        progress("reading metadata", len(missing), len(missing))
    return len(missing)


def name_missing_places(store: IndexStore, progress: StageProgress | None = None, commit_every: int = 4096) -> int:
    """Name the places of the files with a GPS position not named yet: those this run found, and all of an
    index made before places were (its migration). Offline, in commits of `commit_every`, so an interrupted
    run keeps what it named. Returns how many contents were named."""
    missing = store.unnamed_positions()
    if not missing:
        return 0
    from clipengine.places import name_places

    for start in range(0, len(missing), commit_every):
        if progress:
            progress("naming places", start, len(missing))
        part = missing[start:start + commit_every]
        store.add_places(list(zip((digest for digest, _, _ in part),
                                  name_places([(lat, lon) for _, lat, lon in part]), strict=True)))
    if progress:
        progress("naming places", len(missing), len(missing))
    return len(missing)


def embedding_runtime(store: IndexStore, model, options: IndexOptions, files: int = 0) -> tuple[object, str]:
    """What embeds the `files` images, and a few words saying which runtime and why: a `LoadedModel` (torch),
    or the index's verified ONNX image tower (`QueryEncoders`, `options.precision` fp32 or int8), which needs
    no torch at all, so that adding a few photos does not pay for importing it.

    `options.runtime` None chooses by measurement. On a CPU: whichever of torch and onnxruntime embeds these
    files sooner on this machine, from the export's speed per image (`info` shows the numbers) and what
    loading torch cost the last fresh run that did (ViT-B-32 on 2 cores: torch 55 ms/image against 70, but
    about 8 s to import and load, so onnx for a day's photos and torch for a first index of thousands). On a
    GPU, torch, which keeps the hot path there. The model is loaded (`model` None) only when torch is what
    runs, or when only torch can tell whether there is a GPU.
    """
    from clipengine.index.query_encoders import EncodersUnavailable, QueryEncoders

    runtime, precision = options.runtime, options.precision
    check_runtime(runtime, precision)
    image = (store.query_encoders or {}).get("image") or {}
    speed = (image.get("speed") or {}).get("ms_per_image", {})
    reason = "asked for"

    def torch_model():
        if model is not None:
            return model
        loaded, load_s = load_model_timed(store.manifest["model"], options.device)
        if load_s is not None and store.writable:
            store.write_meta(**{TORCH_START_KEY: f"{load_s:.3f}"})
        return loaded

    if runtime is None and precision is None:
        device = model.device.type if model is not None else device_without_torch(options.device)
        if device != "cpu":
            model = torch_model()
            if model.device.type != "cpu":
                return model, "torch (on a GPU)"
        if "onnx" not in speed:
            return torch_model(), "torch (no exported image tower)"
        start_s = 0.0 if model is not None else float(store.read_meta(TORCH_START_KEY) or 0)
        onnx_s, torch_s = files * speed["onnx"] / 1e3, files * speed["torch"] / 1e3 + start_s
        reason = f"measured {speed['onnx']:.3g} ms/image, torch {speed['torch']:.3g}" + (
            f" and {start_s:.1f} s to load: {onnx_s:.1f} s against {torch_s:.1f} s for {files:,} files" if start_s else "")
        runtime = "onnx" if onnx_s < torch_s or (files == 0 and speed["onnx"] < speed["torch"]) else "torch"
    if runtime == "torch":
        return torch_model(), f"torch ({reason})"
    try:
        encoders = QueryEncoders.open(store.path, store.query_encoders, precision=precision or "fp32",
                                      one_shot=files <= ONE_SHOT_FILES)
        if not encoders.available("image"):
            raise EncodersUnavailable(f"its image tower did not pass the export check ({image.get('reason')})")
        encoders.file_for("image")
    except EncodersUnavailable as e:
        raise BadInput(f"cannot embed with onnxruntime: {e}: `clipengine export --index {store.path}`") from None
    return encoders, f"onnx {precision or 'fp32'} ({reason})"


# Up to this many files, the image tower's session skips weight pre-packing: ViT-B-32's is created in 0.04 s
# instead of 0.35-0.6 s, and runs 5-10% slower (0.74 s for 10 images against 0.70), so it pays off below
# about a hundred images; 256 leaves room for faster towers.
ONE_SHOT_FILES = 256


def device_without_torch(device: str | None) -> str | None:
    """The device type a model would run on, where it can be told without importing torch: the one asked
    for, or "cpu" when this machine shows no GPU (no NVIDIA or AMD device node, not a Mac); None: ask torch."""
    if device:
        return device.split(":")[0]
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return "cpu"
    if sys.platform == "darwin" or any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd")):
        return None
    return "cpu"
