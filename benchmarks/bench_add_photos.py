"""Adding the day's photos as a user does: `clipengine index FOLDER` in a fresh process, torch-free vs torch.

Two indexes of 200 generated photos are built through the library, each with its exported (verified)
towers: the shipped `tiny` model and ViT-B-32 with random weights (`--pretrained none`: they cost what
trained ones do). Then, for 1, 10 and 100 new 12-megapixel JPEGs (phone photos: a few MB each, new content
each time), and 10 new 640x480 ones (light decoding: the model's own cost shows), alternating the two paths
in every round so that both see the same machine load:
  * ours:       `clipengine index FOLDER --index I`, the runtime chosen by measurement: torch-free for a few
    photos (PIL + numpy preprocessing, onnxruntime, never importing torch: clipengine.index.onnx_embed)
  * torch:      `... --runtime torch`: what every run paid before, importing torch and open_clip and loading
    the model (a run with the ONNX tower used to import them too, then embed with onnxruntime)
  * the floor:  the same command over a folder with nothing new (imports, scan, no model), and `python -c pass`
  * where the time goes: `-X importtime` of one run adding 10 photos, by top-level package
Target (2 cores): adding 10 photos to the ViT-B-32 index in <= 1.5 s.

    python benchmarks/bench_add_photos.py            # 3 rounds (about 15 minutes on 2 cores)
    python benchmarks/bench_add_photos.py --quick    # 2 rounds, 1 and 10 photos (checks that it runs)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_cold_search import user_env  # benchmarks/ is on sys.path when a script runs

TARGET_S, TARGET_COUNT, TARGET_MODEL = 1.5, 10, "ViT-B-32"
SIZES = {"12 MP": (4032, 3024), "640x480": (640, 480)}


def run(args: list[str], importtime: bool = False) -> tuple[float, subprocess.CompletedProcess]:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, *(["-X", "importtime"] if importtime else []), "-m", "clipengine", *args],
                            capture_output=True, text=True, env=user_env())
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"clipengine {' '.join(args)} failed: {result.stderr[-2000:]}")
    return elapsed, result


def import_split(stderr: str) -> dict[str, float]:
    """Seconds of import by top-level package (`-X importtime`'s unindented lines), largest first."""
    totals: dict[str, float] = {}
    for line in stderr.splitlines():
        fields = line[len("import time:"):].split("|") if line.startswith("import time:") else []
        if len(fields) == 3 and fields[1].strip().isdigit() and not fields[2][1:2].isspace():  # not nested
            top = fields[2].strip().split(".")[0]
            totals[top] = totals.get(top, 0.0) + int(fields[1]) / 1e6
    return dict(sorted(totals.items(), key=lambda item: -item[1]))


class NewPhotos:
    """JPEGs of one size written once; each call copies `n` of them with distinct bytes after the image (new
    content, the same decoding cost), into a new folder under the indexed one."""

    made = 0

    def __init__(self, root: Path, distinct: int, size: tuple[int, int]):
        from synthetic import write_photo_folder

        self.pool = write_photo_folder(root / f"pool-{size[0]}x{size[1]}", distinct, size)

    def add(self, folder: Path, n: int) -> None:
        target = folder / f"day-{self.made:05d}"
        target.mkdir()
        for i in range(n):
            data = self.pool[i % len(self.pool)].read_bytes()
            assert data.endswith(b"\xff\xd9")
            (target / f"IMG_{i:04d}.jpg").write_bytes(data + f"clipengine bench {self.made}-{i}".encode())
        NewPhotos.made += 1


def build(root: Path, n: int) -> dict[str, tuple[Path, Path]]:
    """Each index made by `clipengine index` in a fresh process, as a user makes it: that run also measures
    what loading torch costs here, which the runtime choice of later runs weighs."""
    from synthetic import write_photo_folder

    built = {}
    for name, model in (("tiny", ["--model", "tiny"]), ("ViT-B-32", ["--model", "ViT-B-32", "--pretrained", "none"])):
        photos = root / f"photos-{name}"
        write_photo_folder(photos, n, (640, 480))
        elapsed, result = run(["index", str(photos), "--index", str(root / name), *model, "--json"])
        image = json.loads(result.stdout)["query_encoders"]["image"]
        print(f"indexed {n} photos with {name} in {elapsed:.0f} s (image tower {image['status']}, "
              f"{image.get('speed', {}).get('ms_per_image')} ms/image)", flush=True)
        built[name] = (photos, root / name)
    return built


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, help="rounds of each measurement (default 3; --quick 2)")
    parser.add_argument("--out", type=Path, help="where to write the JSON (default: results/add_photos-DATE.json)")
    args = parser.parse_args()
    rounds = args.rounds or (2 if args.quick else 3)
    runs = [("12 MP", n) for n in ((1, 10) if args.quick else (1, 10, 100))] + [("640x480", TARGET_COUNT)]
    from results_file import save_result

    result: dict = {"date": dt.date.today().isoformat(), "cores": os.cpu_count(), "rounds": rounds,
                    "sizes": {k: list(v) for k, v in SIZES.items()}, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        built = build(root, 60 if args.quick else 200)
        pools = {name: NewPhotos(root, 20 if name == "12 MP" else 10, size) for name, size in SIZES.items()}
        python_s = statistics.median(_python_start() for _ in range(rounds))
        for name, (folder, index) in built.items():
            record: dict = {"added": {}}
            noop = [run(["index", str(folder), "--index", str(index), "--json"])[0] for _ in range(rounds)]
            for size, n in runs:
                photos = pools[size]
                times: dict[str, list[float]] = {"onnx": [], "torch": []}
                runtimes: dict[str, str] = {}
                for _ in range(rounds):  # interleaved: both paths see the same load
                    for runtime in ("onnx", "torch"):
                        photos.add(folder, n)
                        asked = ["--runtime", "torch"] if runtime == "torch" else []  # ours: the default
                        elapsed, out = run(["index", str(folder), "--index", str(index), *asked, "--json"])
                        report = json.loads(out.stdout)
                        assert report["embedded"] == n, out.stdout[:500]
                        times[runtime].append(elapsed)
                        runtimes[runtime] = report["runtime"]
                med = {k: statistics.median(v) for k, v in times.items()}
                record["added"][f"{n} {size}"] = {"ours_s": med["onnx"], "torch_s": med["torch"],
                                           "speedup": med["torch"] / med["onnx"], "chosen": runtimes["onnx"],
                                           "all_s": times}
                print(f"{name}: adding {n:>3} {size} photos {med['onnx']:.2f} s ours, {med['torch']:.2f} s with torch "
                      f"({med['torch'] / med['onnx']:.1f}x); ours ran {runtimes['onnx']}", flush=True)
            pools["12 MP"].add(folder, TARGET_COUNT)
            _, traced = run(["index", str(folder), "--index", str(index), "--json"], importtime=True)
            record.update(noop_s=statistics.median(noop), python_start_s=python_s, imports_s=import_split(traced.stderr))
            if name == TARGET_MODEL:
                record["target"] = {"count": TARGET_COUNT, "seconds": TARGET_S, **{
                    size: record["added"][f"{TARGET_COUNT} {size}"]["ours_s"] <= TARGET_S for size in SIZES}}
            print(f"{name}: floor {record['noop_s']:.2f} s (nothing new; python alone {python_s:.2f} s); imports of "
                  f"adding {TARGET_COUNT}: " + ", ".join(f"{k} {v:.2f}" for k, v in list(record["imports_s"].items())[:6]),
                  flush=True)
            result["models"][name] = record
            shutil.rmtree(index, ignore_errors=True)
    for size in SIZES:
        ours = result["models"][TARGET_MODEL]["added"][f"{TARGET_COUNT} {size}"]["ours_s"]
        print(f"{TARGET_MODEL}: adding {TARGET_COUNT} {size} photos {ours:.2f} s: target {TARGET_S} s "
              f"{'met' if ours <= TARGET_S else 'NOT met'}")
    save_result("add_photos", result, args.out, args.quick)


def _python_start() -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True, env=user_env())
    return time.perf_counter() - started


if __name__ == "__main__":
    main()
