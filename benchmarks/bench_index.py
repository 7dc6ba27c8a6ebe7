"""Indexing throughput, memory and no-op speed of `clipengine index`, side by side in one run.

For a folder of generated 12-megapixel JPEGs and one of 640x480 JPEGs, with ViT-B-32 (random weights:
they cost exactly what trained ones do), it measures images/s of:
  ceiling  the model alone on ready tensors, in batches of the same size (nothing can beat this)
  naive    the loop a user would write: PIL open -> open_clip preprocess -> model, one image at a time
  ours     clipengine's index_folder (scan, hash, decode, embed, commit, faiss), model already loaded
and prints ours/ceiling and ours/naive. Then, with the tiny model (memory flatness is a property of the
pipeline, not the model), the peak RSS of indexing 1k and 10k images, and the wall time of
`clipengine index` over the 10k unchanged files, as a user runs it (a fresh process).

Targets (on the 2-core CPU): ours >= 0.85x ceiling on 12 MP JPEGs, >= 1.4x naive; peak RSS flat
from 1k to 10k; no-op re-index of 10k files < 3 s.

    python benchmarks/bench_index.py            # full run, ~25 minutes here the first time
    python benchmarks/bench_index.py --quick    # small folders, to check the script
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from results_file import save_result  # benchmarks/ is on sys.path when a script runs
from synthetic import write_photo_folder

from clipengine.index.pipeline import index_folder
from clipengine.models import ModelSpec, load_model

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "bench"


def folder_of(name: str, n: int, size: tuple[int, int], seed: int) -> Path:
    """A cached folder of `n` generated JPEGs (generation of 12 MP photos takes a while)."""
    folder = DATA / name
    have = sorted(folder.glob("*.jpg")) if folder.is_dir() else []
    if len(have) != n:
        shutil.rmtree(folder, ignore_errors=True)
        print(f"  generating {n} {size[0]}x{size[1]} JPEGs in {folder} ...", flush=True)
        write_photo_folder(folder, n, size, seed=seed)
    return folder


def ceiling(model, n: int, batch: int) -> float:
    """Images/s of the model alone on ready, normalised tensors."""
    x = torch.randn(batch, 3, model.image_size, model.image_size)
    with torch.inference_mode():
        model.model.encode_image(x)  # warm-up
        started = time.perf_counter()
        done = 0
        while done < n:
            model.model.encode_image(x)
            done += batch
    return done / (time.perf_counter() - started)


def decode_cost(model, paths: list[Path]) -> float:
    """CPU seconds per image of one decode worker's work (read, hash, draft-decode, resize), measured
    in this process on one core. With the model's cost it gives the best any pipeline can do here:
    every image needs cores/ceiling core-seconds of model plus this much decoding."""
    from clipengine.embed import ImageFiles, split_transform

    pil_part, _ = split_transform(model.image_transform())
    files = ImageFiles([str(p) for p in paths], pil_part, draft_size=model.image_size)
    files[0]
    started = time.process_time()
    for i in range(len(files)):
        files[i]
    return (time.process_time() - started) / len(files)


def naive(model, paths: list[Path]) -> float:
    """Images/s of the obvious loop: one image at a time through open_clip's own preprocess."""
    preprocess = model.image_transform()
    started = time.perf_counter()
    with torch.inference_mode():
        for p in paths:
            x = preprocess(Image.open(p).convert("RGB")).unsqueeze(0)
            f = model.model.encode_image(x)
            torch.nn.functional.normalize(f, dim=-1)
    return len(paths) / (time.perf_counter() - started)


def ours(model, folder: Path, n: int, batch: int, workers: int | None) -> float:
    """Images/s of clipengine's indexing of the whole folder into a fresh index."""
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        report = index_folder(folder, Path(tmp) / "idx", model=model, batch_size=batch, workers=workers)
        seconds = time.perf_counter() - started
    assert report.embedded == n and report.count == n, report
    return n / seconds


RSS_SCRIPT = """
import json, sys
from clipengine.index.pipeline import index_folder
from clipengine.models import ModelSpec
r = index_folder(sys.argv[1], sys.argv[2], ModelSpec(arch="tiny"))
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({"count": r.count, "main_peak_mb": hwm / 1024}))
"""


def peak_rss(folder: Path, index: Path) -> dict:
    """Peak memory of indexing a folder in a fresh process: the main process's own high-water mark,
    and the peak of main + decode workers together, sampled every 20 ms (shared library pages are
    counted once per process, so the total overstates, but equally at every folder size)."""
    import psutil

    proc = subprocess.Popen([sys.executable, "-c", RSS_SCRIPT, str(folder), str(index)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    watched = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            tree = [watched, *watched.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree))
        except psutil.Error:
            pass
        time.sleep(0.02)
    out, _ = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"indexing {folder} failed")
    result = json.loads(out.strip().splitlines()[-1])
    return {**result, "tree_peak_mb": peak / 2**20}


