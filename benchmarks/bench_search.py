"""Search latency: one query against an index of N vectors, clipengine's Searcher vs the naive numpy way.

An index of N random 512-d unit vectors (ViT-B-32's width) is committed through the store's own API
(embedding is measured by bench_index.py; here only the search path counts). Per query:
  ours   Searcher.search_vector: faiss inner-product search plus the sqlite rows of the hits
  naive  numpy: scores = vectors @ q, argpartition for the top k, sort them (vectors already in memory)
Both run interleaved on the same queries; medians and p95 are reported, with naive/ours. (The wall time
of `clipengine search TEXT` as a user runs it, in a fresh process, is bench_cold_search.py's.)

    python benchmarks/bench_search.py            # N = 100,000
    python benchmarks/bench_search.py --quick    # N = 10,000
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from results_file import save_result  # benchmarks/ is on sys.path when a script runs

from clipengine.index.faiss_view import FaissPolicy, SearchStructure
from clipengine.index.search import Searcher
from clipengine.index.store import FileRecord, IndexStore
from clipengine.models import ModelSpec, resolve_source

DIM, K, QUERIES = 512, 10, 300


def build_index(path: Path, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n, DIM), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    source = {**resolve_source(ModelSpec("ViT-B-32", "none")), "embed_dim": DIM}
    exact = FaissPolicy(factory="Flat").section(DIM)  # exact vs exact: the overhead of ours
    with IndexStore.create(path, source, exact) as store:
        for begin in range(0, n, 10_000):
            store.commit([FileRecord(f"/bench/img_{i:07d}.jpg", 1000, 0, f"{i:064x}", 640, 480, vectors[i])
                          for i in range(begin, min(begin + 10_000, n))])
        SearchStructure(store).save()
    return vectors


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, help="where to write the JSON (default: results/search-DATE.json)")
    args = parser.parse_args()
    n = 10_000 if args.quick else 100_000
    with tempfile.TemporaryDirectory() as tmp:
        index = Path(tmp) / "bench"
        print(f"building an index of {n} vectors ...", flush=True)
        vectors = build_index(index, n)
        queries = np.random.default_rng(1).standard_normal((QUERIES, DIM), dtype=np.float32)
        ours, naive = [], []
        with Searcher(index) as searcher:
            searcher.search_vector(queries[0], K)  # reads the faiss file once, as a long-lived searcher does
            for q in queries:
                t = time.perf_counter()
                hits = searcher.search_vector(q, K)
                ours.append(time.perf_counter() - t)
                t = time.perf_counter()
                scores = vectors @ (q / np.linalg.norm(q))
                top = np.argpartition(-scores, K)[:K]
                top = top[np.argsort(-scores[top])]
                naive.append(time.perf_counter() - t)
                assert [h.path for h in hits] == [f"/bench/img_{i:07d}.jpg" for i in top]
    result = {
        "date": dt.date.today().isoformat(), "cores": os.cpu_count(), "vectors": n, "dim": DIM, "k": K,
        "queries": QUERIES,
        "ours_ms": {"median": statistics.median(ours) * 1e3, "p95": percentile(ours, 95) * 1e3},
        "naive_ms": {"median": statistics.median(naive) * 1e3, "p95": percentile(naive, 95) * 1e3},
        "naive_over_ours": statistics.median(naive) / statistics.median(ours),
    }
    print(f"{n} vectors, k={K}: ours {result['ours_ms']['median']:.2f} ms (p95 {result['ours_ms']['p95']:.2f}), "
          f"naive numpy {result['naive_ms']['median']:.2f} ms: {result['naive_over_ours']:.2f}x")
    save_result("search", result, args.out, args.quick)


if __name__ == "__main__":
    main()
