"""What reading metadata costs a scan, per 10,000 files: the unchanged re-scan against the run that reads it.

A folder of 10,000 photo-like 256x192 JPEGs with real EXIF (taken time with offset, camera, GPS on a walk
through ten cities), indexed once with the tiny model. Then, in fresh processes as a user runs them,
interleaved over 3 rounds:
  unchanged   `clipengine index` over the unchanged folder: metadata was read while decoding, so this is
              today's scan (walk, stat, compare) and nothing more;
  back-fill   the same run on a copy of the index with its metadata and places dropped (an index made
              before they were kept): it reads every file's header and names every position, once.
And in-process, the split of the back-fill: headers alone (`video.metadata_of`) and place naming alone.

    python benchmarks/bench_metadata_scan.py            # 10,000 files (about 4 minutes here)
    python benchmarks/bench_metadata_scan.py --quick    # 1,000
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results_file import save_result  # benchmarks/ is on sys.path when a script runs
from test_metadata import exif_of

from clipengine.index.pipeline import index_folder
from clipengine.models import ModelSpec
from clipengine.places import name_places
from clipengine.scenes import photo_like

CITIES = [(52.52, 13.405), (48.8566, 2.3522), (35.6595, 139.7005), (-33.8568, 151.2153), (40.758, -73.9855),
          (51.5007, -0.1246), (41.9028, 12.4964), (55.7558, 37.6173), (-22.9068, -43.1729), (1.3521, 103.8198)]


def write_folder(folder: Path, n: int) -> None:
    folder.mkdir(parents=True)
    for i in range(n):
        lat, lon = CITIES[i % len(CITIES)]
        step = (i // len(CITIES)) * 1e-4  # a walk: each photo a few metres on
        taken = (dt.datetime(2023, 1, 1) + dt.timedelta(minutes=17 * i)).strftime("%Y:%m:%d %H:%M:%S")
        exif = exif_of(taken, "+01:00", "Google", f"Pixel {6 + i % 3}", gps=(lat + step, lon + step))
        photo_like(256, 192, seed=i).save(folder / f"img_{i:05d}.jpg", "JPEG", quality=85, exif=exif.tobytes())


def timed_run(folder: Path, index: Path) -> tuple[float, dict]:
    exe = Path(sys.executable).with_name("clipengine")
    start = time.perf_counter()
    out = subprocess.run([str(exe), "index", str(folder), "--index", str(index), "--json"], check=True,
                         capture_output=True, text=True)
    return time.perf_counter() - start, json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, help="where to write the JSON (default: results/metadata_scan-DATE.json)")
    args = parser.parse_args()
    n = 1000 if args.quick else 10_000
    with tempfile.TemporaryDirectory() as tmp:
        folder, index = Path(tmp) / "photos", Path(tmp) / "idx"
        start = time.perf_counter()
        write_folder(folder, n)
        print(f"{n:,} JPEGs with EXIF and GPS written in {time.perf_counter() - start:.0f} s", flush=True)
        start = time.perf_counter()
        index_folder(folder, index, ModelSpec(arch="tiny"), export=False)
        print(f"indexed (tiny) in {time.perf_counter() - start:.0f} s", flush=True)
        timed_run(folder, index)  # the first run exports the query encoders, as a new index's first run does
        unchanged, backfill = [], []
        for _ in range(3):
            seconds, report = timed_run(folder, index)
            assert report["embedded"] == 0 and report["metadata_read"] == 0, report
            unchanged.append(seconds)
            old = Path(tmp) / "old"
            shutil.rmtree(old, ignore_errors=True)
            shutil.copytree(index, old)
            with sqlite3.connect(old / "meta.sqlite") as db:
                db.execute("DELETE FROM media")
                db.execute("DROP TABLE places")
            seconds, report = timed_run(folder, old)
            assert report["embedded"] == 0 and report["metadata_read"] == n and report["places_named"] == n, report
            backfill.append(seconds)
        from clipengine.video import metadata_of

        paths = sorted(folder.glob("*.jpg"))
        start = time.perf_counter()
        infos = [metadata_of(p)[0] for p in paths]
        headers = time.perf_counter() - start
        start = time.perf_counter()
        name_places([(i.latitude, i.longitude) for i in infos if i.latitude is not None and i.longitude is not None])
        naming = time.perf_counter() - start
    per = 10_000 / n
    record = {"benchmark": "metadata_scan", "date": dt.date.today().isoformat(), "files": n,
              "unchanged_seconds": round(statistics.median(unchanged), 3),
              "backfill_seconds": round(statistics.median(backfill), 3),
              "per_10000": {"unchanged": round(statistics.median(unchanged) * per, 2),
                            "backfill": round(statistics.median(backfill) * per, 2),
                            "headers_in_process": round(headers * per, 2), "naming_in_process": round(naming * per, 2)},
              "rounds": {"unchanged": [round(s, 3) for s in unchanged], "backfill": [round(s, 3) for s in backfill]}}
    p = record["per_10000"]
    print(f"per 10,000 files: unchanged re-scan {p['unchanged']:.2f} s; the run that reads metadata {p['backfill']:.2f} s "
          f"({p['backfill'] / p['unchanged']:.1f}x), of it headers {p['headers_in_process']:.2f} s and naming "
          f"places {p['naming_in_process']:.2f} s in-process")
    save_result("metadata_scan", record, args.out, args.quick)


if __name__ == "__main__":
    main()
