"""One folder embedded by many processes and machines under torchrun, merged into one index.

    torchrun --nnodes 4 --nproc-per-node 8 -m clipengine index /shared/images --index /shared/indexes/big

Rank 0 holds the index's write lock throughout. It first merges shards left by an interrupted run
(that is how a sharded run resumes), plans the update exactly as a single process would, and sends
every rank the list of files to embed, the model and the hashes already stored. Each rank embeds every
world_size-th file (striding balances folders sorted by camera or date) and writes its outcomes as
part files under <index>/shards/rank-NNNNN/, each written to a temporary name and renamed, every
`commit_every` files. When all ranks are done, rank 0 commits the parts into meta.sqlite, which assigns
the ids, and builds one faiss index from it (trained and tuned as any build). Because the merge goes
through the same commit as a single-process run, the merged index holds the same files with the same
vectors as a single-process one.

The index directory must be on a filesystem every node sees (the shards are written there); only
rank 0 ever opens meta.sqlite. Coordination uses a gloo process group (CPU, whatever the model runs
on) with a day-long timeout, since ranks wait for each other's embedding.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import time
from pathlib import Path

import numpy as np

from clipengine.errors import BadInput, ClipEngineError
from clipengine.images import DEFAULT_MAX_PIXELS
from clipengine.index.pipeline import (
    FaissPolicy,
    IndexReport,
    _commit,
    _open_or_create,
    embed_records,
    ensure_folder,
    finish_index,
    plan_and_drop,
)
from clipengine.index.query_encoders import check_runtime
from clipengine.index.scan import FoundFile
from clipengine.index.store import FileRecord, IndexStore
from clipengine.models import ModelSpec, describe_source
from clipengine.progress import FileProgress, StageProgress

SHARDS_DIR = "shards"
TIMEOUT = dt.timedelta(days=1)


def in_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def index_folder_sharded(
    folder: str | os.PathLike,
    index_path: str | os.PathLike,
    spec: ModelSpec = ModelSpec(),
    *,
    device: str | None = None,
    batch_size: int | None = None,
    workers: int | None = None,
    commit_every: int = 256,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    exact_decode: bool = False,
    include_hidden: bool = False,
    retry_skipped: bool = False,
    faiss_policy: FaissPolicy = FaissPolicy(),
    export: bool | None = None,
    quantize: str | None = None,
    runtime: str | None = None,
    precision: str | None = None,
    progress: FileProgress | None = None,
    build_progress: StageProgress | None = None,
) -> IndexReport | None:
    """`index_folder` for a process of a torchrun job. Returns the report on rank 0, None on the others.
    Every rank embeds with torch (one GPU each, or its share of the node's cores)."""
    import torch.distributed as dist

    check_runtime(runtime, precision)
    if runtime == "onnx" or precision == "int8":
        raise BadInput("under torchrun images are embedded with torch: drop --runtime onnx / --precision int8")

    started = time.perf_counter()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=TIMEOUT)
    try:
        root = os.path.abspath(ensure_folder(folder))
        index_path = Path(index_path)
        store: IndexStore | None = None
        report: IndexReport | None = None
        job: dict = {}
        if rank == 0:
            try:
                store, report, job = _plan(root, index_path, spec, device, include_hidden, retry_skipped,
                                           faiss_policy, commit_every)
            except ClipEngineError as e:
                job = {"error": str(e)}
                _broadcast(job)
                raise
        job = _broadcast(job)
        if job.get("error"):
            raise BadInput(f"rank 0 stopped: {job['error']}")
        error = None
        try:
            _embed_share(job, rank, world, index_path, device=device, batch_size=batch_size, workers=workers,
                         commit_every=commit_every, max_pixels=max_pixels, exact_decode=exact_decode,
                         progress=progress if rank == 0 else None)
        except Exception as e:  # reported to rank 0, which merges what every rank did write
            error = f"rank {rank}: {e}"
        errors: list[str | None] = [None] * world
        dist.all_gather_object(errors, error)
        if rank == 0:
            assert store is not None and report is not None  # rank 0 planned the job
            with store:
                _merge_parts(store, index_path, report)
                store.drop_unused_vectors()
                store.save_faiss(rebuild=job["policy_changed"], progress=build_progress)
                store.record_folder(root)
                finish_index(store, report, None, export=export, quantize=quantize, progress=build_progress)
            report.seconds = time.perf_counter() - started
        dist.barrier()  # the job ends when the index is ready, on every rank
        failed = [e for e in errors if e is not None]
        if failed:
            raise BadInput("; ".join(failed) + " (what was embedded is kept: run the same command again)")
        return report
    finally:
        dist.destroy_process_group()


