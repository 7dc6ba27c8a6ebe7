"""`clipengine duplicates` at 100,000 vectors (dim 512), as a user runs it, against the all-pairs scan.

An index on disk holds clustered unit vectors shaped like CLIP embeddings (tests/synthetic.py) with planted
duplicates: 1,000 near-copies (cosine 0.96-0.99 to their original, as a re-encoded or resized photo) and
500 byte-identical copies (the same content hash). Side by side in one run:
  * `clipengine duplicates --index I --json` in a fresh process: wall time, and which planted pairs it groups
  * the same search by an exact flat range scan (`similar_pairs(exact=True)`): its time, and the pairs the
    approximate search misses
Target (2 cores): under 60 s at 100,000 vectors.

    python benchmarks/bench_duplicates.py            # 100,000 vectors
    python benchmarks/bench_duplicates.py --quick    # 20,000 (checks that it runs)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DIM, THRESHOLD, TARGET_S = 512, 0.95, 60.0


def planted(n: int, seed: int = 0) -> tuple[np.ndarray, list[int], list[tuple[int, int]], list[tuple[int, int]]]:
    """Vectors, each row's content-hash owner (a copy shares its original's), near pairs and exact pairs."""
    from synthetic import clustered_unit_vectors

    rng = np.random.default_rng(seed)
    base = clustered_unit_vectors(n - 1500, DIM, seed=seed)
    originals = rng.choice(len(base), 1500, replace=False)
    near = []
    rows = [base]
    for k, i in enumerate(originals[:1000]):
        noise = rng.standard_normal(DIM).astype(np.float32)
        noise -= (noise @ base[i]) * base[i]
        target = rng.uniform(0.96, 0.99)
        copy = target * base[i] + np.sqrt(1 - target**2) * noise / np.linalg.norm(noise)
        rows.append(copy[None].astype(np.float32))
        near.append((int(i), len(base) + k))
    exact = [(int(i), len(base) + 1000 + k) for k, i in enumerate(originals[1000:])]
    rows.append(base[originals[1000:]])
    owner = list(range(len(base) + 1000)) + [int(i) for i in originals[1000:]]
    return np.concatenate(rows), owner, near, exact


def build(path: Path, vectors: np.ndarray, owner: list[int]) -> None:
    from clipengine.index.store import FileRecord, IndexStore

    source = {"source": "random", "arch": "ViT-B-32", "seed": 0, "identity": "random:ViT-B-32:seed0", "embed_dim": DIM,
              "preprocess": {}}
    with IndexStore.create(path, source) as store:
        for start in range(0, len(vectors), 20_000):
            store.commit([FileRecord(f"/bench/img_{i:07d}.jpg", 1000, 0, f"{owner[i]:064x}", 640, 480, vectors[i])
                          for i in range(start, min(start + 20_000, len(vectors)))])


def grouped(groups: list[dict], pairs: list[tuple[int, int]]) -> int:
    group_of = {f["path"]: g for g, group in enumerate(groups) for f in group["files"]}
    name = "/bench/img_{:07d}.jpg".format
    return sum(group_of.get(name(a), -1) == group_of.get(name(b), -2) for a, b in pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, help="where to write the JSON (default: results/duplicates-DATE.json)")
    args = parser.parse_args()
    from results_file import save_result  # puts tests/ on sys.path

    from clipengine.index.duplicates import similar_pairs

    n = 20_000 if args.quick else 100_000
    vectors, owner, near, exact = planted(n)
    result: dict = {"date": dt.date.today().isoformat(), "cores": os.cpu_count(), "vectors": n, "dim": DIM,
                    "threshold": THRESHOLD, "planted_near": len(near), "planted_exact": len(exact)}
    with tempfile.TemporaryDirectory() as tmp:
        index = Path(tmp) / "idx"
        build(index, vectors, owner)
        started = time.perf_counter()
        run = subprocess.run([sys.executable, "-m", "clipengine", "duplicates", "--index", str(index), "--threshold",
                              str(THRESHOLD), "--json"], capture_output=True, text=True)
        wall = time.perf_counter() - started
        if run.returncode != 0:
            raise SystemExit(run.stderr)
        groups = json.loads(run.stdout)
    result["cli_seconds"] = round(wall, 1)
    result["groups"] = len(groups)
    result["near_pairs_grouped"] = grouped(groups, near)
    result["exact_pairs_grouped"] = grouped(groups, exact)
    result["exact_groups_marked"] = sum(g["exact"] for g in groups)
    print(f"`clipengine duplicates` at {n:,} vectors: {wall:.1f} s; {len(groups)} groups; planted near pairs grouped "
          f"{result['near_pairs_grouped']}/{len(near)}, identical {result['exact_pairs_grouped']}/{len(exact)}",
          flush=True)

    unique = np.asarray(sorted(set(owner)))  # what the command searches: one vector per content
    distinct = vectors[unique] / np.linalg.norm(vectors[unique], axis=1, keepdims=True)
    timings = {}
    found = {}
    for name, exact_scan in (("ivf", False), ("flat", True)):
        started = time.perf_counter()
        found[name] = {tuple(p) for p in similar_pairs(distinct, THRESHOLD, exact=exact_scan).tolist()}
        timings[name] = time.perf_counter() - started
        print(f"similar_pairs {name}: {timings[name]:.1f} s, {len(found[name]):,} pairs", flush=True)
    recall = len(found["ivf"] & found["flat"]) / max(1, len(found["flat"]))
    result["pairs"] = {"ivf_seconds": round(timings["ivf"], 1), "flat_seconds": round(timings["flat"], 1),
                       "ivf_pairs": len(found["ivf"]), "flat_pairs": len(found["flat"]), "ivf_recall": round(recall, 4),
                       "speedup": round(timings["flat"] / timings["ivf"], 1)}
    print(f"the approximate search finds {recall:.2%} of the exact scan's pairs, {result['pairs']['speedup']}x faster; "
          f"target: the command under {TARGET_S:.0f} s: {'met' if wall < TARGET_S else 'NOT met'}")
    save_result("duplicates", result, args.out, args.quick)


if __name__ == "__main__":
    main()
