"""Training throughput and quality of `clipengine train` against open_clip's own trainer, side by side,
in three regimes, each at equal steps, batch and hyperparameters:

  scenes   the built-in captioned scenes (4,000 / 2,000 held out), the shipped `tiny` model: decoding matters.
           10 epochs: after 4 (R@1 about 1.4 % of 2,000) seed noise hides what a setting changes
  emoji    the emoji development set (real drawings, human names and keywords; benchmarks/make_emoji_set.py),
           the shipped `small` model (4 layers, width 256, 64 px, patch 8): the model's compute matters
  photos   camera-sized JPEGs (the scenes at 3000x3000, 9 MP, with sensor grain), `tiny`: decoding is nearly everything

Each trainer runs as a user would run it: ours with its automatic CPU plan, open_clip_train with
`--workers 2` and its default torch threads. Runs alternate (ours, theirs, ours, ...) over the seeds.

  samples/s   each trainer's own per-step clock (data wait included), steps after the first 5
  wall        the whole process, imports, start-up and the end-of-epoch validation of neither (both skip it)
  recall      each final model scored by the same code (clipengine.training.evaluate) on the same held-out
              set, with the transparency policy it was trained with (ours: white; open_clip: dropped alpha)

Targets: ours >= 1.3x open_clip's samples/s in every regime, and mean held-out recall (3 seeds)
equal or better in `scenes` and `emoji`.

    python benchmarks/bench_train.py                       # every regime, seeds 0 1 2 (about an hour here)
    python benchmarks/bench_train.py --regimes emoji --seeds 0 --ours-args "--grad-clip 0"   # one experiment
    python benchmarks/bench_train.py --quick               # to check the script
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from results_file import save_result  # benchmarks/ is on sys.path when a script runs
from scene_model import emoji_data

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "bench-train"
SKIP_STEPS = 5
OPEN_CLIP_MAIN = ("import sys, open_clip; open_clip.add_model_config(sys.argv.pop(1)); "
                  "from open_clip_train.main import main; main(sys.argv[1:])")
RECALL_KEYS = [f"{d}_R@{k}" for d in ("text_to_image", "image_to_text") for k in (1, 5, 10)]


@dataclass
class Regime:
    name: str
    model: str
    batch: int
    epochs: int
    lr: float
    wd: float
    warmup: int
    grad_clip: float  # the same for both trainers; 0: none (open_clip's default)
    recall: bool  # whether held-out recall is a target here


REGIMES = {
    "scenes": Regime("scenes", "tiny", 64, 10, 5e-4, 0.2, 10, 1.0, True),
    "emoji": Regime("emoji", "small", 128, 4, 1e-3, 0.1, 50, 0.0, True),
    "photos": Regime("photos", "tiny", 32, 3, 5e-4, 0.2, 10, 1.0, False),
}


def _one_caption_csv(captions: Path, out: Path) -> Path:
    """A CSV with absolute paths and one caption per image, so that open_clip's CsvDataset (a row per
    sample) and ours (an image per sample) train on the very same pairs."""
    first: dict[str, str] = {}
    with open(captions, newline="") as f:
        for row in csv.DictReader(f):
            first.setdefault(str((captions.parent / row["filepath"]).resolve()), row["caption"])
    with open(out, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filepath", "caption"])
        writer.writerows(first.items())
    return out


def scene_data(n_train: int, n_val: int, camera_size: int = 0) -> tuple[Path, Path]:
    """Built-in scenes (128 px); with `camera_size`, the same scenes as camera-sized JPEGs."""
    from clipengine.scenes import write_scene_set

    tag = f"{camera_size}px-camera" if camera_size else "128px"
    paths = []
    for split, n, seed in (("train", n_train, 0), ("val", n_val, 1)):
        folder = DATA / f"scenes-{tag}-{split}-{n}"
        if not (folder / "captions.csv").is_file():
            shutil.rmtree(folder, ignore_errors=True)
            write_scene_set(folder, n, seed=seed, size=256 if camera_size else 128)
            if camera_size:
                _as_camera_photos(folder / "images", camera_size)
        paths.append(_one_caption_csv(folder / "captions.csv", folder.parent / f"{folder.name}.csv"))
    return paths[0], paths[1]


def _as_camera_photos(folder: Path, size: int, grain: int = 12) -> None:
    """Enlarged, with per-pixel grain as from a camera's sensor: JPEGs of realistic size (a few MB) and
    decoding cost."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for path in sorted(folder.iterdir()):
        pixels = np.asarray(Image.open(path).resize((size, size), Image.Resampling.BICUBIC), dtype=np.int16)
        pixels += rng.integers(-grain, grain + 1, (size, size, 1), dtype=np.int16)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, "JPEG", quality=90)


