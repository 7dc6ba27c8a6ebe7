"""Which faiss index fits N vectors in a memory budget, and how to train, tune and check it.

Why by measurement: the faiss guidelines give the shape (exact while it is small, then HNSW, then IVF
with ever coarser codes as memory tightens; 4·√N to 16·√N lists) but not the search depth. nprobe or
efSearch is chosen here as the smallest value whose recall@10 against exact search reaches the target
on held-out vectors, and that recall and the single-query latency it costs are recorded, so `info`
can say what an index actually delivers rather than what its name suggests.

Everything works on plain arrays and on chunked iterators of (ids, vectors), so an index of more
vectors than fit in memory can still be trained (on a sample) and filled (chunk by chunk).
"""

from __future__ import annotations

import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass

import numpy as np

from clipengine.errors import BadInput

FLAT_MAX = 50_000  # an exact scan of 50k x 512 floats is ~100 MB, a few ms on two cores
# faiss's guideline puts an HNSW coarse quantiser above 1M vectors; measured here (IVF1024 at 100k x 512,
# nprobe 6) it made a single query 17x slower (6.9 ms vs 0.39), while a flat scan of 4096 centroids is
# ~0.3 ms. So only from 16384 lists (about 16M vectors), where the centroid scan itself gets costly.
HNSW_COARSE_MIN = 16_000_000
HNSW_M = 32
TARGET_RECALL = 0.95
TUNING_K = 10
TUNING_QUERIES = 500
REFINE_K_FACTOR = 8  # re-rank 8k fast-scan candidates exactly: +0.02 recall over 4 for ~3% time (bench_ann.py)
TRAIN_POINTS_PER_LIST = 64  # faiss warns under 39 per centroid; 64 is its k-means default cap's quarter
PQ_MIN_TRAIN = 256 * 39  # PQ sub-quantisers have 256 centroids each
MAX_TRAIN = 300_000
DRIFT_RATIO = 1.5  # quantisation error this many times the training sample's: retrain

Chunks = Iterable[tuple[np.ndarray, np.ndarray]]  # (int64 ids, float32 unit vectors)


# --------------------------------------------------------------------------------------------------
# Threads and the BLAS threshold
# --------------------------------------------------------------------------------------------------


BLAS_MIN_QUERIES = 3  # from this many queries in a batch, one GEMM beats a scan per query (bench_ann.py)


def configure_threads(dim: int, threads: int | None = None) -> int:
    """Give faiss and torch the same, explicit thread count (default: the usable cores), and set faiss's
    BLAS threshold for vectors of `dim`.

    Each library ships its own OpenMP runtime; left alone both start a full pool and fight over the
    cores. faiss compares nq·d with the threshold (default 128000: 250 queries at d=512), so a batch of
    a few dozen queries would scan the whole database once per query; measured here, one GEMM is
    faster from 3 queries up.
    """
    import faiss

    threads = threads or len(os.sched_getaffinity(0))
    faiss.omp_set_num_threads(threads)
    faiss.cvar.distance_compute_blas_threshold = BLAS_MIN_QUERIES * dim
    torch = sys.modules.get("torch")  # never import torch just for this: a vector search needs none
    if torch is not None:
        torch.set_num_threads(threads)
    return threads


# --------------------------------------------------------------------------------------------------
# Choosing
# --------------------------------------------------------------------------------------------------


