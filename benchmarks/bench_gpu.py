"""The GPU hot path, measured in one run on a lent GPU machine (about 8 minutes), side by side:

  model    ViT-B-32 alone (random weights: no network there), images/s at batch 256 and 1024 in bf16 and fp16,
           random pixels already on the GPU, after warm-up
  index    `index_folder` end to end on 640x480 and on 12 MP JPEGs (photo-like, generated there), with
           --decode cpu (16-core DataLoader workers) against --decode gpu (nvJPEG); images/s of the embedding
           stage, the whole run's wall time, and the ratio to model-alone at batch 256 bf16
  train    `clipengine train` samples/s for ViT-B-32 at the largest batch that fits (doubled from 256 until a
           step runs out of memory, at most --max-batch), against open_clip_train on the same synthetic data
           (the built-in scenes at 224 px) and settings (bf16, AdamW, same steps); each trainer's own clock
  memory   peak GPU memory of each part

Targets (issue 27): index >= 3,000 images/s end to end from 640x480 JPEGs; >= 0.8x of model-alone from 12 MP
JPEGs with GPU decoding; training >= 1.3x open_clip_train's samples/s.

It writes a JSON file (--out, default results/gpu-DATE.json) and a markdown table beside it (.md).

On the lent machine (no network; torch, torchvision, numpy, pillow, onnxruntime are there):
    python3 scripts/device_wheels.py      # here, once: the missing packages as wheels, into .whl (git-ignored)
    device run, carry [".whl"], timeout 540:
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \\
        .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 && \\
        python3 benchmarks/bench_gpu.py --out $OUT/gpu.json 2>&1 | tee $OUT/log

Rehearsed here, every part at tiny sizes on the CPU, so that only the device can fail it:
    python benchmarks/bench_gpu.py --cpu-rehearsal
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from results_file import save_result  # also puts tests/ on sys.path

ROOT = Path(__file__).resolve().parent.parent
OPEN_CLIP_MAIN = ("import sys, open_clip; open_clip.add_model_config(sys.argv.pop(1)); "
                  "from open_clip_train.main import main; main(sys.argv[1:])")


class Sizes:
    """What each part runs at: the device's sizes, or the rehearsal's."""

    def __init__(self, rehearsal: bool, max_batch: int) -> None:
        self.rehearsal = rehearsal
        self.device = "cpu" if rehearsal else "cuda"
        self.model = "tiny" if rehearsal else "ViT-B-32"
        self.precisions = ["bf16"] if rehearsal else ["bf16", "fp16"]
        self.model_batches = [8, 16] if rehearsal else [256, 1024]
        self.model_steps = 3 if rehearsal else 30
        self.photos = {"640x480": ((640, 480), 24 if rehearsal else 8192),
                       "12MP": ((4000, 3000), 4 if rehearsal else 1024)}
        if rehearsal:
            self.photos["12MP"] = ((800, 600), 4)
        self.train_images = 64 if rehearsal else 16384
        self.train_steps = 6 if rehearsal else 30
        self.start_batch = 8 if rehearsal else 256
        self.max_batch = 16 if rehearsal else max_batch
        self.workers = 1 if rehearsal else min(16, os.cpu_count() or 1)


def _peak_reset(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device: str) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def model_alone(s: Sizes) -> list[dict]:
    """images/s of the image tower alone, on pixels already on the device."""
    import torch

    from clipengine.models import ModelSpec, load_model

    loaded = load_model(ModelSpec(s.model, "none" if not s.rehearsal else None), device=s.device)
    model = loaded.model.eval()
    rows = []
    for precision in s.precisions:
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        for batch in s.model_batches:
            _peak_reset(s.device)
            x = torch.randn(batch, 3, loaded.image_size, loaded.image_size, device=s.device)
            with torch.inference_mode(), torch.autocast(s.device, dtype=dtype):
                for _ in range(2):
                    model.encode_image(x)
                _sync(s.device)
                t0 = time.perf_counter()
                for _ in range(s.model_steps):
                    model.encode_image(x)
                _sync(s.device)
            seconds = time.perf_counter() - t0
            rows.append({"precision": precision, "batch": batch, "images_per_second": batch * s.model_steps / seconds,
                         "peak_gib": _peak_gib(s.device)})
            print(f"model alone {s.model} {precision} batch {batch}: {rows[-1]['images_per_second']:,.0f} images/s",
                  flush=True)
    return rows


def _write_photo(args: tuple[str, int, int, int]) -> None:
    from clipengine.scenes import photo_like

    path, width, height, seed = args
    photo_like(width, height, seed=seed).save(path, "JPEG", quality=90)


def photos(folder: Path, size: tuple[int, int], n: int, workers: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    todo = [(str(folder / f"{i:06d}.jpg"), size[0], size[1], i) for i in range(n)
            if not (folder / f"{i:06d}.jpg").is_file()]
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_write_photo, todo, chunksize=8))
    return folder


def index_end_to_end(s: Sizes, work: Path) -> list[dict]:
    """`index_folder` with the CPU decode path against the device's, on each photo size."""
    from clipengine.index.pipeline import IndexOptions, index_folder
    from clipengine.models import ModelSpec

    spec = ModelSpec(s.model, "none" if not s.rehearsal else None)
    rows = []
    for name, (size, n) in s.photos.items():
        folder = photos(work / f"photos-{name}", size, n, s.workers)
        for decode in ("cpu", "gpu"):
            index = work / f"index-{name}-{decode}"
            shutil.rmtree(index, ignore_errors=True)
            _peak_reset(s.device)
            seen: dict[str, float] = {}

            def progress(done: int, total: int, seen: dict = seen) -> None:
                now = time.perf_counter()
                seen.setdefault("first", now)
                seen["last"], seen["done"] = now, done

            # precision: the index's default, autocast on a GPU (`LoadedModel.autocast`)
            options = IndexOptions(device=s.device, workers=s.workers, decode=decode, export=False, runtime="torch")
            t0 = time.perf_counter()
            report = index_folder(folder, index, spec, options, progress=progress)
            wall = time.perf_counter() - t0
            assert report is not None and report.embedded == n, report
            embed_s = seen["last"] - seen["first"]
            rows.append({"photos": name, "n": n, "decode": decode, "wall_s": wall,
                         "images_per_second": n / embed_s if embed_s > 0 else None,
                         "end_to_end_images_per_second": n / wall, "peak_gib": _peak_gib(s.device)})
            print(f"index {name} x {n} decode {decode}: {rows[-1]['images_per_second'] or 0:,.0f} images/s embedding, "
                  f"{rows[-1]['end_to_end_images_per_second']:,.0f} end to end ({wall:.1f} s)", flush=True)
    return rows


