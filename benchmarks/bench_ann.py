"""Approximate indexes at a million vectors: every kind clipengine can choose, side by side with exact search.

Data: 1,000,000 unit vectors of dimension 512 from a mixture of Gaussians shaped like CLIP embeddings
(tests/synthetic.py clustered_unit_vectors: shared mean direction, 10,000 clusters of varied size),
and held-out queries drawn from the same mixture (not in the index): 500 tune the search depth (the
same `ann.tune` an index build runs), 500 others measure recall@10 at that depth. Ground truth is exact
inner-product search. For each kind: build time (train on a random sample + add), memory (the
serialised index), single-query p50/p99 latency, and recall@10 vs exact; then the ratio of exact flat
search's p50 to the kind's. The automatically chosen kind (ann.choose_index at the default budget, and
at tighter ones) is marked. Also: faiss's BLAS threshold and thread count, measured on flat search.

    python benchmarks/bench_ann.py                  # N = 1,000,000 (about 25 minutes on 2 cores)
    python benchmarks/bench_ann.py --quick          # N = 100,000
    python benchmarks/bench_ann.py --kinds hnsw     # only some kinds
    python benchmarks/bench_ann.py --store          # also the whole path through an index on disk
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import faiss
import numpy as np
from results_file import save_result  # benchmarks/ is on sys.path when a script runs
from synthetic import clustered_unit_vectors

from clipengine.index import ann

DIM, K = 512, 10
T = TypeVar("T")


def timed(f: Callable[[], T]) -> tuple[float, T]:
    start = time.perf_counter()
    out = f()
    return time.perf_counter() - start, out


def flat_threads_and_blas(vectors: np.ndarray, queries: np.ndarray) -> dict:
    """Flat search time per batch size: faiss's default BLAS threshold vs ours, 1 vs all threads."""
    index = faiss.IndexFlatIP(DIM)
    index.add(vectors)
    cores = len(os.sched_getaffinity(0))
    out = {}

    def search_repeatedly(batch: np.ndarray, reps: int) -> None:
        for _ in range(reps):
            index.search(batch, K)

    for threads in sorted({1, cores}):
        faiss.omp_set_num_threads(threads)
        for label, threshold in (("default", 128000), ("ours", ann.BLAS_MIN_QUERIES * DIM)):
            faiss.cvar.distance_compute_blas_threshold = threshold
            row = {}
            for nq in (1, 2, 3, 4, 16, 64):
                index.search(queries[:nq], K)
                reps = max(3, 24 // nq)
                seconds, _ = timed(functools.partial(search_repeatedly, queries[:nq], reps))
                row[nq] = round(seconds / reps * 1000, 2)
            out[f"{threads} threads, {label} threshold"] = row
            print(f"flat {len(vectors):,}: {threads} threads, {label} BLAS threshold, ms per batch of nq: {row}", flush=True)
    ann.configure_threads(DIM)
    return out


def bench_kind(plan: ann.IndexPlan, vectors: np.ndarray, tune_truth: ann.GroundTruth,
               test_truth: ann.GroundTruth, seed: int) -> dict:
    index = ann.new_index(plan.factory, DIM)
    ids = np.arange(len(vectors), dtype=np.int64)
    train_ids = ann.sample_ids(ids, ann.training_size(plan.factory, len(ids)), seed)
    train_s, _ = timed(lambda: ann.train_index(index, vectors[train_ids]) if train_ids.size else None)
    add_s, _ = timed(lambda: ann.add_chunks(index, ann.iter_array_chunks(ids, vectors)))
    tune_s, tuning = timed(lambda: ann.tune(index, tune_truth))
    test_recall = ann.recall_at(index, test_truth, tuning.value)
    p50, p99 = ann.single_query_latency(index, test_truth.queries)
    size = faiss.serialize_index(index).nbytes
    row = {"kind": plan.kind, "factory": plan.factory, "train_s": round(train_s, 1), "add_s": round(add_s, 1),
           "build_s": round(train_s + add_s, 1), "tune_s": round(tune_s, 1), "bytes": int(size),
           "estimated_bytes": plan.bytes, "param": tuning.param, "value": tuning.value,
           "tune_recall": tuning.recall_at_10, "recall_at_10": round(test_recall, 4), "reached": tuning.reached,
           "p50_ms": p50, "p99_ms": p99}
    print(f"{plan.kind:10s} {plan.factory:28s} build {row['build_s']:7.1f} s  {size / 2**20:8.1f} MiB  "
          f"{tuning.param}={tuning.value}  recall@10 {test_recall:.3f}  p50 {p50:.3f} ms  p99 {p99:.3f} ms", flush=True)
    return row


def bench_store_path(vectors: np.ndarray, queries: np.ndarray) -> dict:
    """The whole user path at N: vectors committed to an index (as `clipengine index` does after embedding),
    the automatic choice built, trained and tuned by SearchStructure.save, then searched through Searcher (memory-mapped)
    and through a fresh `clipengine search --vector` process."""
    import subprocess
    import sys
    import tempfile

    from clipengine.index.faiss_view import SearchStructure
    from clipengine.index.search import Searcher
    from clipengine.index.store import FileRecord, IndexStore
    from clipengine.models import ModelSpec, resolve_source

    source = {**resolve_source(ModelSpec("ViT-B-32", "none")), "embed_dim": DIM}
    with tempfile.TemporaryDirectory(dir=Path(__file__).resolve().parent.parent / "indexes") as tmp:
        path = Path(tmp) / "big"
        with IndexStore.create(path, source) as store:
            def commit_all() -> None:
                for start in range(0, len(vectors), 20_000):
                    store.commit([FileRecord(f"/bench/img_{i:07d}.jpg", 1000, 0, f"{i:064x}", 640, 480, vectors[i])
                                  for i in range(start, min(start + 20_000, len(vectors)))])

            commit_s, _ = timed(commit_all)
            build_s, _ = timed(SearchStructure(store).save)
            state = SearchStructure(store).state
        open_s, searcher = timed(lambda: Searcher(path))
        with searcher:
            first_s, _ = timed(lambda: searcher.search_vector(queries[0], K))
            p50, p99 = ann.single_query_latency(None, queries[:300], search=lambda q: searcher.search_vector(q[0], K))
        np.save(Path(tmp) / "q.npy", queries[0])
        command = [sys.executable, "-m", "clipengine", "search", "--vector", str(Path(tmp) / "q.npy"),
                   "--index", str(path), "--json"]
        cli_s, _ = timed(lambda: subprocess.run(command, check=True, capture_output=True))
        size = sum(f.stat().st_size for f in path.iterdir())
    row = {"n": len(vectors), "commit_s": round(commit_s, 1), "save_faiss_s": round(build_s, 1),
           "kind": state.kind, "factory": state.factory, "tuning": state.tuning and state.tuning.to_dict(),
           "open_s": round(open_s, 3), "first_query_ms": round(first_s * 1000, 2),
           "searcher_p50_ms": p50, "searcher_p99_ms": p99, "cli_search_vector_s": round(cli_s, 2),
           "index_bytes_on_disk": size}
    print(f"store path: commit {commit_s:.0f} s, build+tune {build_s:.0f} s ({state.factory}, "
          f"{state.tuning.param}={state.tuning.value}, recall@10 {state.tuning.recall_at_10}), "
          f"Searcher p50 {p50:.2f} ms p99 {p99:.2f} ms, `clipengine search --vector` {cli_s:.2f} s", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--n", type=int, help="vectors in the index (default 1,000,000; --quick 100,000)")
    parser.add_argument("--kinds", help="comma-separated kinds to build (default: all that suit N, plus hnsw)")
    parser.add_argument("--store", action="store_true", help="also run the whole path through an index on disk")
    parser.add_argument("--out", type=Path, help="where to write the JSON (default: results/ann-DATE.json)")
    args = parser.parse_args()
    n = args.n or (100_000 if args.quick else 1_000_000)
    threads = ann.configure_threads(DIM)
    seed = 0
    gen_s, vectors = timed(lambda: clustered_unit_vectors(n, DIM, clusters=n // 100, seed=seed))
    queries = clustered_unit_vectors(1000, DIM, clusters=n // 100, seed=seed, draw=1)
    print(f"{n:,} clustered vectors of dimension {DIM} in {gen_s:.1f} s; {threads} threads", flush=True)
    no_self = np.full(500, -1, dtype=np.int64)  # held-out queries: none of them is in the index
    truth_s, truths = timed(lambda: [ann.GroundTruth.compute(
        queries[part], no_self, ann.iter_array_chunks(np.arange(n), vectors)) for part in (slice(0, 500), slice(500, 1000))])
    tune_truth, test_truth = truths
    print(f"exact ground truth for 1000 queries: {truth_s:.1f} s", flush=True)

    flat = faiss.IndexFlatIP(DIM)
    flat.add(vectors)
    flat_p50, flat_p99 = ann.single_query_latency(flat, test_truth.queries[:200])
    print(f"exact flat: p50 {flat_p50:.2f} ms  p99 {flat_p99:.2f} ms", flush=True)
    del flat
    blas = flat_threads_and_blas(vectors[:100_000], queries)

    plans: dict[str, ann.IndexPlan] = {}
    for plan in ann.candidate_plans(n, DIM):  # the most accurate plan of each kind (PQ64 before PQ8)
        plans.setdefault(plan.kind, plan)
    if "hnsw" not in plans:
        plans["hnsw"] = ann.IndexPlan("hnsw", f"IDMap2,HNSW{ann.HNSW_M},Flat",
                                      int(n * (4 * DIM + ann.HNSW_M * 8 * 1.05 + 48)), "for comparison")
    wanted = args.kinds.split(",") if args.kinds else list(plans)
    rows = [bench_kind(plans[kind], vectors, tune_truth, test_truth, seed) for kind in wanted if kind in plans]
    choices = {}
    for label, budget in (("default (half the RAM)", None), ("1 GB", 10**9), ("256 MB", 256 * 10**6)):
        try:
            choices[label] = ann.choose_index(n, DIM, budget).kind
        except Exception as e:  # a budget too small for any kind is reported, not fatal
            choices[label] = f"none ({e})"
    for row in rows:
        row["speedup_vs_flat"] = round(flat_p50 / row["p50_ms"], 1)
        row["chosen_at"] = [label for label, kind in choices.items() if kind == row["kind"]]
    auto = next((r for r in rows if choices["default (half the RAM)"] == r["kind"]), None)
    print(f"chosen: {choices}")
    if auto:
        print(f"automatic choice {auto['kind']}: p50 {auto['p50_ms']:.2f} ms at recall@10 {auto['recall_at_10']:.3f}, "
              f"{auto['speedup_vs_flat']}x faster than exact flat ({flat_p50:.1f} ms)")
    store = bench_store_path(vectors, queries) if args.store else None
    record = {"benchmark": "ann", "date": dt.date.today().isoformat(), "n": n, "dim": DIM, "threads": threads,
              "queries": {"tune": 500, "test": 500}, "target_recall": ann.TARGET_RECALL,
              "data": f"clustered_unit_vectors(n, {DIM}, clusters={n // 100}, seed={seed})",
              "flat": {"p50_ms": flat_p50, "p99_ms": flat_p99}, "blas_threshold_ms": blas,
              "choices": choices, "kinds": rows, "auto": auto, "store_path": store}
    save_result("ann", record, args.out, args.quick)


if __name__ == "__main__":
    main()
