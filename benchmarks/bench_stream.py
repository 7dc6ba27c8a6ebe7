"""Training on streamed shards, side by side in one run, in two regimes (benchmarks/bench_train.py's):

  scenes   the built-in scenes (4,000, 128 px), the shipped `tiny` model, batch 64: the data path matters most
  emoji    the emoji development set (`make emoji-set`), the shipped `small` model, batch 128: the model's compute

The training images become img2dataset-layout shards (one caption each, 250 to a shard, sizes.json) served by
a local HTTP server on 127.0.0.1 (tests/shard_servers.py). Three comparisons:

  throughput  `clipengine train` streaming the shards over HTTP against streaming them from the local disk
              (target >= 0.95x), and against open_clip_train streaming the same URLs (webdataset, its `curl`
              pipe) with the same model, batch, steps and settings (target >= 1.3x). Both without a decode cache
              (streamed data is seen once an epoch at scale); each trainer's own per-step clock after step 5;
              runs alternate over `--rounds` (scenes 5, emoji 3: the median shrugs off a disturbed run; on this 2-core
              machine a busy sitting measured HTTP/disk 0.88x, a quiet one 0.97x)
              (and, for context, against the same pairs read as files: the map-style path of a local CSV)
  recall      held-out recall after equal steps, streamed over HTTP against the same pairs read from the disk
              (map-style, a permutation of the whole set each epoch), for 12 seeds: level within noise (scenes).
              The order's draw alone moves a run's R@10 by +-3 points, so 3 seeds cannot tell 3 points from chance

    python benchmarks/bench_stream.py                  # both regimes (about 90 minutes here; --merge joins sittings)
    python benchmarks/bench_stream.py --quick          # to check the script
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_train import (
    DATA,
    RECALL_KEYS,
    REGIMES,
    Regime,
    _one_caption_csv,
    rate_after_warmup,
    recall_of,
    run_open_clip,
)
from results_file import save_result  # also puts tests/ on sys.path
from scene_model import emoji_data
from shard_servers import ShardServer
from synthetic import write_shards

PER_SHARD = 250
SETTINGS = {"scenes": {"epochs": 2}, "emoji": {"epochs": 1}}  # throughput runs: enough steps to time
ROUNDS = {"scenes": 5, "emoji": 3}  # emoji's runs take 1.5-2.5 minutes each: its model, not the data, sets the pace


def shards_for(regime: str, quick: bool) -> tuple[Path, Path, Path, int]:
    """(shard folder, one-caption train CSV, held-out CSV, samples) of a regime."""
    from bench_train import scene_data

    if regime == "scenes":
        train_csv, val_csv = scene_data(640, 100) if quick else scene_data(4000, 2000)
    else:
        captions, val_csv = emoji_data()
        train_csv = _one_caption_csv(captions, DATA / "emoji-one-caption.csv")
    folder = DATA / f"shards-{regime}-{train_csv.stem}"
    if not (folder / "sizes.json").is_file():
        shutil.rmtree(folder, ignore_errors=True)
        write_shards(train_csv, folder, PER_SHARD)
    sizes = json.loads((folder / "sizes.json").read_text())
    return folder, train_csv, val_csv, sum(sizes.values())


def pattern_of(folder: Path) -> str:
    count = len(json.loads((folder / "sizes.json").read_text()))
    return f"{{00000..{count - 1:05d}}}.tar"


def run_ours(r: Regime, seed: int, data: str, out: Path, extra: list[str], env: dict) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "clipengine", "train", "--data", data, "--out", str(out),
           "--model", r.model, "--pretrained", "none", "--epochs", str(r.epochs), "--batch-size", str(r.batch),
           "--lr", str(r.lr), "--weight-decay", str(r.wd), "--warmup-steps", str(r.warmup),
           "--grad-clip", str(r.grad_clip), "--precision", "fp32", "--val-size", "0", "--seed", str(seed),
           "--log-every", "1", "--json", *extra]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    return {**rates_of(out, r.batch), "wall_s": wall, "checkpoint": str(out)}


def rates_of(out: Path, batch: int) -> dict:
    """samples/s of a run of ours from its log: after step 5 (`samples_per_second_with_trials`, as bench_train
    counts), and from the step its CPU plan was chosen on (`samples_per_second`): the plan's trials run a few
    steps at a slower plan, which is the plan's cost, not the data path's, and made one run in three 15% slower."""
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [x for x in records if x["kind"] == "step"]
    per_step = [(b["step"], b["seconds"] - a["seconds"]) for a, b in zip(steps, steps[1:], strict=False)]
    plan_at = next((records[i - 1]["step"] for i, x in enumerate(records) if x["kind"] == "plan" and i), 0)
    after_plan = [(step, sec) for step, sec in per_step if step > plan_at]
    return {"samples_per_second": rate_after_warmup(after_plan, batch) if len(after_plan) > 10
            else rate_after_warmup(per_step, batch),
            "samples_per_second_with_trials": rate_after_warmup(per_step, batch), "steps": steps[-1]["step"]}


def throughput(r: Regime, folder: Path, train_csv: Path, samples: int, url: str, rounds: int, env: dict,
               extra: list[str]) -> dict:
    pattern = pattern_of(folder)
    uncached = ["--decode-cache", "off"]
    # open_clip_train runs ceil(samples / batch / workers) batches in each of its 2 workers: ask for a whole,
    # even number of batches so that it takes the steps ours does (samples // batch)
    steps = samples // r.batch // 2 * 2
    open_clip_data = ["--train-data", f"{url}/{pattern}", "--dataset-type", "webdataset",
                      "--train-num-samples", str(steps * r.batch)]
    runs: dict[str, list[dict]] = {"http": [], "disk": [], "disk_indexed": [], "open_clip_http": []}
    for k in range(rounds):
        for name in runs:
            out = DATA / "runs" / f"stream-{r.name}-{name}-{k}"
            if name == "open_clip_http":
                result = run_open_clip(r, 0, Path(), out, env, open_clip_data)
            elif name == "disk_indexed":  # the same pairs as a CSV of files: map-style, today's local path
                result = run_ours(r, 0, str(train_csv), out, uncached + extra, env)
            else:
                data = f"{url}/{pattern}" if name == "http" else str(folder / pattern)
                result = run_ours(r, 0, data, out, uncached + (["--stream"] if name == "disk" else []) + extra, env)
            runs[name].append(result)
            print(f"{r.name:>6} round {k} {name:>15}: {result['samples_per_second']:7.1f} samples/s  "
                  f"{result['steps']} steps  wall {result['wall_s']:6.1f} s", flush=True)
    return summarise_throughput(r.name, runs)


def summarise_throughput(name: str, runs: dict[str, list[dict]]) -> dict:
    rate = {run: statistics.median(x["samples_per_second"] for x in results) for run, results in runs.items()}
    out = {"runs": runs, "samples_per_second": rate, "steps": runs["http"][-1]["steps"],
           "http_vs_disk": rate["http"] / rate["disk"], "http_vs_disk_indexed": rate["http"] / rate["disk_indexed"],
           "ours_vs_open_clip": rate["http"] / rate["open_clip_http"]}
    print(f"{name:>6}: HTTP / disk {out['http_vs_disk']:.3f}x (target >= 0.95x), HTTP / disk indexed "
          f"{out['http_vs_disk_indexed']:.3f}x; ours / open_clip_train over HTTP {out['ours_vs_open_clip']:.2f}x "
          "(target >= 1.3x)", flush=True)
    return out


def recall(r: Regime, folder: Path, train_csv: Path, val_csv: Path, url: str, seeds: list[int], env: dict,
           extra: list[str]) -> dict:
    pattern = pattern_of(folder)
    per_seed: dict[str, list[dict]] = {"streamed": [], "disk": []}
    for seed in seeds:
        for name in per_seed:
            out = DATA / "runs" / f"stream-recall-{r.name}-{name}-{seed}"
            cache = out.parent / f"decoded-{out.name}.sqlite"
            for leftover in (cache, Path(f"{cache}-wal"), Path(f"{cache}-shm")):
                leftover.unlink(missing_ok=True)
            data = f"{url}/{pattern}" if name == "streamed" else str(train_csv)
            result = run_ours(r, seed, data, out, ["--decode-cache", str(cache), *extra], env)
            result["recall"] = recall_of(r.model, result["checkpoint"], val_csv, "white")
            per_seed[name].append(result)
            print(f"{r.name:>6} seed {seed} {name:>9}: {result['steps']} steps  " + "  ".join(
                f"{k.replace('text_to_image', 'T->I').replace('image_to_text', 'I->T')} {v:.3f}"
                for k, v in result["recall"].items()), flush=True)
    return summarise_recall(r.name, per_seed, seeds)


def summarise_recall(name: str, per_seed: dict[str, list[dict]], seeds: list[int]) -> dict:
    """The mean recall of each arm, and whether streamed - disk is within 2 standard errors of the seeds'
    paired differences."""
    mean = {arm: {k: statistics.mean(x["recall"][k] for x in runs) for k in RECALL_KEYS} for arm, runs in per_seed.items()}
    # noise: the seeds' spread of the difference (paired by seed)
    spread = {k: statistics.stdev([s["recall"][k] - d["recall"][k] for s, d in zip(per_seed["streamed"], per_seed["disk"],
                                                                                   strict=True)])
              if len(seeds) > 1 else 0.0 for k in RECALL_KEYS}
    difference = {k: mean["streamed"][k] - mean["disk"][k] for k in RECALL_KEYS}
    level = all(abs(difference[k]) <= 2 * spread[k] / len(seeds) ** 0.5 for k in RECALL_KEYS) if len(seeds) > 1 else None
    print(f"{name:>6}: recall streamed - disk (mean of {len(seeds)} seeds): " + "  ".join(
        f"{k.replace('text_to_image', 'T->I').replace('image_to_text', 'I->T')} {difference[k]:+.3f}±{spread[k]:.3f}"
        for k in RECALL_KEYS) + f"; within 2 standard errors: {level}", flush=True)
    return {"seeds": seeds, "runs": per_seed, "mean": mean, "difference": difference, "difference_sd": spread,
            "within_noise": level, "steps": per_seed["streamed"][-1]["steps"]}


def merge(paths: list[Path], out: Path) -> None:
    """One result from several runs of this script: the throughput of the last that measured it, and the recall
    runs of all, paired by seed (runs of more seeds than one sitting allows; the code must be the same)."""
    records = [json.loads(p.read_text()) for p in paths]
    merged = {**records[-1], "merged_from": [name for p, r in zip(paths, records, strict=True)
                                             for name in r.get("merged_from", [p.name])], "regimes": {}}
    for name in sorted({n for r in records for n in r["regimes"]}, key=list(SETTINGS).index):  # as a run orders them
        entries = [r["regimes"][name] for r in records if name in r["regimes"]]
        entry = dict(next((e for e in reversed(entries) if "throughput" in e), entries[-1]))
        recalls = [e["recall"] for e in entries if "recall" in e]
        if recalls:
            seeds = [seed for rec in recalls for seed in rec["seeds"]]
            if len(set(seeds)) != len(seeds):
                raise SystemExit(f"{name}: a seed is in two of the files: {sorted(seeds)}")
            per_seed = {arm: [x for rec in recalls for x in rec["runs"][arm]] for arm in ("streamed", "disk")}
            entry["recall"] = {"config": recalls[-1]["config"], **summarise_recall(name, per_seed, seeds)}
        merged["regimes"][name] = entry
    out.write_text(json.dumps(merged, indent=2) + "\n")
    print(f"written {out}")


def rescore(path: Path) -> None:
    """The throughput of a result file, its rates recomputed from the runs' logs (`rates_of`), written back."""
    record = json.loads(path.read_text())
    for name, entry in record["regimes"].items():
        t = entry.get("throughput")
        if not t:
            continue
        for run, results in t["runs"].items():
            if run != "open_clip_http":
                for result in results:
                    result.update(rates_of(Path(result["checkpoint"]), t["config"]["batch"]))
        t.update(summarise_throughput(name, t["runs"]))
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"written {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--regimes", default="scenes,emoji")
    parser.add_argument("--rounds", type=int, help="alternating rounds of the throughput runs (default: ROUNDS)")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(12)))
    parser.add_argument("--parts", default="throughput,recall")
    parser.add_argument("--recall-regimes", default="scenes", help="where recall is compared (12 seeds: the cost)")
    parser.add_argument("--ours-args", default="", help="extra arguments for `clipengine train` (experiments)")
    parser.add_argument("--rescore", type=Path, help="recompute a result file's samples/s from its runs' logs")
    parser.add_argument("--merge", type=Path, nargs="+", help="result files to join into --out (recall seeds pooled)")
    args = parser.parse_args()
    if args.rescore:
        rescore(args.rescore)
        return
    if args.merge:
        if not args.out:
            parser.error("--merge writes to --out")
        merge(args.merge, args.out)
        return
    parts = args.parts.split(",")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    extra = shlex.split(args.ours_args)
    record: dict = {"date": dt.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
                    "cores": os.cpu_count(), "per_shard": PER_SHARD, "regimes": {}}
    for name in args.regimes.split(","):
        base = REGIMES[name]
        folder, train_csv, val_csv, samples = shards_for(name, args.quick)
        quick = {"epochs": 1, "warmup": 2} if args.quick else {}
        fast = Regime(**{**base.__dict__, **SETTINGS[name], **quick})
        entry: dict = {"config": base.__dict__, "samples": samples,
                       "shards": len(json.loads((folder / "sizes.json").read_text()))}
        with ShardServer(folder) as server:
            if "throughput" in parts:
                entry["throughput"] = {"config": fast.__dict__, **throughput(
                    fast, folder, train_csv, samples, server.url, 1 if args.quick else args.rounds or ROUNDS[name], env,
                    extra)}
            if "recall" in parts and name in args.recall_regimes.split(","):
                full = Regime(**{**base.__dict__, **quick})
                entry["recall"] = {"config": full.__dict__, **recall(
                    full, folder, train_csv, val_csv, server.url, args.seeds[:1] if args.quick else args.seeds, env, extra)}
        record["regimes"][name] = entry
    partial = parts != ["throughput", "recall"] or args.regimes != "scenes,emoji" or args.recall_regimes != "scenes"
    save_result("stream", record, args.out, args.quick or bool(extra) or partial)


if __name__ == "__main__":
    main()