def _fits(s: Sizes, batch: int) -> bool:
    """Whether a training step of the model at `batch` fits in the device's memory."""
    import torch

    from clipengine.models import ModelSpec, load_model
    from clipengine.training.loss import contrastive_loss

    loaded = load_model(ModelSpec(s.model, "none" if not s.rehearsal else None), device=s.device)
    model = loaded.model.train()
    try:
        x = torch.randn(batch, 3, loaded.image_size, loaded.image_size, device=s.device)
        tokens = torch.randint(0, 1000, (batch, 77 if not s.rehearsal else 32), device=s.device)
        with torch.autocast(s.device, dtype=torch.bfloat16):
            image, text = model.encode_image(x, normalize=True), model.encode_text(tokens, normalize=True)
        contrastive_loss(image.float(), text.float(), model.logit_scale.exp()).backward()
        _sync(s.device)
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        del model, loaded
        if s.device == "cuda":
            torch.cuda.empty_cache()


def largest_batch(s: Sizes) -> int:
    batch = s.start_batch
    while batch * 2 <= s.max_batch and _fits(s, batch * 2):
        batch *= 2
    return batch


def _rate(step_seconds: list[float], batch: int, skip: int = 5) -> float:
    kept = step_seconds[skip:] or step_seconds
    return batch * len(kept) / sum(kept)