def _broadcast(obj: dict) -> dict:
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _plan(root: str, index_path: Path, spec: ModelSpec, device: str | None, include_hidden: bool,
          retry_skipped: bool, faiss_policy: FaissPolicy, commit_every: int) -> tuple[IndexStore, IndexReport, dict]:
    """Rank 0: open the index, merge any shards an interrupted run left, and plan the update."""
    if commit_every < 1:
        raise BadInput("--commit-every must be at least 1")
    store, _, policy_changed = _open_or_create(index_path, spec, None, device, False, faiss_policy)
    try:
        report = IndexReport(index=str(index_path), folder=root, model=describe_source(store.manifest["model"]))
        _merge_parts(store, index_path, report)  # an interrupted run's work, kept
        plan = plan_and_drop(store, root, report, include_hidden=include_hidden, retry_skipped=retry_skipped)
        files = [(f.path, f.size, f.mtime_ns) for f in plan.to_embed]
        job = {"files": files, "source": store.manifest["model"], "known_hashes": sorted(store.known_hashes()),
               "policy_changed": policy_changed}
        return store, report, job
    except BaseException:
        store.close()
        raise


def _embed_share(job: dict, rank: int, world: int, index_path: Path, *, device: str | None,
                 batch_size: int | None, workers: int | None, commit_every: int, max_pixels: int, exact_decode: bool,
                 progress: FileProgress | None) -> None:
    """Embed every world-th file starting at `rank`, writing part files as it goes."""
    share = [FoundFile(*f) for f in job["files"][rank::world]]
    if not share:
        return
    import torch

    from clipengine.models import load_model

    local_rank, local_world = int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if device in (None, "cuda") and torch.cuda.is_available():
        device = f"cuda:{local_rank % torch.cuda.device_count()}"
    model = load_model(job["source"], device=device)
    if model.device.type == "cpu":
        cores = max(1, len(os.sched_getaffinity(0)) // local_world)  # the node's cores, split between its ranks
        torch.set_num_threads(cores)
        workers = min(workers, cores) if workers is not None else min(cores - 1, 2)
    folder = index_path / SHARDS_DIR / f"rank-{rank:05d}"
    folder.mkdir(parents=True, exist_ok=True)
    groups = embed_records(model, share, set(job["known_hashes"]), batch_size=batch_size, workers=workers,
                           commit_every=commit_every, max_pixels=max_pixels, exact_decode=exact_decode, progress=progress)
    for records in groups:
        _write_part(folder, records, model.embed_dim)


def _write_part(folder: Path, records: list[FileRecord], dim: int) -> None:
    if not records:
        return
    vectors = np.zeros((len(records), dim), dtype=np.float32)
    for row, r in enumerate(records):
        if r.vector is not None:
            vectors[row] = r.vector
    name = f"part-{time.time_ns():020d}.npz"  # sorts in writing order, unique across restarts
    tmp = folder / f".{name}.tmp"
    with open(tmp, "wb") as f:
        np.savez(f, path=np.array([r.path for r in records]), size=np.array([r.size for r in records], np.int64),
                 mtime_ns=np.array([r.mtime_ns for r in records], np.int64),
                 hash=np.array([r.hash or "" for r in records]), width=np.array([r.width for r in records]),
                 height=np.array([r.height for r in records]), vector=vectors,
                 has_vector=np.array([r.vector is not None for r in records]),
                 skip=np.array([r.skip_reason or "" for r in records]))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / name)


def _read_part(path: Path, known: set[str]) -> list[FileRecord]:
    """A part's records; one that reuses a stored vector which has since gone is dropped (it will be planned again)."""
    with np.load(path, allow_pickle=False) as part:
        records = []
        for i in range(len(part["path"])):
            skip = str(part["skip"][i]) or None
            vector = part["vector"][i] if part["has_vector"][i] else None
            digest = str(part["hash"][i]) or None
            if skip is None and vector is None and digest not in known:
                continue
            records.append(FileRecord(str(part["path"][i]), int(part["size"][i]), int(part["mtime_ns"][i]), digest,
                                      int(part["width"][i]), int(part["height"][i]), vector, skip))
    return records


def _merge_parts(store: IndexStore, index_path: Path, report: IndexReport) -> None:
    """Commit every rank's part files into the database (rank order, then writing order), deleting each once
    committed. A part committed twice (a crash between commit and delete) only replaces its own rows."""
    shards = index_path / SHARDS_DIR
    if not shards.is_dir():
        return
    known = store.known_hashes()
    for part in sorted(shards.glob("rank-*/part-*.npz")):
        try:
            records = _read_part(part, known)
        except (OSError, ValueError, KeyError) as e:
            raise BadInput(f"shard file {part} is damaged ({e}): delete it and run again") from None
        _commit(store, report, records)
        known.update(r.hash for r in records if r.vector is not None and r.hash is not None)
        part.unlink()
    shutil.rmtree(shards, ignore_errors=True)