def default_memory_budget() -> int:
    """Half of the machine's memory: the index shares it with the model and everything else."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


@dataclass(frozen=True)
class IndexPlan:
    kind: str  # flat, flat-fp16, ivf-pq-refine, ivf-flat, ivf-fp16, ivf-sq8, ivf-pq; hnsw or custom if named
    factory: str  # a faiss index_factory string; wrapped in IDMap2 where the index has no ids of its own
    bytes: int  # estimated memory once every vector is added
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


def n_lists(n: int) -> int:
    """Inverted lists for n vectors: the power of two nearest 4·√N (the low end of the guideline's 4–16·√N,
    which keeps k-means training affordable on a few cores), at least 16."""
    return max(16, 2 ** round(math.log2(4 * math.sqrt(max(n, 1)))))


def _ivf_prefix(n: int) -> tuple[str, int]:
    lists = n_lists(n)
    coarse = f"IVF{lists}_HNSW32" if n >= HNSW_COARSE_MIN else f"IVF{lists}"
    return coarse, lists


def candidate_plans(n: int, dim: int) -> list[IndexPlan]:
    """Every kind that suits n vectors, most accurate first, with its estimated memory."""
    ids = 8  # an IVF list stores one int64 id per vector
    idmap = 48  # IDMap2: the id array plus its reverse hash map
    if n <= FLAT_MAX:
        return [IndexPlan("flat", "IDMap2,Flat", n * (4 * dim + idmap), f"exact search: {n:,} vectors scan in milliseconds"),
                IndexPlan("flat-fp16", "IDMap2,SQfp16", n * (2 * dim + idmap), "exact scan of float16 vectors")]
    coarse, lists = _ivf_prefix(n)
    centroids = lists * dim * 4 + (lists * HNSW_M * 2 * 4 if "HNSW" in coarse else 0)
    plans = []
    # No HNSW graph here, though faiss's guideline puts one first when memory is plentiful: on this data
    # the re-ranking IVF below beat HNSW32 at every size measured (100k: 0.14 vs 0.23 ms, 8 vs 17 s to
    # build; 1M: 2.3 ms at recall 0.95 vs 17 ms at 0.935, 131 vs 283 s), and uses less memory. Name one
    # with --faiss 'HNSW32' where it does better.
    if dim % 2 == 0:
        plans.append(IndexPlan(
            "ivf-pq-refine", f"IDMap2,{coarse},PQ{dim // 2}x4fs,RFlat", centroids + n * (4 * dim + dim // 4 + ids + idmap),
            f"{lists} lists of 4-bit fast-scan codes, the best {REFINE_K_FACTOR}k re-ranked on full vectors: "
            "at 1M x 512 as accurate as IVF-Flat and 6.7x faster per query, for 7% more memory"))
    plans += [
        IndexPlan("ivf-flat", f"{coarse},Flat", centroids + n * (4 * dim + ids), f"{lists} inverted lists of full vectors"),
        IndexPlan("ivf-fp16", f"{coarse},SQfp16", centroids + n * (2 * dim + ids), f"{lists} lists of float16 vectors"),
        IndexPlan("ivf-sq8", f"{coarse},SQ8", centroids + n * (dim + ids), f"{lists} lists of 8-bit scalar codes"),
    ]
    # PQ codes, largest first. Not OPQ: its rotation took 160 s to train at 100k x 512 on 2 cores (bench_ann.py)
    # for little recall gained; name it with --faiss 'OPQ64,IVF4096,PQ64' where the build time is affordable.
    for m in (64, 32, 16, 8):
        if dim % m == 0 and n >= PQ_MIN_TRAIN:
            plans.append(IndexPlan("ivf-pq", f"{coarse},PQ{m}", centroids + n * (m + ids),
                                   f"{lists} lists of {m}-byte product-quantised codes"))
    return [IndexPlan(p.kind, p.factory, int(p.bytes), p.reason) for p in plans]


def choose_index(n: int, dim: int, memory_budget: int | None = None, factory: str | None = None) -> IndexPlan:
    """The most accurate index kind whose memory fits the budget; a factory string overrides the choice."""
    if factory:
        return IndexPlan(kind_of_factory(factory), normalise_factory(factory, dim), 0, "named with --faiss")
    budget = memory_budget or default_memory_budget()
    plans = candidate_plans(n, dim)
    for plan in plans:
        if plan.bytes <= budget:
            return plan
    smallest = plans[-1]
    raise BadInput(f"{n:,} vectors need at least {smallest.bytes / 1e9:.2f} GB ({smallest.factory}), more than the "
                   f"memory budget of {budget / 1e9:.2f} GB: raise --memory-budget")


def kind_of_factory(factory: str) -> str:
    text = factory.replace("IDMap2,", "").replace("IDMap,", "")
    if "IVF" in text and ("RFlat" in text or "Refine(" in text):
        return "ivf-pq-refine" if "PQ" in text else "custom"
    if "IVF" in text:
        for code, kind in (("PQ", "ivf-pq"), ("SQ8", "ivf-sq8"), ("SQfp16", "ivf-fp16"), (",Flat", "ivf-flat")):
            if code in text.split("IVF", 1)[1]:
                return kind
        return "custom"
    if text.startswith("HNSW"):
        return "hnsw"
    return {"Flat": "flat", "SQfp16": "flat-fp16"}.get(text, "custom")


def normalise_factory(factory: str, dim: int) -> str:
    """Check a user's factory string by building it, and give it ids: IVF indexes keep their own, others
    are wrapped in IDMap2 (whose id map also lets deletions be found), and so are re-ranking IVF indexes,
    whose refinement stage has no ids of its own."""
    import faiss

    factory = factory.strip()
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise BadInput(f"--faiss {factory!r} is not a faiss index_factory string "
                       f"({str(e).strip().splitlines()[-1][:120]})") from None
    if (_ivf(index) is None or _refine(index) is not None) and not factory.startswith("IDMap"):
        factory = f"IDMap2,{factory}"
    return factory


# --------------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------------


def _ivf(index):
    import faiss

    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def _refine(index):
    """The IndexRefine inside (IDMap2 around) a re-ranking index, or None."""
    import faiss

    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
    return inner if isinstance(inner, faiss.IndexRefine) else None


def _hnsw(index):
    import faiss

    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
    return inner if hasattr(inner, "hnsw") else None


def training_size(factory: str, n: int) -> int:
    """How many vectors training needs: enough per inverted list (and for PQ's 256-centroid codebooks)."""
    match = re.search(r"IVF(\d+)", factory)
    wanted = int(match.group(1)) * TRAIN_POINTS_PER_LIST if match else 0
    if "PQ" in factory or "OPQ" in factory:
        wanted = max(wanted, PQ_MIN_TRAIN * 4)
    return min(n, max(wanted, 1), MAX_TRAIN) if wanted else 0


def new_index(factory: str, dim: int):
    import faiss

    return faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)