def train_side_by_side(s: Sizes, work: Path) -> dict:
    """`clipengine train` and open_clip_train at the largest batch that fits, on the same data and settings."""
    from clipengine.scenes import write_scene_set

    batch = largest_batch(s)
    data = work / "scenes"
    csv = data / "captions.csv"
    if not csv.is_file():
        write_scene_set(data, s.train_images, size=224 if not s.rehearsal else 64)
    one = work / "one-caption.csv"  # a row per image: open_clip's CsvDataset and ours train on the same pairs
    lines = csv.read_text().splitlines()
    first: dict[str, str] = {}
    for line in lines[1:]:
        path, caption = line.split(",", 1)
        first.setdefault(path, caption)
    rows = [lines[0]] + [f"{data / path},{caption}" for path, caption in first.items()]
    one.write_text("\n".join(rows) + "\n")
    epochs = -(-s.train_steps * batch // (len(rows) - 1)) + 1
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    common = {"lr": "5e-4", "wd": "0.2", "warmup": "10"}
    precision = "bf16" if not s.rehearsal else "fp32"

    ours_out = work / "ours"
    shutil.rmtree(ours_out, ignore_errors=True)
    cmd = [sys.executable, "-m", "clipengine", "train", "--data", str(one), "--out", str(ours_out), "--model", s.model,
           "--epochs", str(epochs), "--max-steps", str(s.train_steps), "--batch-size", str(batch), "--lr", common["lr"],
           "--weight-decay", common["wd"], "--warmup-steps", common["warmup"], "--grad-clip", "0",
           "--precision", precision, "--val-size", "0", "--device", s.device, "--workers", str(s.workers),
           "--decode-cache", "off", "--log-every", "1", "--json"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    ours_wall = time.perf_counter() - t0
    steps = [r for r in map(json.loads, (ours_out / "log.jsonl").read_text().splitlines()) if r["kind"] == "step"]
    ours = _rate([b["seconds"] - a["seconds"] for a, b in zip(steps, steps[1:], strict=False)], batch)

    theirs_out = work / "open_clip"
    shutil.rmtree(theirs_out, ignore_errors=True)
    cmd = [sys.executable, "-c", OPEN_CLIP_MAIN, str(ROOT / "clipengine" / "model_configs"), "--train-data", str(one),
           "--dataset-type", "csv", "--csv-separator", ",", "--csv-img-key", "filepath", "--csv-caption-key", "caption",
           "--model", s.model, "--batch-size", str(batch), "--epochs", str(epochs), "--lr", common["lr"],
           "--wd", common["wd"], "--warmup", common["warmup"], "--precision", "amp_bf16" if not s.rehearsal else "fp32",
           "--device", s.device, "--workers", str(s.workers), "--logs", str(work), "--name", theirs_out.name,
           "--save-frequency", "0", "--report-to", "", "--log-every-n-steps", "1"]
    t0 = time.perf_counter()
    process = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pattern = re.compile(r"Train Epoch: \d+ .*?, ([0-9.]+)/s, ")
    log = theirs_out / "out.log"
    rates: list[float] = []
    while process.poll() is None and len(rates) < s.train_steps:  # stopped at our step count
        time.sleep(1)
        if log.is_file():
            rates = [float(m.group(1)) for m in map(pattern.search, log.read_text().splitlines()) if m]
    process.kill()
    process.wait()
    theirs_wall = time.perf_counter() - t0
    if not rates:
        raise SystemExit(f"open_clip_train logged no step; see {log}")
    theirs = _rate([batch / r for r in rates[: s.train_steps]], batch)
    result = {"batch": batch, "steps": s.train_steps, "precision": precision, "ours_samples_per_second": ours,
              "open_clip_samples_per_second": theirs, "ratio": ours / theirs, "ours_wall_s": ours_wall,
              "open_clip_wall_s": theirs_wall}
    print(f"train {s.model} batch {batch}: ours {ours:,.0f} samples/s, open_clip_train {theirs:,.0f} "
          f"({result['ratio']:.2f}x, target >= 1.3x)", flush=True)
    return result


def table(record: dict) -> str:
    lines = [f"Measured {record['date']} on {record['device_name']}" + (" (CPU rehearsal)" if record["rehearsal"] else ""),
             "", "| measurement | value |", "|---|---|"]
    for r in record["model_alone"]:
        lines.append(f"| {record['model']} alone, {r['precision']}, batch {r['batch']} | {r['images_per_second']:,.0f} images/s |")
    for r in record["index"]:
        lines.append(f"| index {r['n']:,} {r['photos']} JPEGs, decode {r['decode']} | "
                     f"{r['images_per_second'] or 0:,.0f} images/s embedding, {r['end_to_end_images_per_second']:,.0f} end to end |")
    t = record["train"]
    lines.append(f"| train {record['model']} batch {t['batch']}, {t['precision']} | ours {t['ours_samples_per_second']:,.0f} "
                 f"samples/s, open_clip_train {t['open_clip_samples_per_second']:,.0f} ({t['ratio']:.2f}x) |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-rehearsal", action="store_true", help="every part at tiny sizes on the CPU")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--work", type=Path, help="where photos and indexes go (default: a temporary folder)")
    parser.add_argument("--max-batch", type=int, default=8192)
    parser.add_argument("--parts", default="model,index,train")
    args = parser.parse_args()
    import torch

    s = Sizes(args.cpu_rehearsal, args.max_batch)
    if not s.rehearsal and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device here (use --cpu-rehearsal to rehearse on the CPU)")
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    parts = args.parts.split(",")
    record: dict = {"date": dt.date.today().isoformat(), "rehearsal": s.rehearsal, "model": s.model,
                    "device_name": torch.cuda.get_device_name() if s.device == "cuda" else platform.processor() or "cpu",
                    "torch": torch.__version__, "cores": os.cpu_count(), "workers": s.workers}
    if "model" in parts:
        record["model_alone"] = model_alone(s)
    if "index" in parts:
        record["index"] = index_end_to_end(s, work)
        alone = next((r["images_per_second"] for r in record.get("model_alone", []) if r["batch"] == s.model_batches[0]),
                     None)
        for r in record["index"]:
            r["vs_model_alone"] = r["images_per_second"] / alone if alone and r["images_per_second"] else None
    if "train" in parts:
        record["train"] = train_side_by_side(s, work)
    out = args.out or (None if s.rehearsal else None)
    save_result("gpu", record, out, s.rehearsal and out is None)
    if out is not None and all(p in record for p in ("model_alone", "index", "train")):
        out.with_suffix(".md").write_text(table(record))
        print(table(record))


if __name__ == "__main__":
    main()
