"""Every clipengine benchmark in one command: writes benchmarks/results/<date>.json and <date>.md.

Runs, each in its own process and side by side with its baseline:
  bench_index.py   embedding throughput (ours vs the naive loop vs the model alone), memory, no-op re-index
  bench_search.py  search latency (ours vs numpy brute force)
  bench_cold_search.py  `clipengine search` in a fresh process: the ONNX query path vs the torch one, where the time goes
  bench_serve.py   `clipengine serve`: warm queries through HTTP, throughput by clients, the CLI through a service
  bench_duplicates.py  `clipengine duplicates` at 100,000 vectors, and its search against the exact all-pairs scan
  bench_embed_runtime.py  embedding images on the CPU: torch vs onnxruntime fp32 vs int8, and what each changes in recall
  bench_export.py  which architectures export to query encoders, in how long, how close to torch
  bench_ann.py     approximate indexes at 1M x 512: each kind vs exact flat, the automatic choice, BLAS threshold
  bench_train.py   training throughput and held-out recall, ours vs open_clip's trainer: scenes, emoji, photos
  bench_recall.py  recall@k cost (ours vs CLIP_benchmark's dense matrix), and at 100k x 500k
The Markdown table is the one README.md shows.

    python benchmarks/run_all.py            # about an hour on 2 cores (bench_index is most of it)
    python benchmarks/run_all.py --quick    # small sizes, minutes: checks that every script runs
    python benchmarks/run_all.py --only search,recall
    python benchmarks/run_all.py --reuse    # keep today's results/<name>-<date>.json, run the rest
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
BENCHMARKS = ("index", "search", "cold_search", "serve", "duplicates", "embed_runtime", "export", "ann", "train", "recall")
EXTRA_ARGS = {"ann": ["--store"]}  # the whole path through an index on disk, not only the faiss kinds


def run(name: str, quick: bool, out: Path) -> dict:
    command = ([sys.executable, str(HERE / f"bench_{name}.py"), "--out", str(out)] + (["--quick"] if quick else [])
               + EXTRA_ARGS.get(name, []))
    print(f"== bench_{name}.py", flush=True)
    subprocess.run(command, check=True)
    return json.loads(out.read_text())


def _row(what: str, ours: str, baseline: str, ratio: str) -> str:
    return f"| {what} | {ours} | {baseline} | {ratio} |"


def _recall_cells(recall: dict) -> str:
    return " / ".join(f"{100 * recall[f'{d}_R@{k}']:.1f}" for d in ("text_to_image", "image_to_text") for k in (1, 5, 10))


def markdown(results: dict) -> str:
    """The README's table: one line per measurement, ours next to the obvious alternative."""
    lines = [f"Measured {results['date']} on {results['machine']}" + (" (quick sizes)" if results["quick"] else "") + ".",
             "", "| measurement | ours | baseline | ratio |", "|---|---|---|---|"]
    if "index" in results:
        for r in results["index"]["throughput"]:
            lines.append(_row(f"index {r['folder']}, ViT-B-32 on CPU", f"{r['ours_img_s']:.1f} img/s",
                              f"naive loop {r['naive_img_s']:.1f} img/s; model alone {r['ceiling_img_s']:.1f}",
                              f"{r['ours_vs_naive']:.2f}x naive, {r['ours_vs_ceiling']:.2f}x model alone"))
        for n, s in results["index"]["noop_reindex_seconds"].items():
            lines.append(_row(f"re-index {n} unchanged files", f"{s:.2f} s", "", ""))
    if "search" in results:
        s = results["search"]
        lines.append(_row(f"search {s['vectors']:,} vectors (dim {s['dim']}, k={s['k']}), per query",
                          f"{s['ours_ms']['median']:.2f} ms (p95 {s['ours_ms']['p95']:.2f})",
                          f"numpy brute force {s['naive_ms']['median']:.2f} ms", f"{s['naive_over_ours']:.2f}x"))
    if "cold_search" in results:
        for name, m in results["cold_search"]["models"].items():
            text, image = m["cold_text_s"], m["cold_image_s"]
            lines.append(_row(f"`clipengine search TEXT`, fresh process, {name}", f"{text['new']:.2f} s",
                              f"torch path {text['old']:.2f} s", f"{text['speedup']:.1f}x"))
            lines.append(_row(f"`clipengine search --image FILE` (not in the index), fresh process, {name}",
                              f"{image['new']:.2f} s", f"torch path {image['old']:.2f} s", f"{image['speedup']:.1f}x"))
            lines.append(_row(f"text query in a running `Searcher`, {name}", f"{m['warm_text_ms']['median_ms']:.1f} ms",
                              "", ""))
    if "serve" in results:
        v = results["serve"]
        warm, cli = v["warm_1_client"], v["cli_search_s"]
        lines.append(_row(f"text query through `clipengine serve` (HTTP, 1 client), {v['model']}",
                          f"{warm['p50_ms']:.1f} ms p50, {warm['p99_ms']:.1f} ms p99", "", ""))
        lines.append(_row("`clipengine serve` throughput at " + " / ".join(str(r["clients"]) for r in v["throughput"])
                          + " clients", " / ".join(f"{r['queries_per_second']:.0f}" for r in v["throughput"])
                          + " queries/s", "", ""))
        lines.append(_row(f"`clipengine search TEXT`, fresh process, through a running service, {v['model']}",
                          f"{cli['through_service_median']:.2f} s", f"no service {cli['without_service_median']:.2f} s",
                          f"{cli['ratio']:.2f}x"))
    if "duplicates" in results:
        d = results["duplicates"]
        lines.append(_row(f"`clipengine duplicates` at {d['vectors']:,} vectors, fresh process",
                          f"{d['cli_seconds']:.1f} s ({d['near_pairs_grouped']}/{d['planted_near']} near, "
                          f"{d['exact_pairs_grouped']}/{d['planted_exact']} identical grouped)",
                          f"exact range scan {d['pairs']['flat_seconds']:.1f} s (ours {d['pairs']['ivf_seconds']:.1f} s, "
                          f"recall {d['pairs']['ivf_recall']:.3f})", f"{d['pairs']['speedup']:.1f}x"))
    if "embed_runtime" in results:
        e = results["embed_runtime"]["speed"]
        rates = e["images_per_second"]
        for name in ("onnx fp32", "onnx int8"):
            lines.append(_row(f"embed {e['size']} on CPU, {e['model']}, onnxruntime {name.split()[1]}",
                              f"{rates[name]:.1f} img/s", f"torch {rates['torch']:.1f} img/s",
                              f"{e['vs_torch'][name]:.2f}x"))
    if "export" in results:
        for r in results["export"]["architectures"]:
            if r["loaded"]:
                towers = ", ".join(f"{t} {v['status']}" for t, v in r["towers"].items())
                lines.append(_row(f"export + check query encoders, {r['arch']}", f"{r['export_and_check_s']:.0f} s: {towers}",
                                  "", ""))
    if "ann" in results:
        a = results["ann"]
        auto, flat = a["auto"], a["flat"]
        if auto:
            lines.append(_row(f"search {a['n']:,} clustered vectors, automatic ANN index ({auto['kind']}), per query",
                              f"{auto['p50_ms']:.2f} ms p50 at recall@10 {auto['recall_at_10']:.3f}",
                              f"exact flat {flat['p50_ms']:.1f} ms", f"{flat['p50_ms'] / auto['p50_ms']:.0f}x"))
        blas = a["blas_threshold_ms"]
        two = [key for key in blas if not key.startswith("1 ")]
        if two:
            default, ours = (blas[k] for k in sorted(two))  # "... default threshold" sorts before "... ours ..."
            lines.append(_row("flat search of 100,000 vectors, batch of 16 queries", f"{ours['16']:.1f} ms",
                              f"faiss default BLAS threshold {default['16']:.1f} ms", f"{default['16'] / ours['16']:.1f}x"))
        store = a.get("store_path")
        if store:
            lines.append(_row(f"index of {store['n']:,} vectors on disk: build + tune, then Searcher per query",
                              f"{store['save_faiss_s']:.0f} s; {store['searcher_p50_ms']:.2f} ms p50 "
                              f"(recall@10 {store['tuning']['recall_at_10']:.3f})", "", ""))
            lines.append(_row("`clipengine search --vector` on it, fresh process", f"{store['cli_search_vector_s']:.2f} s", "", ""))
    if "train" in results:
        for name, regime in results["train"]["regimes"].items():
            t, c = regime["summary"], regime["config"]
            seeds = f"{len(regime['seeds'])} seed{'s' if len(regime['seeds']) > 1 else ''}"
            lines.append(_row(f"train {name} ({c['model']}, batch {c['batch']}, {t['ours']['steps']} steps, {seeds})",
                              f"{t['ours']['samples_per_second']:.1f} samples/s",
                              f"open_clip trainer {t['open_clip']['samples_per_second']:.1f} samples/s",
                              f"{regime['ratio_samples_per_second']:.2f}x"))
            if "recall_difference" in regime:
                lines.append(_row(f"held-out recall after that ({name}, mean of {seeds}), T->I R@1/5/10 | I->T R@1/5/10",
                                  _recall_cells(t["ours"]["recall"]), f"open_clip trainer {_recall_cells(t['open_clip']['recall'])}",
                                  ""))
    if "recall" in results:
        side, scale = results["recall"]["side_by_side"], results["recall"]["at_scale"]
        ours, theirs = side["ours"], side["clip_benchmark"]
        lines.append(_row(f"recall@1,5,10 of {ours['images']:,} images x {ours['captions']:,} captions",
                          f"{ours['seconds']:.1f} s, peak RSS {ours['peak_rss_mb'] / 1024:.1f} GB",
                          f"CLIP_benchmark {theirs['seconds']:.1f} s, peak RSS {theirs['peak_rss_mb'] / 1024:.1f} GB",
                          f"{side['speedup']:.1f}x faster, same numbers: {side['same_metrics']}"))
        lines.append(_row(f"recall@1,5,10 of {scale['images']:,} images x {scale['captions']:,} captions",
                          f"{scale['seconds']:.0f} s, peak RSS {scale['peak_rss_mb'] / 1024:.1f} GB",
                          "dense matrix: would need "
                          f"{scale['images'] * scale['captions'] * 4 / 2**30:.0f} GB", ""))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    parser.add_argument("--reuse", action="store_true", help="use today's result of a benchmark if it exists")
    args = parser.parse_args()
    chosen = args.only.split(",") if args.only else list(BENCHMARKS)
    unknown = sorted(set(chosen) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}")
    import platform

    results: dict = {"date": dt.date.today().isoformat(), "quick": args.quick,
                     "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores"}
    with tempfile.TemporaryDirectory() as tmp:
        for name in chosen:
            today = RESULTS / f"{name}-{results['date']}.json"
            if args.reuse and today.is_file() and not args.quick:
                print(f"== bench_{name}.py: reusing {today.relative_to(HERE.parent)}", flush=True)
                results[name] = json.loads(today.read_text())
            else:
                results[name] = run(name, args.quick, Path(tmp) / f"{name}.json" if args.quick else today)
    table = markdown(results)
    print("\n" + table)
    if not args.quick:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"{results['date']}.json").write_text(json.dumps(results, indent=2) + "\n")
        (RESULTS / f"{results['date']}.md").write_text(table)
        print(f"written {RESULTS / results['date']}.json and .md")


if __name__ == "__main__":
    main()