def train_index(index, sample: np.ndarray) -> dict:
    """Train on a random sample (never the first vectors: those are one folder, one day, one camera), and
    record the sample's quantisation error, the baseline that drift is later measured against."""
    if index.is_trained:
        return {"n_train": 0}
    if len(sample) < 1:
        raise BadInput("an approximate index needs vectors to train on: index some images first")
    index.train(np.ascontiguousarray(sample, dtype=np.float32))
    return {"n_train": int(len(sample)), "quantisation_error": quantisation_error(index, sample)}


def quantisation_error(index, vectors: np.ndarray) -> float | None:
    """Mean squared distance from each vector to its nearest coarse centroid (IVF only): how well the
    lists trained on one sample still describe these vectors."""
    ivf = _ivf(index)
    if ivf is None or len(vectors) == 0:
        return None
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    import faiss

    if isinstance(index, faiss.IndexPreTransform):  # OPQ: the lists live in the rotated space
        for i in range(index.chain.size()):
            x = index.chain.at(i).apply(x)
    scores, _ = ivf.quantizer.search(x, 1)
    # IP quantiser: |x - c|^2 = |x|^2 + |c|^2 - 2 x.c with unit x and (nearly) unit centroids
    centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist)
    c_norm = float(np.mean(np.sum(centroids * centroids, axis=1)))
    return float(np.mean(np.sum(x * x, axis=1) + c_norm - 2 * scores[:, 0]))


def add_chunks(index, chunks: Chunks, on_added: Callable[[int], None] | None = None) -> int:
    """Add vectors chunk by chunk (memory stays at one chunk); `on_added` hears the running total."""
    added = 0
    for ids, vecs in chunks:
        index.add_with_ids(np.ascontiguousarray(vecs, dtype=np.float32), np.ascontiguousarray(ids, dtype=np.int64))
        added += len(ids)
        if on_added:
            on_added(added)
    return added


def index_ids(index) -> np.ndarray:
    """The ids an index holds (IDMap2 keeps them in a map; IVF lists keep them per list)."""
    import faiss

    if index.ntotal == 0:
        return np.empty(0, np.int64)
    if isinstance(index, faiss.IndexIDMap):
        return faiss.vector_to_array(index.id_map).astype(np.int64)
    ivf = _ivf(index)
    invlists = ivf.invlists
    parts = []
    for lst in range(ivf.nlist):
        size = invlists.list_size(lst)
        if size:
            parts.append(faiss.rev_swig_ptr(invlists.get_ids(lst), size).copy())
    return np.sort(np.concatenate(parts)).astype(np.int64) if parts else np.empty(0, np.int64)


def list_count(index) -> int | None:
    ivf = _ivf(index)
    return None if ivf is None else int(ivf.nlist)


def can_remove(index) -> bool:
    """HNSW graphs and re-ranking indexes cannot delete; their stale ids are filtered out of results instead."""
    return _hnsw(index) is None and _refine(index) is None


# --------------------------------------------------------------------------------------------------
# Searching with a depth and a filter
# --------------------------------------------------------------------------------------------------