def data_for(regime: str, quick: bool) -> tuple[Path, Path]:
    if regime == "scenes":
        return scene_data(640, 100) if quick else scene_data(4000, 2000)
    if regime == "photos":
        return scene_data(64, 32, camera_size=3000) if quick else scene_data(320, 100, camera_size=3000)
    return emoji_data()


def rate_after_warmup(steps: list[tuple[int, float]], batch: int) -> float:
    """samples/s over steps SKIP_STEPS.. from (step, step seconds) pairs."""
    kept = [sec for step, sec in steps if step > SKIP_STEPS]
    return batch * len(kept) / sum(kept)


def run_ours(r: Regime, seed: int, train_csv: Path, out: Path, extra: list[str], env: dict) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cache = out.parent / f"decoded-{out.name}.sqlite"
    for leftover in (cache, Path(f"{cache}-wal"), Path(f"{cache}-shm")):  # every run starts cold, as a first run does
        leftover.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "clipengine", "train", "--data", str(train_csv), "--out", str(out),
           "--model", r.model, "--pretrained", "none", "--epochs", str(r.epochs), "--batch-size", str(r.batch),
           "--lr", str(r.lr), "--weight-decay", str(r.wd), "--warmup-steps", str(r.warmup),
           "--grad-clip", str(r.grad_clip), "--precision", "fp32", "--val-size", "0", "--seed", str(seed),
           "--decode-cache", str(cache), "--log-every", "1", "--json", *extra]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [x for x in records if x["kind"] == "step"]
    plan = next((x for x in records if x["kind"] == "plan"), None)
    per_step = [(b["step"], b["seconds"] - a["seconds"]) for a, b in zip(steps, steps[1:], strict=False)]
    return {"samples_per_second": rate_after_warmup(per_step, r.batch), "wall_s": wall, "steps": steps[-1]["step"],
            "checkpoint": str(out), "plan": plan and plan["chosen"], "transparency": "white"}


def run_open_clip(r: Regime, seed: int, train_csv: Path, out: Path, env: dict, data_args: list[str] | None = None) -> dict:
    """open_clip_train on `train_csv`, or on the data `data_args` name (its --train-data and dataset options)."""
    shutil.rmtree(out, ignore_errors=True)
    data_args = data_args or ["--train-data", str(train_csv), "--dataset-type", "csv", "--csv-separator", ",",
                              "--csv-img-key", "filepath", "--csv-caption-key", "caption"]
    cmd = [sys.executable, "-c", OPEN_CLIP_MAIN, str(ROOT / "clipengine" / "model_configs"), *data_args, "--model", r.model,
           "--batch-size", str(r.batch), "--epochs", str(r.epochs), "--lr", str(r.lr), "--wd", str(r.wd),
           "--warmup", str(r.warmup), "--precision", "fp32", "--device", "cpu", "--workers", "2",
           "--logs", str(out.parent), "--name", out.name, "--save-frequency", str(r.epochs), "--report-to", "",
           "--seed", str(seed), "--log-every-n-steps", "1"] + (["--grad-clip-norm", str(r.grad_clip)] if r.grad_clip else [])
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env={k: v for k, v in env.items() if k != "OMP_NUM_THREADS"},
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    pattern = re.compile(r"Train Epoch: (\d+) \[\s*(\d+)/\d+ .*?, ([0-9.]+)/s, ")
    per_step, step = [], 0
    for line in (out / "out.log").read_text().splitlines():
        m = pattern.search(line)
        if m:
            step += 1
            per_step.append((step, r.batch / float(m.group(3))))
    return {"samples_per_second": rate_after_warmup(per_step, r.batch), "wall_s": wall, "steps": step,
            "checkpoint": str(out / "checkpoints" / f"epoch_{r.epochs}.pt"), "plan": {"workers": 2, "threads": "default"},
            "transparency": "drop"}


def recall_of(model: str, checkpoint: str, val_csv: Path, transparency: str) -> dict[str, float]:
    import torch

    from clipengine.models import ModelSpec, load_model
    from clipengine.pairs import read_pairs
    from clipengine.training import evaluate

    torch.set_num_threads(os.cpu_count() or 1)
    if checkpoint.endswith(".pt"):  # open_clip's: a state dict inside a training-state dict
        loaded = load_model(ModelSpec(arch=model, pretrained="none"), device="cpu")
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
        loaded.model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
    else:
        loaded = load_model(ModelSpec(checkpoint=checkpoint), device="cpu")
    return evaluate(loaded, read_pairs(val_csv), transparency=transparency)


