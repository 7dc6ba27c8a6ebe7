"""Filtered search at a million vectors: is it still right, and how fast, when a filter keeps 100% .. 0.01%?

Data: 1,000,000 clustered unit vectors of dimension 512 (tests/synthetic.py clustered_unit_vectors, as
bench_ann.py), in the search structure clipengine chooses for them (ann.choose_index at the default budget),
tuned to recall@10 0.95 as an index build tunes it. Held-out queries from the same mixture. A filter is a
random subset of the ids (a date range or a camera keeps files all over the vector space).

Three plans, side by side in one run, each against the exact filtered top 10:
  - ours: `SearchableIndex.search` with the kept ids: the planner picks an exact scan of the kept vectors or
    the index with the filter at a depth raised for the fraction kept (`ann.FilterPlan`);
  - post-filter: the unfiltered index at its tuned depth, asked for 10·k hits, of which the kept are taken
    (what a vector search without filter support forces);
  - pre-filter: gather the kept vectors from the full array and scan them exactly (numpy), as a script would.
For each: p50 single-query latency and recall@10. Ours must reach recall@10 >= 0.95 at every selectivity.

    python benchmarks/bench_filtered.py            # N = 1,000,000 (about 10 minutes on 2 cores)
    python benchmarks/bench_filtered.py --quick    # N = 100,000
"""

from __future__ import annotations

import argparse
import datetime as dt
import time
from pathlib import Path

import numpy as np
from results_file import save_result  # benchmarks/ is on sys.path when a script runs
from synthetic import clustered_unit_vectors

from clipengine.index import ann

DIM, K = 512, 10
SELECTIVITIES = (1.0, 0.1, 0.01, 0.001, 0.0001)
POST_FILTER_FACTOR = 10


def recall(found: np.ndarray, truth_ids: np.ndarray, truth_scores: np.ndarray) -> float:
    """recall@K: found ids among the exact top K (ties at the K-th score count)."""
    hits = 0
    for row in range(len(found)):
        good = set(truth_ids[row][truth_scores[row] >= truth_scores[row, K - 1] - 1e-6].tolist())
        hits += sum(1 for i in found[row][:K] if i in good)
    return hits / (len(found) * K)