def search_parameters(index, *, depth: int | None = None, selector=None, k_factor: int | None = None):
    """SearchParameters carrying a depth (nprobe/efSearch; None: the one stored), a re-ranking index's
    k_factor (None: the one stored) and an id filter, or None if none of them."""
    import faiss

    ivf = _ivf(index)
    if ivf is not None:
        if not (selector or depth or k_factor):
            return None
        nprobe = depth or ivf.nprobe
        params = faiss.SearchParametersIVF(sel=selector, nprobe=nprobe)
        if _hnsw(faiss.downcast_index(ivf.quantizer)) is not None:  # the graph must look at least nprobe deep
            params.quantizer_params = faiss.SearchParametersHNSW(efSearch=_quantizer_ef(nprobe))
        refine = _refine(index)
        if refine is not None:  # the refinement stage takes the IVF's parameters as its base's
            outer = faiss.IndexRefineSearchParameters(k_factor=k_factor or refine.k_factor, base_index_params=params)
            outer.referenced = params  # keep the inner object alive as long as the outer one
            return outer
        return params
    hnsw = _hnsw(index)
    if hnsw is not None:
        return faiss.SearchParametersHNSW(sel=selector, efSearch=depth or hnsw.hnsw.efSearch) if (selector or depth) else None
    return faiss.SearchParameters(sel=selector) if selector is not None else None


def _quantizer_ef(nprobe: int) -> int:
    """An HNSW coarse quantiser's efSearch for nprobe lists: its default (16) would return poor lists, and
    at 1M vectors capped recall@10 at 0.84 even with every list probed (measured, bench_ann.py)."""
    return max(2 * nprobe, 64)


def set_depth(index, depth: int) -> None:
    """Store the tuned depth in the index itself, so that it is saved with it and every reader uses it."""
    import faiss

    ivf = _ivf(index)
    if ivf is not None:
        ivf.nprobe = int(depth)
        quantizer = _hnsw(faiss.downcast_index(ivf.quantizer))
        if quantizer is not None:
            quantizer.hnsw.efSearch = _quantizer_ef(depth)
    elif _hnsw(index) is not None:
        _hnsw(index).hnsw.efSearch = int(depth)


def depth_name(index) -> str | None:
    return "nprobe" if _ivf(index) is not None else "efSearch" if _hnsw(index) is not None else None


def read_index(path: str, *, mmap_factory: str | None = None):
    """Read an index file, or with `mmap_factory` (the factory it was built from) map it instead of loading
    it, so that an index bigger than memory is served from the page cache and a search opens in
    milliseconds whatever the index's size. A mapped index is read-only."""
    import faiss

    if mmap_factory is None:
        return faiss.read_index(path)
    # IVF indexes map their inverted lists, the others their flat codes; faiss takes one flag or the other
    # (a re-ranking index maps its full vectors, the bulk of it, and loads its small fast-scan lists)
    lists = "IVF" in mmap_factory and "RFlat" not in mmap_factory and "Refine(" not in mmap_factory
    return faiss.read_index(path, faiss.IO_FLAG_MMAP if lists else faiss.IO_FLAG_MMAP_IFC)


# --------------------------------------------------------------------------------------------------
# Ground truth, tuning, measuring
# --------------------------------------------------------------------------------------------------