def summarise(runs: list[dict]) -> dict:
    out = {"samples_per_second": statistics.mean(x["samples_per_second"] for x in runs),
           "wall_s": statistics.mean(x["wall_s"] for x in runs), "steps": runs[-1]["steps"]}
    if all("recall" in x for x in runs):
        out["recall"] = {k: statistics.mean(x["recall"][k] for x in runs) for k in RECALL_KEYS}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, help="where to write the JSON (default: results/train-DATE.json)")
    parser.add_argument("--regimes", default="scenes,emoji,photos")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--ours-args", default="", help="extra arguments for `clipengine train` (experiments)")
    parser.add_argument("--only", choices=["ours", "open_clip"], help="run one trainer (experiments)")
    parser.add_argument("--uncached", default="photos,scenes",
                        help="regimes where ours also runs with --decode-cache off, to measure what the cache gives")
    args = parser.parse_args()
    regimes = [REGIMES[name] for name in args.regimes.split(",")]
    if args.quick:
        args.seeds = args.seeds[:1]
        regimes = [Regime(**{**r.__dict__, "epochs": 1, "warmup": 2}) for r in regimes]
    extra = shlex.split(args.ours_args)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    trainers = [t for t in ("ours", "open_clip") if args.only in (None, t)]
    record: dict = {"date": dt.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
                    "cores": os.cpu_count(), "ours_args": extra, "regimes": {}}
    for r in regimes:
        train_csv, val_csv = data_for(r.name, args.quick)
        if args.quick:  # enough steps past the first 5 to time
            r = Regime(**{**r.__dict__, "batch": min(r.batch, (sum(1 for _ in open(train_csv)) - 1) // 8)})
        names = trainers + (["ours_uncached"] if "ours" in trainers and r.name in args.uncached.split(",") else [])
        runs: dict[str, list[dict]] = {t: [] for t in names}
        for seed in args.seeds:
            for name in names:
                out = DATA / "runs" / f"{r.name}-{name}-{seed}"
                if name == "open_clip":
                    result = run_open_clip(r, seed, train_csv, out, env)
                else:
                    result = run_ours(r, seed, train_csv, out, extra + (["--decode-cache", "off"] if name == "ours_uncached" else []), env)
                if r.recall and name != "ours_uncached":  # the cache changes the time, never the pixels
                    result["recall"] = recall_of(r.model, result["checkpoint"], val_csv, result["transparency"])
                runs[name].append(result)
                rec = result.get("recall", {})
                print(f"{r.name:>6} seed {seed} {name:>13}: {result['samples_per_second']:6.1f} samples/s  "
                      f"{result['steps']} steps  wall {result['wall_s']:6.1f} s  plan {result['plan']}  "
                      + "  ".join(f"{k.replace('text_to_image', 'T->I').replace('image_to_text', 'I->T')} {v:.3f}"
                                  for k, v in rec.items()), flush=True)
        summary = {name: summarise(results) for name, results in runs.items()}
        entry = {"config": r.__dict__, "train_images": sum(1 for _ in open(train_csv)) - 1, "seeds": args.seeds,
                 "runs": runs, "summary": summary}
        if "ours_uncached" in summary:
            entry["ratio_cache"] = summary["ours"]["samples_per_second"] / summary["ours_uncached"]["samples_per_second"]
            print(f"{r.name:>6}: the decode cache gives {entry['ratio_cache']:.2f}x samples/s", flush=True)
        if "ours" in summary and "open_clip" in summary:
            entry["ratio_samples_per_second"] = summary["ours"]["samples_per_second"] / summary["open_clip"]["samples_per_second"]
            if r.recall:
                entry["recall_difference"] = {k: summary["ours"]["recall"][k] - summary["open_clip"]["recall"][k]
                                              for k in RECALL_KEYS}
            print(f"{r.name:>6}: ours / open_clip samples/s {entry['ratio_samples_per_second']:.2f}x (target >= 1.3x)"
                  + ("  recall ours - open_clip (mean of seeds): " + "  ".join(
                      f"{k.replace('text_to_image', 'T->I').replace('image_to_text', 'I->T')} {v:+.3f}"
                      for k, v in entry["recall_difference"].items()) if r.recall else ""), flush=True)
        record["regimes"][r.name] = entry
    save_result("train", record, args.out, args.quick or bool(extra) or bool(args.only))


if __name__ == "__main__":
    main()