def noop_seconds(folder: Path, index: Path, repeats: int = 3) -> float:
    """Median wall time of `clipengine index` on an unchanged folder, as a user runs it."""
    exe = Path(sys.executable).with_name("clipengine")
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        out = subprocess.run([str(exe), "index", str(folder), "--index", str(index), "--json"], check=True,
                             capture_output=True, text=True)
        times.append(time.perf_counter() - started)
        report = json.loads(out.stdout)
        assert report["embedded"] == 0 and report["reused"] == 0, report
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small folders, to check the script runs")
    ap.add_argument("--out", type=Path, help="where to write the JSON (default: results/index-DATE.json)")
    ap.add_argument("--workers", type=int, default=None, help="decode workers for ours (default: clipengine's)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: clipengine's for the CPU")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved repeats of ceiling and ours")
    args = ap.parse_args()
    n12, n640, n_naive12, rss_sizes = (16, 64, 4, (100, 400)) if args.quick else (192, 512, 24, (1000, 10000))
    from clipengine.embed import default_batch_size

    batch = args.batch_size or default_batch_size(torch.device("cpu"))
    cores = torch.get_num_threads()

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores", flush=True)
    folders = {
        "12 MP JPEG (4000x3000)": folder_of("jpeg-12mp", n12, (4000, 3000), seed=0),
        "640x480 JPEG": folder_of("jpeg-640", n640, (640, 480), seed=10_000),
    }
    model = load_model(ModelSpec("ViT-B-32", "none"), device="cpu")
    rows = []
    for label, folder in folders.items():
        paths = sorted(folder.glob("*.jpg"))
        n = len(paths)
        print(f"{label}: {n} images", flush=True)
        cs, os_ = [], []
        for r in range(args.rounds):  # interleaved, so that a noisy neighbour hits both alike
            cs.append(ceiling(model, n, batch))
            os_.append(ours(model, folder, n, batch, args.workers))
            print(f"  round {r + 1}: ceiling {cs[-1]:6.2f} img/s, ours {os_[-1]:6.2f} img/s", flush=True)
        c, o = statistics.median(cs), statistics.median(os_)
        nv = naive(model, paths[: n_naive12 if "12 MP" in label else min(n, 96)])
        print(f"  naive   {nv:6.2f} img/s", flush=True)
        d = decode_cost(model, paths[:24])
        bound = 1 / (1 + d * c / cores)
        print(f"  decode  {d * 1000:6.1f} ms CPU per image -> best possible on {cores} cores: {bound:.2f}x ceiling",
              flush=True)
        rows.append({"folder": label, "images": n, "ceiling_img_s": round(c, 2), "ours_img_s": round(o, 2),
                     "naive_img_s": round(nv, 2), "ours_vs_ceiling": round(o / c, 3), "ours_vs_naive": round(o / nv, 2),
                     "decode_ms_per_image": round(d * 1000, 1), "bound_vs_ceiling": round(bound, 3),
                     "ours_vs_bound": round(o / c / bound, 3), "rounds": {"ceiling": cs, "ours": os_}})

    small_n, large_n = rss_sizes
    large = folder_of(f"jpeg-small-{large_n}", large_n, (256, 192), seed=50_000)
    small = DATA / f"jpeg-small-{small_n}"
    if not small.is_dir() or len(list(small.glob("*.jpg"))) != small_n:
        shutil.rmtree(small, ignore_errors=True)
        small.mkdir(parents=True)
        for p in sorted(large.glob("*.jpg"))[:small_n]:
            os.link(p, small / p.name)
    with tempfile.TemporaryDirectory() as tmp:
        rss = {}
        for n, folder in ((small_n, small), (large_n, large)):
            rss[n] = peak_rss(folder, Path(tmp) / f"idx{n}")
            print(f"  peak memory indexing {n} images (tiny): main process {rss[n]['main_peak_mb']:.0f} MB, "
                  f"main + workers {rss[n]['tree_peak_mb']:.0f} MB", flush=True)
        noop = noop_seconds(large, Path(tmp) / f"idx{large_n}")
        print(f"  no-op re-index of {large_n} unchanged files: {noop:.2f} s", flush=True)

    result = {
        "date": dt.date.today().isoformat(),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__},
        "model": "ViT-B-32 (random weights)", "batch_size": batch, "quick": args.quick,
        "throughput": rows,
        "peak_rss_mb": {str(n): r for n, r in rss.items()},
        "noop_reindex_seconds": {str(large_n): round(noop, 3)},
    }
    print("\n| folder | ceiling img/s | ours img/s | naive img/s | ours / ceiling | best possible / ceiling "
          "| ours / naive |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['folder']} | {row['ceiling_img_s']} | {row['ours_img_s']} | {row['naive_img_s']} | "
              f"{row['ours_vs_ceiling']:.2f}x | {row['bound_vs_ceiling']:.2f}x | {row['ours_vs_naive']:.2f}x |")
    print(f"\npeak memory (tiny model), main process / main + workers: {small_n} images "
          f"{rss[small_n]['main_peak_mb']:.0f} / {rss[small_n]['tree_peak_mb']:.0f} MB; {large_n} images "
          f"{rss[large_n]['main_peak_mb']:.0f} / {rss[large_n]['tree_peak_mb']:.0f} MB")
    print(f"no-op re-index of {large_n} unchanged files: {noop:.2f} s")
    save_result("index", result, args.out, args.quick)


if __name__ == "__main__":
    main()
