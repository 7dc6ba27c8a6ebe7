"""The torchrun side of indexing: one folder embedded by many processes and machines, merged into one index.

    torchrun --nnodes 4 --nproc-per-node 8 -m clipengine index /shared/images --index /shared/indexes/big

Rank 0 holds the index's write lock throughout. It first merges shards left by an interrupted run
(that is how a sharded run resumes), plans the update exactly as a single process would, and sends
every rank the list of files to embed, the model and the hashes already stored. Each rank embeds every
world_size-th file (striding balances folders sorted by camera or date) and writes its outcomes as
part files under <index>/shards/rank-NNNNN/, each written to a temporary name and renamed, every
`commit_every` files. When all ranks are done, rank 0 commits the parts into meta.sqlite, which assigns
the ids, and builds one faiss index from it (trained and tuned as any build). Because the merge goes
through the same commit as a single-process run, the merged index holds the same files with the same
vectors as a single-process one. The run itself is `clipengine.index.pipeline`'s, with `PartWriter` as
each rank's sink; this module holds what only a distributed run needs: the process group, the rank's
model, and the part files.

The index directory must be on a filesystem every node sees (the shards are written there); only
rank 0 ever opens meta.sqlite. Coordination uses a gloo process group (CPU, whatever the model runs
on) with a day-long timeout, since ranks wait for each other's embedding.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from clipengine.durable import replacing
from clipengine.errors import BadInput
from clipengine.index.store import FileRecord

SHARDS_DIR = "shards"
TIMEOUT = dt.timedelta(days=1)


def in_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


# --------------------------------------------------------------------------------------------------
# The process group
# --------------------------------------------------------------------------------------------------


def join_job() -> tuple[int, int]:
    """Join the job's gloo process group; returns (rank, world size)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=TIMEOUT)
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def leave_job() -> None:
    import torch.distributed as dist

    dist.destroy_process_group()


def broadcast(obj: dict) -> dict:
    """Rank 0's `obj`, on every rank."""
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj: object) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    import torch.distributed as dist

    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


def rank_model(source: dict, device: str | None, workers: int | None):
    """This rank's model, on its own GPU, or on its share of the node's cores; and its decoding workers."""
    import torch

    from clipengine.models import load_model

    local_rank, local_world = int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if device in (None, "cuda") and torch.cuda.is_available():
        device = f"cuda:{local_rank % torch.cuda.device_count()}"
    model = load_model(source, device=device)
    if model.device.type == "cpu":
        cores = max(1, len(os.sched_getaffinity(0)) // local_world)  # the node's cores, split between its ranks
        torch.set_num_threads(cores)
        workers = min(workers, cores) if workers is not None else min(cores - 1, 2)
    return model, workers


# --------------------------------------------------------------------------------------------------
# Part files
# --------------------------------------------------------------------------------------------------


class PartWriter:
    """A rank's sink: each group of records becomes one part file under <index>/shards/rank-NNNNN/."""

    def __init__(self, index_path: Path, rank: int, dim: int):
        self.folder = index_path / SHARDS_DIR / f"rank-{rank:05d}"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.dim = dim

    def __call__(self, records: Sequence[FileRecord]) -> None:
        if not records:
            return
        vectors = np.zeros((len(records), self.dim), dtype=np.float32)
        for row, r in enumerate(records):
            if r.vector is not None:
                vectors[row] = r.vector
        videos = [r for r in records if r.frame_vectors is not None]  # a video's frames, all records' end to end
        frame_vectors = np.concatenate([r.frame_vectors for r in videos]) if videos else np.zeros((0, self.dim), np.float32)
        name = f"part-{time.time_ns():020d}.npz"  # sorts in writing order, unique across restarts
        with replacing(self.folder / name) as tmp, open(tmp, "wb") as f:
            np.savez(f, path=np.array([r.path for r in records]), size=np.array([r.size for r in records], np.int64),
                     mtime_ns=np.array([r.mtime_ns for r in records], np.int64),
                     hash=np.array([r.hash or "" for r in records]), width=np.array([r.width for r in records]),
                     height=np.array([r.height for r in records]), vector=vectors,
                     has_vector=np.array([r.vector is not None for r in records]),
                     skip=np.array([r.skip_reason or "" for r in records]),
                     frame_count=np.array([len(r.frames) if r.frame_vectors is not None else 0 for r in records]),
                     frame_seconds=np.array([t for r in videos for t in r.frames], np.float64),
                     frame_vectors=frame_vectors)


def _read_part(path: Path, known: set[str]) -> list[FileRecord]:
    """A part's records; one that reuses a stored vector which has since gone is dropped (it will be planned again)."""
    with np.load(path, allow_pickle=False) as part:
        records = []
        counts = part["frame_count"] if "frame_count" in part.files else np.zeros(len(part["path"]), np.int64)
        ends = np.cumsum(counts)
        for i in range(len(part["path"])):
            skip = str(part["skip"][i]) or None
            vector = part["vector"][i] if part["has_vector"][i] else None
            digest = str(part["hash"][i]) or None
            if skip is None and vector is None and digest not in known:
                continue
            frames = slice(int(ends[i] - counts[i]), int(ends[i]))
            records.append(FileRecord(str(part["path"][i]), int(part["size"][i]), int(part["mtime_ns"][i]), digest,
                                      int(part["width"][i]), int(part["height"][i]), vector, skip,
                                      tuple(part["frame_seconds"][frames].tolist()) if counts[i] else (),
                                      part["frame_vectors"][frames] if counts[i] else None))
    return records


def merge_parts(index_path: Path, known_hashes: set[str], commit: Callable[[list[FileRecord]], None]) -> None:
    """Commit every rank's part files (rank order, then writing order), deleting each once committed. A part
    committed twice (a crash between commit and delete) only replaces its own rows."""
    shards = index_path / SHARDS_DIR
    if not shards.is_dir():
        return
    known = set(known_hashes)
    for part in sorted(shards.glob("rank-*/part-*.npz")):
        try:
            records = _read_part(part, known)
        except (OSError, ValueError, KeyError) as e:
            raise BadInput(f"shard file {part} is damaged ({e}): delete it and run again") from None
        commit(records)
        known.update(r.hash for r in records if r.vector is not None and r.hash is not None)
        part.unlink()
    shutil.rmtree(shards, ignore_errors=True)
