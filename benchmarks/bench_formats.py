"""Phone and camera formats against JPEG, side by side in one run: what reading a 12 MP HEIC costs next to
the same picture as a 12 MP JPEG, and what a camera RAW file costs demosaiced next to decoding a preview.

Decode: `open_image` as indexing calls it (draft_size 224, the model's input), one process, rounds
interleaved so that every format sees the same machine load; ms per image is the median over rounds.
  - 12 MP (4000x3000) photo-like pictures, saved as JPEG (quality 90) and as HEIC (quality 80).
  - a 24 MP DNG (an RGGB mosaic written by PiDNG, no embedded preview): LibRaw's half-size demosaic, which is
    what clipengine does without a preview, against decoding a 1620x1080 JPEG, the size of a typical
    camera's embedded preview, which is what it does with one.
Indexing: `index_folder` end to end with the shipped tiny model (so the decode dominates), images/s.

Recall: a tiny model trained on the captioned scenes, its held-out scenes read through each route a RAW
file takes: the embedded preview (a 256 px JPEG of the scene) against LibRaw's full demosaic of a 512 px
RGGB mosaic of it (linearised, through PiDNG). No registry ships captioned camera RAW photos, so the
mosaics are made from captioned pictures.

    python benchmarks/bench_formats.py            # 8 pictures, 3 rounds
    python benchmarks/bench_formats.py --quick    # 2 pictures, 1 round
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import statistics
import tempfile
import time
from pathlib import Path

from PIL import Image
from results_file import save_result  # benchmarks/ is on sys.path when a script runs
from synthetic import write_dng, write_dng_of  # tests/ is, through results_file

from clipengine.images import Decoded, open_image
from clipengine.index.pipeline import index_folder
from clipengine.models import ModelSpec, load_model
from clipengine.scenes import photo_like


def _heif_bytes(image, quality: int) -> bytes:
    import pillow_heif

    pillow_heif.register_heif_opener()
    buffer = io.BytesIO()
    image.save(buffer, "HEIF", quality=quality)
    return buffer.getvalue()


def _jpeg_bytes(image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def decode_ms(paths: list[Path]) -> float:
    started = time.perf_counter()
    for path in paths:
        assert isinstance(open_image(path, draft_size=224), Decoded), path
    return (time.perf_counter() - started) * 1000 / len(paths)


def raw_recall(root: Path, quick: bool) -> dict:
    """Held-out recall of a tiny model trained on the captioned scenes, its test scenes read as a camera's RAW
    file is read in each way: the embedded preview (a 256 px JPEG), or the sensor data (a 512 px RGGB mosaic,
    linearised, written by PiDNG) demosaiced in full by LibRaw."""
    import csv

    from scene_model import tiny_trained_on_scenes

    from clipengine.evaluation.retrieval import retrieval_benchmark

    run, test_set = tiny_trained_on_scenes(root, quick, 60 if quick else 300)
    with open(test_set, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))[1:]
    out: dict[str, dict] = {}
    for route, suffix in (("preview", ".jpg"), ("demosaic", ".dng")):
        folder = root / f"raw-{route}"
        folder.mkdir()
        for name in sorted({r[0] for r in rows}):
            picture = Image.open(test_set.parent / name).convert("RGB")
            target = folder / Path(name).with_suffix(suffix).name
            if route == "preview":
                picture.resize((256, 256), Image.Resampling.LANCZOS).save(target, "JPEG", quality=90)
            else:
                write_dng_of(picture.resize((512, 512), Image.Resampling.LANCZOS), target)
        with open(folder / "captions.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["filepath", "caption"])
            writer.writerows((Path(n).with_suffix(suffix).name, c) for n, c in rows)
        metrics = retrieval_benchmark(folder / "captions.csv", spec=ModelSpec(checkpoint=str(run))).metrics
        out[route] = {k: round(v, 4) for k, v in metrics.items()}
        print(f"  {route:9s} " + "  ".join(f"{k} {100 * v:.1f}" for k, v in sorted(metrics.items())), flush=True)
    out["demosaic_minus_preview_points"] = {k: round(100 * (out["demosaic"][k] - v), 2) for k, v in out["preview"].items()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    n, rounds = (2, 1) if args.quick else (8, 3)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folders = {"jpeg": root / "jpeg", "heic": root / "heic", "raw": root / "raw", "preview": root / "preview"}
        for folder in folders.values():
            folder.mkdir()
        print(f"generating {n} 12 MP pictures as JPEG and HEIC, {n} 24 MP DNGs ...", flush=True)
        for i in range(n):
            picture = photo_like(4000, 3000, seed=i)
            (folders["jpeg"] / f"{i}.jpg").write_bytes(_jpeg_bytes(picture, 90))
            (folders["heic"] / f"{i}.heic").write_bytes(_heif_bytes(picture, 80))
            (folders["preview"] / f"{i}.jpg").write_bytes(_jpeg_bytes(picture.resize((1620, 1080)), 90))
            write_dng(folders["raw"] / f"{i}.dng", 6000, 4000)
        paths = {name: sorted(folder.iterdir()) for name, folder in folders.items()}
        timings: dict[str, list[float]] = {name: [] for name in folders}
        for r in range(rounds):
            for name in folders:
                timings[name].append(decode_ms(paths[name]))
            print(f"  round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f} ms" for k, v in timings.items()), flush=True)
        decode = {name: round(statistics.median(v), 1) for name, v in timings.items()}
        model = load_model(ModelSpec(arch="tiny"), device="cpu")
        indexing = {}
        for name in ("jpeg", "heic"):
            report = index_folder(folders[name], root / f"idx-{name}", model=model, workers=2, export=False)
            indexing[name] = round(report.images_per_second, 2)
        recall = raw_recall(root, args.quick)
    record = {
        "benchmark": "formats", "date": dt.date.today().isoformat(), "quick": args.quick, "pictures": n,
        "rounds": rounds, "decode_ms": decode,
        "heic_over_jpeg_decode": round(decode["heic"] / decode["jpeg"], 2),
        "raw_demosaic_over_preview": round(decode["raw"] / decode["preview"], 1),
        "index_images_per_second_tiny": indexing, "raw_recall": recall,
    }
    print(f"12 MP decode: JPEG {decode['jpeg']} ms, HEIC {decode['heic']} ms ({record['heic_over_jpeg_decode']}x)")
    print(f"24 MP RAW: demosaic {decode['raw']} ms, preview {decode['preview']} ms "
          f"({record['raw_demosaic_over_preview']}x)")
    print(f"index (tiny, 2 workers): JPEG {indexing['jpeg']} img/s, HEIC {indexing['heic']} img/s")
    save_result("formats", record, args.out, args.quick)


if __name__ == "__main__":
    main()