def exact_top(queries: np.ndarray, chunks: Chunks, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k (scores, ids) of each query over vectors that arrive in chunks; memory stays at one chunk."""
    nq = len(queries)
    best_s = np.full((nq, k), -np.inf, dtype=np.float32)
    best_i = np.full((nq, k), -1, dtype=np.int64)
    for ids, vecs in chunks:
        scores = queries @ np.asarray(vecs, dtype=np.float32).T
        scores = np.concatenate([best_s, scores], axis=1)
        cand = np.concatenate([best_i, np.broadcast_to(ids, (nq, len(ids)))], axis=1)
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k] if scores.shape[1] > k else np.argsort(-scores, axis=1)
        best_s = np.take_along_axis(scores, top, axis=1)
        best_i = np.take_along_axis(cand, top, axis=1)
    order = np.argsort(-best_s, axis=1, kind="stable")
    return np.take_along_axis(best_s, order, axis=1), np.take_along_axis(best_i, order, axis=1)


@dataclass
class GroundTruth:
    """Held-out queries with their exact neighbours. The queries are indexed vectors themselves, so each one's
    own id is dropped from both sides; `depth` neighbours are kept so that ties at rank k count as hits."""

    queries: np.ndarray
    query_ids: np.ndarray
    scores: np.ndarray  # exact top, self removed, (nq, >= k)
    ids: np.ndarray

    @classmethod
    def compute(cls, queries: np.ndarray, query_ids: np.ndarray, chunks: Chunks, k: int = TUNING_K,
                depth: int = 50) -> GroundTruth:
        scores, ids = exact_top(queries, chunks, depth + 1)
        return cls(queries, query_ids, *_drop_self(scores, ids, query_ids, depth))

    def recall(self, found_ids: np.ndarray, k: int = TUNING_K) -> float:
        """Fraction of each query's k results that are among its exact k nearest (ties at the k-th score count)."""
        return float(self.recalls(found_ids, k).mean())

    def recalls(self, found_ids: np.ndarray, k: int = TUNING_K) -> np.ndarray:
        """Each query's recall@k, for the spread that `confident_recall` needs."""
        _, found = _drop_self(np.zeros(found_ids.shape, np.float32), found_ids, self.query_ids, k)
        kth = self.scores[:, k - 1:k] - 1e-6
        out = np.empty(len(found))
        for row in range(len(found)):
            good = set(self.ids[row][self.scores[row] >= kth[row]].tolist())
            out[row] = sum(1 for i in found[row] if i in good) / k
        return out


CONFIDENCE_Z = 1.645  # one-sided 95%


def confident_recall(recalls: np.ndarray) -> float:
    """The recall that queries like these reach with 95% confidence: the mean less 1.645 standard errors.

    Why not the mean: the depth is the smallest whose recall reaches the target on 500 sampled queries, so
    it is chosen where the sample happened to do well. At 1M vectors (bench_filtered.py) a depth tuned to a
    mean of 0.951 gave 0.945 on other queries; a standard error there is about 0.004."""
    if len(recalls) < 2:
        return float(recalls.mean()) if len(recalls) else 0.0
    return float(recalls.mean() - CONFIDENCE_Z * recalls.std(ddof=1) / math.sqrt(len(recalls)))


def _drop_self(scores: np.ndarray, ids: np.ndarray, self_ids: np.ndarray, keep: int):
    mask = ids != self_ids[:, None]
    out_s = np.full((len(ids), keep), -np.inf, dtype=np.float32)
    out_i = np.full((len(ids), keep), -1, dtype=np.int64)
    for row in range(len(ids)):
        s, i = scores[row][mask[row]][:keep], ids[row][mask[row]][:keep]
        out_s[row, :len(s)], out_i[row, :len(i)] = s, i
    return out_s, out_i


@dataclass
class Tuning:
    param: str | None  # nprobe, efSearch, or None for exact indexes
    value: int | None
    recall_at_10: float
    reached: bool  # whether the target was reached at all (else value is the deepest tried)
    target: float
    p50_ms: float
    p99_ms: float
    queries: int
    at_count: int  # vectors in the index when measured
    k_factor: int | None = None  # re-ranking indexes: candidates re-ranked per result
    recall_low: float | None = None  # confident_recall of the sample: what `reached` compares with the target

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def depth(self) -> Depth:
        return Depth(self.value, self.k_factor)


@dataclass(frozen=True)
class Depth:
    """How deep one kind of query searches: nprobe or efSearch, and a re-ranking index's k_factor (None:
    the values stored in the index)."""

    value: int | None = None
    k_factor: int | None = None

    def deepest(self, other: Depth | None) -> Depth:
        """At least as deep as both: for a query whose kind is not known (a raw vector)."""
        if other is None:
            return self
        pick = lambda a, b: b if a is None else a if b is None else max(a, b)  # noqa: E731
        return Depth(pick(self.value, other.value), pick(self.k_factor, other.k_factor))


def _depths(index) -> list[int]:
    ivf = _ivf(index)
    if ivf is not None:
        out, d = [], 1
        while d < ivf.nlist:
            out.append(d)
            d *= 2
        return out + [ivf.nlist]
    return [16, 32, 64, 128, 256, 512, 1024, 2048]


def recall_at(index, truth: GroundTruth, depth: int | None, k: int = TUNING_K) -> float:
    return float(recalls_at(index, truth, depth, k).mean())


def recalls_at(index, truth: GroundTruth, depth: int | None, k: int = TUNING_K) -> np.ndarray:
    params = search_parameters(index, depth=depth)
    _, found = index.search(truth.queries, k + 1, params=params)
    return truth.recalls(found, k)


def tune(index, truth: GroundTruth, target: float = TARGET_RECALL, k: int = TUNING_K) -> Tuning:
    """The smallest depth reaching `target` recall@k with 95% confidence (`confident_recall`): doubling, then
    bisection between the last miss and the first hit. Stored into the index (set_depth), with the measured
    single-query latency. A re-ranking index tries re-ranking 8, 16, 32 and 64 candidates per result and
    keeps the fastest that reaches the target: more re-ranking needs fewer lists probed, which pays off as
    long as probing costs more than re-ranking (text queries, whose neighbours lie in far lists, move it)."""
    if not 0 < target <= 1:
        raise BadInput("--target-recall must be in (0, 1]")
    refine = _refine(index)
    if refine is None:
        return _tune_depth(index, truth, target, k)
    best: Tuning | None = None
    for k_factor in (REFINE_K_FACTOR, 2 * REFINE_K_FACTOR, 4 * REFINE_K_FACTOR, 8 * REFINE_K_FACTOR):
        refine.k_factor = k_factor
        tuning = _tune_depth(index, truth, target, k)
        tuning.k_factor = k_factor
        if best is not None and best.reached and not (tuning.reached and tuning.p50_ms < best.p50_ms):
            break  # slower than the last: re-ranking more only costs from here
        best = tuning
    assert best is not None
    refine.k_factor = best.k_factor
    if best.value is not None:
        set_depth(index, best.value)
    return best


def _tune_depth(index, truth: GroundTruth, target: float, k: int) -> Tuning:
    """Depths are compared by `confident_recall`, so that the one chosen reaches `target` on queries beyond
    the sample too; the Tuning records both the sample's mean and that bound."""
    name = depth_name(index)

    def measure(depth: int | None) -> tuple[float, float]:
        recalls = recalls_at(index, truth, depth, k)
        return float(recalls.mean()), confident_recall(recalls)

    if name is None:
        mean, low_bound = measure(None)
        return _measured(index, truth, None, None, (mean, low_bound), low_bound >= target, target)
    low, high, high_recall = 0, None, (0.0, 0.0)
    for depth in _depths(index):
        recall = measure(depth)
        if recall[1] >= target:
            high, high_recall = depth, recall
            break
        low, high_recall = depth, recall
    if high is None:  # not reachable: use the deepest search tried
        set_depth(index, low)
        return _measured(index, truth, name, low, high_recall, False, target)
    while high - low > max(1, high // 8):  # bisect to within an eighth: finer steps cost more than they save
        mid = (low + high) // 2
        recall = measure(mid)
        if recall[1] >= target:
            high, high_recall = mid, recall
        else:
            low = mid
    set_depth(index, high)
    return _measured(index, truth, name, high, high_recall, True, target)


def _measured(index, truth, name, value, recall: tuple[float, float], reached, target) -> Tuning:
    p50, p99 = single_query_latency(index, truth.queries)
    return Tuning(name, value, round(recall[0], 4), bool(reached), target, p50, p99, len(truth.queries),
                  int(index.ntotal), recall_low=round(recall[1], 4))


def single_query_latency(index, queries: np.ndarray, k: int = TUNING_K, repeats: int = 1,
                         search: Callable | None = None) -> tuple[float, float]:
    """p50 and p99 in milliseconds of one query at a time, the way a terminal search runs."""
    search = search or (lambda q: index.search(q, k))
    for q in queries[:5]:  # warm caches and thread pools
        search(q[None])
    times = []
    for _ in range(repeats):
        for q in queries:
            start = time.perf_counter()
            search(q[None])
            times.append((time.perf_counter() - start) * 1000)
    return round(float(np.percentile(times, 50)), 3), round(float(np.percentile(times, 99)), 3)


def sample_ids(ids: np.ndarray, count: int, seed: int, exclude: np.ndarray | None = None) -> np.ndarray:
    """A sorted random sample of `ids`, none of them in `exclude`."""
    pool = ids if exclude is None or exclude.size == 0 else np.setdiff1d(ids, exclude, assume_unique=True)
    if count >= pool.size:
        return np.sort(pool)
    return np.sort(np.random.default_rng(seed).choice(pool, size=count, replace=False))


def iter_array_chunks(ids: np.ndarray, vectors: np.ndarray, chunk: int = 65536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for start in range(0, len(ids), chunk):
        yield ids[start:start + chunk], vectors[start:start + chunk]


# A filtered search scans the kept vectors exactly up to this many of them, and otherwise asks the ANN index
# with the filter at a depth raised for the fraction kept. Measured at 1M x 512 (benchmarks/bench_filtered.py):
# the exact scan of 10,000 kept vectors (1%) took 16.5 ms, where the raised depth would probe every one of
# IVF4096's lists; with 100,000 kept (10%) the index at nprobe 640 took 65 ms at recall@10 0.973, where the
# exact scan of the kept vectors took 166 ms.
EXACT_MAX_KEPT = 30_000
EXACT_MAX_FRACTION = 0.03
HNSW_MAX_EF = 4096  # the deepest a filtered search raises an HNSW graph's efSearch


@dataclass(frozen=True)
class FilterPlan:
    """How one filtered search ran: "ann" (the index with the filter, at `depth`), or "exact" (a scan of the
    kept vectors), chosen from how many the filter kept. `describe()` is what `--json` records."""

    plan: str
    kept: int
    total: int
    depth: int | None = None  # the raised nprobe or efSearch of an "ann" plan (None: an exact index)

    def describe(self) -> str:
        share = f"{self.kept:,} of {self.total:,} kept ({100 * self.kept / max(self.total, 1):.3g}%)"
        if self.plan == "exact":
            return f"exact scan: {share}"
        return f"ann at depth {self.depth}: {share}" if self.depth else f"exact index with the filter: {share}"


def _tuned_depth(index) -> int | None:
    ivf, hnsw = _ivf(index), _hnsw(index)
    return int(ivf.nprobe) if ivf is not None else int(hnsw.hnsw.efSearch) if hnsw is not None else None


def raised_depth(tuned: int, fraction: float, limit: int) -> int:
    """The depth that finds as many kept candidates as the tuned depth finds in all: a filter keeping a
    tenth leaves a tenth of each probed list (or graph neighbourhood), so ten times as deep, up to `limit`."""
    return int(min(limit, math.ceil(tuned / max(fraction, 1e-9))))


class SearchableIndex:
    """A faiss index together with the ids it still holds but must not return (an HNSW graph cannot
    delete, so a removed file's id stays in it until the next rebuild), searched at its tuned depth.

    A filtered search is planned (`plan`): few kept vectors are scanned exactly (read from the index where it
    holds them in full, else through `vectors_of`, the catalogue), many are searched in the index at a depth
    raised for the fraction kept. `last_plan` says how the last search ran."""

    def __init__(self, index, excluded: np.ndarray | None = None,
                 vectors_of: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None,
                 text_depth: Depth | None = None):
        self.index = index
        self.text_depth = text_depth  # tuned on text queries; image queries use the depth stored in the index
        self.excluded = excluded if excluded is not None and excluded.size else None
        self.vectors_of = vectors_of
        self.last_plan: FilterPlan | None = None
        # (ids by position, sorting order, sorted ids), for filters on a re-ranking index
        self._id_order: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._excluded_positions: np.ndarray | None = None

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal) - (0 if self.excluded is None else int(self.excluded.size))

    def depth(self, kind: str | None) -> Depth:
        """The depth a query of `kind` searches at: "image" (an image file, an indexed id), "text" (a text, or
        terms with a text among them), or None (a raw vector: the deeper of both)."""
        stored = Depth(_tuned_depth(self.index), int(_refine(self.index).k_factor) if _refine(self.index) else None)
        if kind == "text":
            return self.text_depth or stored
        if kind is None:
            return stored.deepest(self.text_depth)
        return stored

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None,
               kind: str | None = "image") -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, ids) per query, only among `allowed` ids when given (already free of excluded ones),
        at the depth tuned for queries of `kind` (`depth`).

        A single query runs on one thread: faiss splits only a flat scan across threads for it, and that
        measured slower (14 ms vs 19 ms at 100k x 512 on 2 cores); the others search a query per thread.
        The setting is OpenMP's per-thread one, so other Python threads are unaffected."""
        import faiss

        plan = self.last_plan = self.plan(allowed, kind)
        if plan is not None and plan.plan == "exact":
            assert allowed is not None
            return self._exact(queries, k, allowed)
        if plan is not None and plan.kept >= plan.total:  # it keeps everything: no selector to check per vector
            allowed = None
        raised = plan.depth if plan is not None else None
        if kind == "image" or self.text_depth is None:
            depth = Depth(raised)  # the depth the index holds, raised for a filter
        else:
            tuned = self.depth(kind)
            depth = Depth(raised or tuned.value, tuned.k_factor)
        if len(queries) != 1:
            return self._search(queries, k, allowed, depth)
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
        try:
            return self._search(queries, k, allowed, depth)
        finally:
            faiss.omp_set_num_threads(threads)

    def plan(self, allowed: np.ndarray | None, kind: str | None = "image") -> FilterPlan | None:
        """How a search among `allowed` ids runs (None: unfiltered, at the depth tuned for `kind`)."""
        if allowed is None:
            return None
        total = max(self.ntotal, 1)
        kept = int(allowed.size)
        tuned = self.depth(kind).value
        if kept >= total:
            return FilterPlan("ann", kept, total, tuned)
        if kept <= EXACT_MAX_KEPT or kept <= EXACT_MAX_FRACTION * total:
            return FilterPlan("exact", kept, total)
        if tuned is None:  # an exact index: the filter costs it nothing in recall
            return FilterPlan("ann", kept, total)
        ivf = _ivf(self.index)
        return FilterPlan("ann", kept, total, raised_depth(tuned, kept / total, ivf.nlist if ivf is not None else
                                                           HNSW_MAX_EF))

    def _exact(self, queries: np.ndarray, k: int, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k among the allowed ids: their vectors from the index where it holds them in full (a flat
        scan, a re-ranking index's full vectors, an HNSW graph's), else from the catalogue."""
        ids, vectors = self._full_vectors(allowed)
        k = max(1, min(k, len(ids)))
        return exact_top(np.ascontiguousarray(queries, dtype=np.float32), [(ids, vectors)], k)

    def _full_vectors(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) of those of `ids` the index holds."""
        import faiss

        inner = faiss.downcast_index(self.index.index) if isinstance(self.index, faiss.IndexIDMap) else self.index
        exact_inside = isinstance(inner, faiss.IndexFlat) or (
            _refine(self.index) is not None and isinstance(faiss.downcast_index(inner.refine_index), faiss.IndexFlat)) \
            or (_hnsw(self.index) is not None and isinstance(faiss.downcast_index(inner.storage), faiss.IndexFlat))
        if exact_inside and isinstance(self.index, faiss.IndexIDMap2):
            ids = np.ascontiguousarray(ids, dtype=np.int64)
            return ids, self.index.reconstruct_batch(ids)
        if self.vectors_of is None:
            raise RuntimeError("this index keeps no full vectors, and no catalogue was given to read them from")
        return self.vectors_of(ids)

    def _search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None,
                depth: Depth = Depth()) -> tuple[np.ndarray, np.ndarray]:
        import faiss

        if _refine(self.index) is not None and (allowed is not None or self.excluded is not None):
            return self._search_refine(queries, k, allowed, depth)
        selector = inner = None  # both held here: faiss selectors do not own what they point to
        if allowed is not None:
            selector = faiss.IDSelectorBatch(allowed)
        elif self.excluded is not None:
            inner = faiss.IDSelectorBatch(self.excluded)
            selector = faiss.IDSelectorNot(inner)
        params = search_parameters(self.index, selector=selector, depth=depth.value, k_factor=depth.k_factor)
        k = max(1, min(k, self.index.ntotal))
        return self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k, params=params)

    def _search_refine(self, queries: np.ndarray, k: int, allowed: np.ndarray | None, depth: Depth = Depth()):
        """A filtered search of a re-ranking index. IDMap2 translates a filter into internal positions only for
        the index right under it, and IndexRefine hands its base only the base's own parameters, so the
        filter is translated here and given to the IVF stage directly."""
        import faiss

        if allowed is not None:
            inner = faiss.IDSelectorBatch(self._positions(allowed))
            selector = inner
        else:
            assert self.excluded is not None  # `search` sends only filtered searches here
            if self._excluded_positions is None:  # the same for every search of this view: computed once
                self._excluded_positions = self._positions(self.excluded)
            inner = faiss.IDSelectorBatch(self._excluded_positions)
            selector = faiss.IDSelectorNot(inner)
        params = search_parameters(self.index, selector=selector, depth=depth.value,  # the selector: to the IVF stage
                                   k_factor=depth.k_factor)
        k = max(1, min(k, self.index.ntotal))
        scores, found = _refine(self.index).search(np.ascontiguousarray(queries, dtype=np.float32), k, params=params)
        id_map, _, _ = self._id_tables()
        return scores, np.where(found >= 0, id_map[np.maximum(found, 0)], -1)

    def _id_tables(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._id_order is None:
            import faiss

            id_map = faiss.vector_to_array(self.index.id_map).astype(np.int64)
            order = np.argsort(id_map, kind="stable")
            self._id_order = (id_map, order, id_map[order])
        return self._id_order

    def _positions(self, ids: np.ndarray) -> np.ndarray:
        """Internal positions of those of `ids` the index holds."""
        _, order, sorted_ids = self._id_tables()
        at = np.searchsorted(sorted_ids, ids)
        present = at < sorted_ids.size
        present[present] = sorted_ids[at[present]] == ids[present]
        return order[at[present]]
