"""Training throughput and quality of `clipengine train` against open_clip's own trainer, side by side.

Both train the shipped `tiny` config from the same random start on the same data (built-in scenes, one
caption per image, absolute paths, so open_clip's CsvDataset reads the very same rows), with the same
batch, learning rate, warmup, weight decay, gradient clipping, epochs, precision (fp32), data workers and
torch threads. Runs are interleaved (ours, theirs, ours, theirs, ...) because the machine is shared.

  samples/s   each trainer's own per-step clock (data wait included), steps after the first 5
  wall        the whole process, imports and start-up included
  recall      both final models evaluated by the same code (clipengine.train.evaluate) on the same
              held-out scenes (every caption of every image), after the same number of steps

Target (issue 3): ours >= 1.3x open_clip's samples/s, with equal or better recall.

    python benchmarks/bench_train.py            # ~4 minutes here
    python benchmarks/bench_train.py --quick    # to check the script
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from results_file import save_result  # benchmarks/ is on sys.path when a script runs

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "bench-train"
SKIP_STEPS = 5
OPEN_CLIP_MAIN = ("import sys, open_clip; open_clip.add_model_config(sys.argv.pop(1)); "
                  "from open_clip_train.main import main; main(sys.argv[1:])")


def make_data(n_train: int, n_val: int) -> tuple[Path, Path]:
    from clipengine.scenes import write_scene_set

    train_dir, val_dir = DATA / f"train-{n_train}", DATA / f"val-{n_val}"
    for folder, n, seed in ((train_dir, n_train, 0), (val_dir, n_val, 1)):
        if not (folder / "captions.csv").is_file():
            shutil.rmtree(folder, ignore_errors=True)
            write_scene_set(folder, n, seed=seed)
    one_caption = DATA / f"train-{n_train}-one-caption.csv"
    with open(train_dir / "captions.csv", newline="") as f:
        first: dict[str, str] = {}
        for row in csv.DictReader(f):
            first.setdefault(row["filepath"], row["caption"])
    with open(one_caption, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filepath", "caption"])
        writer.writerows([str(train_dir / p), c] for p, c in first.items())
    return one_caption, val_dir / "captions.csv"


def rate_after_warmup(steps: list[tuple[int, float]], batch: int) -> float:
    """samples/s over steps SKIP_STEPS.. from (step, step seconds) pairs."""
    kept = [sec for step, sec in steps if step > SKIP_STEPS]
    return batch * len(kept) / sum(kept)


def run_ours(args, train_csv: Path, out: Path, env: dict) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "clipengine", "train", "--data", str(train_csv), "--out", str(out),
           "--model", "tiny", "--epochs", str(args.epochs), "--batch-size", str(args.batch), "--lr", "5e-4",
           "--warmup-steps", "10", "--grad-clip", "1.0", "--precision", "fp32", "--workers", str(args.workers),
           "--threads", str(args.threads), "--val-size", "0", "--seed", "0", "--log-every", "1", "--json"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "step"]
    per_step = [(b["step"], b["seconds"] - a["seconds"]) for a, b in zip(steps, steps[1:])]
    return {"samples_per_second": rate_after_warmup(per_step, args.batch), "wall_s": wall,
            "steps": steps[-1]["step"], "checkpoint": str(out)}


def run_open_clip(args, train_csv: Path, out: Path, env: dict) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-c", OPEN_CLIP_MAIN, str(ROOT / "clipengine" / "model_configs"),
           "--train-data", str(train_csv), "--dataset-type", "csv", "--csv-separator", ",",
           "--csv-img-key", "filepath", "--csv-caption-key", "caption", "--model", "tiny",
           "--batch-size", str(args.batch), "--epochs", str(args.epochs), "--lr", "5e-4", "--wd", "0.2",
           "--warmup", "10", "--grad-clip-norm", "1.0", "--precision", "fp32", "--device", "cpu",
           "--workers", str(args.workers), "--logs", str(out.parent), "--name", out.name,
           "--save-frequency", str(args.epochs), "--report-to", "", "--seed", "0", "--log-every-n-steps", "1"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env={**env, "OMP_NUM_THREADS": str(args.threads)},
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    pattern = re.compile(r"Train Epoch: (\d+) \[\s*(\d+)/\d+ .*?, ([0-9.]+)/s, ")
    per_step, step = [], 0
    for line in (out / "out.log").read_text().splitlines():
        m = pattern.search(line)
        if m:
            step += 1
            per_step.append((step, args.batch / float(m.group(3))))
    return {"samples_per_second": rate_after_warmup(per_step, args.batch), "wall_s": wall, "steps": step,
            "checkpoint": str(out / "checkpoints" / f"epoch_{args.epochs}.pt")}


def recall_of(checkpoint: str, val_csv: Path) -> dict[str, float]:
    import torch

    from clipengine.models import ModelSpec, load_model
    from clipengine.train import evaluate
    from clipengine.pairs import read_pairs

    if checkpoint.endswith(".pt"):  # open_clip's: a state dict inside a training-state dict
        loaded = load_model(ModelSpec(arch="tiny"), device="cpu")
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
        loaded.model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
    else:
        loaded = load_model(ModelSpec(checkpoint=checkpoint), device="cpu")
    return evaluate(loaded, read_pairs(val_csv))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, help="where to write the JSON (default: results/train-DATE.json)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    n_train, n_val, args.epochs = (640, 100, 1) if args.quick else (4000, 500, 4)
    if args.quick:
        args.rounds = 1
    train_csv, val_csv = make_data(n_train, n_val)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    runs: dict[str, list[dict]] = {"ours": [], "open_clip": []}
    for r in range(args.rounds):
        for name, fn in (("ours", run_ours), ("open_clip", run_open_clip)):
            result = fn(args, train_csv, DATA / "runs" / f"{name}-{r}", env)
            runs[name].append(result)
            print(f"round {r + 1} {name:>9}: {result['samples_per_second']:7.1f} samples/s, "
                  f"{result['steps']} steps, wall {result['wall_s']:.1f} s", flush=True)
    summary = {}
    for name, results in runs.items():
        summary[name] = {
            "samples_per_second": statistics.median(x["samples_per_second"] for x in results),
            "wall_s": statistics.median(x["wall_s"] for x in results),
            "steps": results[-1]["steps"],
            "recall": recall_of(results[-1]["checkpoint"], val_csv),
        }
    ratio = summary["ours"]["samples_per_second"] / summary["open_clip"]["samples_per_second"]
    print()
    for name, s in summary.items():
        rec = s["recall"]
        print(f"{name:>9}: {s['samples_per_second']:7.1f} samples/s  wall {s['wall_s']:5.1f} s  "
              f"T->I R@1 {rec['text_to_image_R@1']:.3f} R@10 {rec['text_to_image_R@10']:.3f}  "
              f"I->T R@1 {rec['image_to_text_R@1']:.3f} R@10 {rec['image_to_text_R@10']:.3f}")
    print(f"ours / open_clip samples/s: {ratio:.2f}x   (target >= 1.3x)")
    record = {
        "date": dt.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
        "cores": os.cpu_count(), "config": {"model": "tiny", "batch": args.batch, "epochs": args.epochs,
                                            "train_images": n_train, "val_images": n_val, "workers": args.workers,
                                            "threads": args.threads, "rounds": args.rounds, "precision": "fp32"},
        "runs": runs, "summary": summary, "ratio_samples_per_second": ratio,
    }
    save_result("train", record, args.out, args.quick)


if __name__ == "__main__":
    main()