def timed_each(queries: np.ndarray, search) -> tuple[float, np.ndarray]:
    """p50 ms of one query at a time, and the ids found (rows padded with -1 to K)."""
    search(queries[0][None])  # warm
    times, rows = [], []
    for q in queries:
        start = time.perf_counter()
        ids = search(q[None])
        times.append((time.perf_counter() - start) * 1000)
        row = np.full(K, -1, dtype=np.int64)
        row[:min(K, len(ids))] = ids[:K]
        rows.append(row)
    return round(float(np.percentile(times, 50)), 3), np.array(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--n", type=int, help="vectors (default 1,000,000; --quick 100,000)")
    parser.add_argument("--queries", type=int, default=100, help="held-out queries per selectivity")
    parser.add_argument("--out", type=Path, help="where to write the JSON (default: results/filtered-DATE.json)")
    args = parser.parse_args()
    n = args.n or (100_000 if args.quick else 1_000_000)
    threads = ann.configure_threads(DIM)
    vectors = clustered_unit_vectors(n, DIM, clusters=n // 100, seed=0)
    queries = clustered_unit_vectors(500 + args.queries, DIM, clusters=n // 100, seed=0, draw=1)
    ids = np.arange(n, dtype=np.int64)
    plan = ann.choose_index(n, DIM)
    start = time.perf_counter()
    index = ann.new_index(plan.factory, DIM)
    ann.train_index(index, vectors[ann.sample_ids(ids, ann.training_size(plan.factory, n), 0)])
    ann.add_chunks(index, ann.iter_array_chunks(ids, vectors))
    tune_truth = ann.GroundTruth.compute(queries[:500], np.full(500, -1), ann.iter_array_chunks(ids, vectors))
    tuning = ann.tune(index, tune_truth)
    print(f"{n:,} x {DIM}: {plan.kind} ({plan.factory}) built and tuned in {time.perf_counter() - start:.0f} s: "
          f"{tuning.param} {tuning.value}, recall@10 {tuning.recall_at_10:.3f}; {threads} threads", flush=True)
    searchable = ann.SearchableIndex(index)
    test = queries[500:]
    rows = []
    for fraction in SELECTIVITIES:
        kept = ids if fraction == 1 else ann.sample_ids(ids, max(1, round(fraction * n)), 7)
        truth_scores, truth_ids = ann.exact_top(test, ann.iter_array_chunks(kept, vectors[kept]), K)
        kept_set = set(kept.tolist()) if fraction < 1 else None

        def ours(q: np.ndarray, kept: np.ndarray = kept) -> np.ndarray:
            return searchable.search(q, K, kept)[1][0]

        def post_filter(q: np.ndarray, kept_set: set | None = kept_set) -> np.ndarray:
            found = searchable.search(q, min(n, POST_FILTER_FACTOR * K))[1][0]
            return found if kept_set is None else np.array([i for i in found if i in kept_set], dtype=np.int64)

        def pre_filter(q: np.ndarray, kept: np.ndarray = kept) -> np.ndarray:
            scores = vectors[kept] @ q[0]
            top = np.argpartition(-scores, min(K, len(kept) - 1))[:K]
            return kept[top[np.argsort(-scores[top])]]

        row: dict = {"fraction": fraction, "kept": int(kept.size)}
        row["plan"] = searchable.plan(kept).describe()
        for name, search, count in (("ours", ours, len(test)), ("post_filter", post_filter, len(test)),
                                    ("pre_filter", pre_filter, len(test) if fraction <= 0.01 else 20)):
            p50, found = timed_each(test[:count], search)
            row[name] = {"p50_ms": p50, "recall_at_10": round(recall(found, truth_ids[:count], truth_scores[:count]), 4)}
        rows.append(row)
        print(f"keeps {100 * fraction:g}% ({kept.size:,}): {row['plan']}\n"
              f"  ours        p50 {row['ours']['p50_ms']:8.2f} ms  recall@10 {row['ours']['recall_at_10']:.3f}\n"
              f"  post-filter p50 {row['post_filter']['p50_ms']:8.2f} ms  recall@10 "
              f"{row['post_filter']['recall_at_10']:.3f}\n"
              f"  pre-filter  p50 {row['pre_filter']['p50_ms']:8.2f} ms  recall@10 {row['pre_filter']['recall_at_10']:.3f}"
              f"  ({row['pre_filter']['p50_ms'] / row['ours']['p50_ms']:.1f}x ours' time)", flush=True)
    lowest = min(r["ours"]["recall_at_10"] for r in rows)
    print(f"ours: lowest recall@10 {lowest:.3f} over {len(rows)} selectivities "
          f"({'meets' if lowest >= ann.TARGET_RECALL else 'MISSES'} the target {ann.TARGET_RECALL})")
    record = {"benchmark": "filtered", "date": dt.date.today().isoformat(), "n": n, "dim": DIM, "threads": threads,
              "index": {"kind": plan.kind, "factory": plan.factory, "tuning": tuning.to_dict()},
              "queries": len(test), "post_filter_factor": POST_FILTER_FACTOR, "target_recall": ann.TARGET_RECALL,
              "exact_max_kept": ann.EXACT_MAX_KEPT, "exact_max_fraction": ann.EXACT_MAX_FRACTION,
              "data": f"clustered_unit_vectors(n, {DIM}, clusters={n // 100}, seed=0); kept ids: a random sample",
              "selectivities": rows, "lowest_recall": lowest}
    save_result("filtered", record, args.out, args.quick)


if __name__ == "__main__":
    main()
