"""Recall@k at gallery scale: clipengine's chunked pass against CLIP_benchmark's dense score matrix.

Random unit vectors (dim 512, as ViT-B-32's) stand in for embeddings: the cost of recall@k does not
depend on what the vectors mean. Each method runs in a fresh process, so its peak memory is its own.
  side by side  N images x 5N captions, small enough for the dense way: time, peak RSS, and that both
                give the same numbers
  at scale      100,000 images x 500,000 captions (ours only: the dense matrix would need 200 GB)

    python benchmarks/bench_recall.py                 # ~15 minutes on 2 cores
    python benchmarks/bench_recall.py --quick         # to check the script
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from results_file import save_result  # benchmarks/ is on sys.path when a script runs

DIM = 512
KS = (1, 5, 10)


def make_set(n_images: int, n_captions: int, seed: int = 0):
    """Captions near their image, so that recall is neither 0 nor 1."""
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((n_images, DIM), dtype=np.float32)
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    owners = np.arange(n_captions) % n_images
    texts = np.empty((n_captions, DIM), np.float32)
    for begin in range(0, n_captions, 50_000):
        end = min(begin + 50_000, n_captions)
        block = images[owners[begin:end]] + 0.06 * rng.standard_normal((end - begin, DIM), dtype=np.float32)
        texts[begin:end] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return images, texts, owners


def clip_benchmark_recall(images, texts, owners) -> dict:
    """CLIP_benchmark's zeroshot_retrieval.evaluate after embedding: dense scores, dense positives."""
    import torch
    from clip_benchmark.metrics.zeroshot_retrieval import batchify, recall_at_k

    image_t, text_t = torch.from_numpy(images), torch.from_numpy(texts)
    scores = text_t @ image_t.t()
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(scores)), torch.from_numpy(owners)] = True
    out = {}
    for k in KS:
        out[f"text_to_image_R@{k}"] = (batchify(recall_at_k, scores, positive, 64, "cpu", k=k) > 0).float().mean().item()
        out[f"image_to_text_R@{k}"] = (batchify(recall_at_k, scores.T, positive.T, 64, "cpu", k=k) > 0).float().mean().item()
    return out


def worker(method: str, n_images: int, n_captions: int) -> None:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    images, texts, owners = make_set(n_images, n_captions)
    base_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    started = time.perf_counter()
    if method == "ours":
        from clipengine.metrics import retrieval_recall

        metrics = retrieval_recall(images, texts, owners, KS)
    else:
        metrics = clip_benchmark_recall(images, texts, owners)
    seconds = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"method": method, "images": n_images, "captions": n_captions, "seconds": seconds,
                      "peak_rss_mb": peak_mb, "embeddings_mb": base_mb, "working_mb": peak_mb - base_mb,
                      "metrics": metrics}))


def measure(method: str, n_images: int, n_captions: int) -> dict:
    done = subprocess.run([sys.executable, __file__, "--worker", method, str(n_images), str(n_captions)],
                          check=True, capture_output=True, text=True)
    record = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"  {method:15s} {n_images:>7} x {n_captions:>7}: {record['seconds']:8.1f} s, peak RSS "
          f"{record['peak_rss_mb']:7.0f} MB (embeddings and set-up {record['embeddings_mb']:.0f} MB)", flush=True)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, help="where to write the JSON (default: results/recall-DATE.json)")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], int(args.worker[1]), int(args.worker[2]))
        return
    small, large = ((1000, 5000), (4000, 20000)) if args.quick else ((5000, 25000), (100_000, 500_000))
    print(f"recall@{','.join(map(str, KS))}, dim {DIM}, {os.cpu_count()} cores", flush=True)
    ours_small = measure("ours", *small)
    theirs_small = measure("clip_benchmark", *small)
    agree = all(abs(ours_small["metrics"][k] - theirs_small["metrics"][k]) < 1e-6 for k in ours_small["metrics"])
    at_scale = measure("ours", *large)
    result = {
        "date": dt.date.today().isoformat(), "cores": os.cpu_count(), "dim": DIM, "quick": args.quick,
        "side_by_side": {"ours": ours_small, "clip_benchmark": theirs_small, "same_metrics": agree,
                         "speedup": theirs_small["seconds"] / ours_small["seconds"],
                         "working_memory_ratio": theirs_small["working_mb"] / max(1.0, ours_small["working_mb"])},
        "at_scale": at_scale,
    }
    s = result["side_by_side"]
    print(f"\n{small[0]} x {small[1]}: ours {s['ours']['seconds']:.1f} s vs CLIP_benchmark "
          f"{s['clip_benchmark']['seconds']:.1f} s ({s['speedup']:.1f}x faster), working memory "
          f"{s['ours']['working_mb']:.0f} vs {s['clip_benchmark']['working_mb']:.0f} MB; same metrics: {agree}")
    print(f"{large[0]} x {large[1]}: {at_scale['seconds']:.0f} s, peak RSS {at_scale['peak_rss_mb']:.0f} MB "
          f"(of which embeddings and set-up {at_scale['embeddings_mb']:.0f} MB)")
    save_result("recall", result, args.out, args.quick)


if __name__ == "__main__":
    main()
