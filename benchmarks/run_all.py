"""Every clipengine benchmark in one command: writes benchmarks/results/<date>.json and <date>.md.

Runs, each in its own process and side by side with its baseline:
  bench_index.py   embedding throughput (ours vs the naive loop vs the model alone), memory, no-op re-index
  bench_add_photos.py  adding 1, 10, 100 photos in a fresh process: the runtime chosen (torch-free) vs torch
  bench_watch.py   `index --watch`: from a file's last write to searchable, a burst of 10,000, idle CPU
  bench_formats.py  12 MP HEIC against the same pictures as JPEG; camera RAW demosaiced against a preview
  bench_video.py   videos: looks at scene changes against decoding every frame, the sampling settings measured
  bench_search.py  search latency (ours vs numpy brute force)
  bench_cold_search.py  `clipengine search` in a fresh process: the ONNX query path vs the torch one, where the time goes
  bench_serve.py   `clipengine serve`: warm queries through HTTP, throughput by clients, the CLI through a service
  bench_duplicates.py  `clipengine duplicates` at 100,000 vectors, and its search against the exact all-pairs scan
  bench_embed_runtime.py  embedding images on the CPU: torch vs onnxruntime fp32 vs int8, and what each changes in recall
  bench_export.py  which architectures export to query encoders, in how long, how close to torch
  bench_ann.py     approximate indexes at 1M x 512: each kind vs exact flat, the automatic choice, BLAS threshold
  bench_train.py   training throughput and held-out recall, ours vs open_clip's trainer: scenes, emoji, photos
  bench_recall.py  recall@k cost (ours vs CLIP_benchmark's dense matrix), and at 100k x 500k
The Markdown table of a run goes to results/<date>.md; docs/performance.md, the one page users read for
numbers, is generated from the newest result file of each benchmark (`--page` writes it again alone).

    python benchmarks/run_all.py            # about an hour on 2 cores (bench_index is most of it)
    python benchmarks/run_all.py --quick    # small sizes, minutes: checks that every script runs
    python benchmarks/run_all.py --only search,recall
    python benchmarks/run_all.py --reuse    # keep today's results/<name>-<date>.json, run the rest
    python benchmarks/run_all.py --page     # only write docs/performance.md from the result files
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
PAGE = HERE.parent / "docs" / "performance.md"
BENCHMARKS = ("index", "add_photos", "watch", "metadata_scan", "formats", "video", "search", "cold_search", "serve",
              "duplicates", "embed_runtime", "export", "ann", "filtered", "text_queries", "train", "stream", "recall")
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
    return " · ".join(" / ".join(f"{100 * recall[f'{d}_R@{k}']:.1f}" for k in (1, 5, 10))
                      for d in ("text_to_image", "image_to_text"))


def _seeds_lower(held: dict) -> int:
    """Seeds whose streamed run scored below the one read as files (text -> image R@10)."""
    key = "text_to_image_R@10"
    return sum(s["recall"][key] < d["recall"][key] for s, d in zip(held["runs"]["streamed"], held["runs"]["disk"],
                                                                   strict=True))


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
    if "metadata_scan" in results:
        m = results["metadata_scan"]
        p = m["per_10000"]
        lines.append(_row(f"`clipengine index` over {m['files']:,} files whose metadata must be read (an index made "
                          "before it was kept): headers read, positions named", f"{m['backfill_seconds']:.2f} s (headers "
                          f"{p['headers_in_process']:.2f} s, places {p['naming_in_process']:.2f} s)",
                          f"the unchanged re-scan {m['unchanged_seconds']:.2f} s",
                          f"{m['backfill_seconds'] / m['unchanged_seconds']:.1f}x, once"))
    if "formats" in results:
        f = results["formats"]
        d, idx = f["decode_ms"], f["index_images_per_second_tiny"]
        lines.append(_row("decode a 12 MP HEIC (draft to 224 px), per image", f"{d['heic']:.0f} ms",
                          f"the same picture as JPEG {d['jpeg']:.0f} ms", f"{f['heic_over_jpeg_decode']:.2f}x the JPEG's"))
        lines.append(_row("index 12 MP HEIC, tiny model, 2 workers", f"{idx['heic']:.1f} img/s",
                          f"the same pictures as JPEG {idx['jpeg']:.1f} img/s", f"{idx['heic'] / idx['jpeg']:.2f}x"))
        lines.append(_row("a 24 MP camera RAW file without a usable preview: LibRaw's half-size demosaic",
                          f"{d['raw']:.0f} ms", f"decoding a 1620x1080 preview {d['preview']:.0f} ms",
                          f"{f['raw_demosaic_over_preview']:.0f}x the preview's"))
        if "raw_recall" in f:
            r = f["raw_recall"]
            lines.append(_row("held-out recall (T->I R@1/5/10 · I->T R@1/5/10, %), RAW read by its full demosaic, "
                              "tiny trained on the scenes", _recall_cells(r["demosaic"]),
                              f"through its preview {_recall_cells(r['preview'])}",
                              f"R@10 {r['demosaic_minus_preview_points']['text_to_image_R@10']:+.1f} / "
                              f"{r['demosaic_minus_preview_points']['image_to_text_R@10']:+.1f} points"))
    if "video" in results:
        v = results["video"]
        for arch, m in v["models"].items():
            lines.append(_row(f"index {v['videos']} videos ({v['video_seconds']:.0f} s, {v['size']} H.264, {v['fps']} fps), "
                              f"{arch} on 2 cores", f"{m['video_seconds_per_second']:.1f} s of video per second "
                              f"({m['frames']} frames)", f"every frame decoded and embedded: "
                              f"{m['every_frame_video_seconds_per_second']:.2f} s per second",
                              f"{m['speedup_vs_every_frame']:.1f}x"))
        lines.append(_row("frames embedded per minute of video, defaults", f"{v['default_frames_per_minute']:.0f} "
                          f"({100 * v['default_moments_found']:.0f}% of scenes found at their moment)",
                          f"every frame: {v['every_frame_per_minute']:.0f}",
                          f"{v['every_frame_per_minute'] / v['default_frames_per_minute']:.0f}x fewer"))
    if "search" in results:
        s = results["search"]
        lines.append(_row(f"search {s['vectors']:,} vectors (dim {s['dim']}, k={s['k']}), per query",
                          f"{s['ours_ms']['median']:.2f} ms (p95 {s['ours_ms']['p95']:.2f})",
                          f"numpy brute force {s['naive_ms']['median']:.2f} ms", f"{s['naive_over_ours']:.2f}x"))
    if "add_photos" in results:
        a = results["add_photos"]
        for model, m in a["models"].items():
            r = m["added"].get("10 12 MP")
            if r:
                lines.append(_row(f"add 10 photos (12 MP JPEGs) to a {model} index, `clipengine index` in a fresh process",
                                  f"{r['ours_s']:.2f} s", f"with torch {r['torch_s']:.2f} s", f"{r['speedup']:.1f}x"))
    if "watch" in results:
        w = results["watch"]
        one, burst = w["one_a_second"], w["burst"]
        lines.append(_row("`index --watch`: a photo searchable after its last write (one a second)",
                          f"{one['p50_s']:.2f} s p50, {one['p99_s']:.2f} s p99",
                          f"re-running `index` each minute: 30 s + {w['rerun_s']:.1f} s on average",
                          f"{(30 + w['rerun_s']) / one['p50_s']:.0f}x sooner"))
        lines.append(_row(f"`index --watch`: a burst of {burst['files']:,} photos", f"all in {burst['all_in_s']:.0f} s "
                          f"({burst['landed']:,} landed; idle {w['idle']['cpu_s_per_hour']:.1f} CPU s per hour)", "", ""))
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
    if "filtered" in results:
        f = results["filtered"]
        for r in f["selectivities"]:
            ours, post, pre = r["ours"], r["post_filter"], r["pre_filter"]
            lines.append(_row(f"filtered search of {f['n']:,} vectors, the filter keeps {100 * r['fraction']:g}% "
                              f"({r['kept']:,}), per query", f"{ours['p50_ms']:.2f} ms at recall@10 "
                              f"{ours['recall_at_10']:.3f} ({r['plan'].split(':')[0]})",
                              f"post-filter {post['p50_ms']:.2f} ms at {post['recall_at_10']:.3f}; exact pre-filter "
                              f"{pre['p50_ms']:.2f} ms", f"{pre['p50_ms'] / ours['p50_ms']:.1f}x the pre-filter's speed"))
    if "text_queries" in results:
        t = results["text_queries"]
        row = next(r for r in t["kinds"] if r["kind"] == t["chosen"])
        before, ours = row["image_only"], row["ours"]
        lines.append(_row(f"text queries against {t['n']:,} images ({row['kind']}), recall@10 and p50 per query",
                          f"{ours['text']['recall_at_10']:.3f} at {ours['text']['p50_ms']:.2f} ms (images "
                          f"{ours['image']['recall_at_10']:.3f} at {ours['image']['p50_ms']:.2f} ms)",
                          f"tuned on images only: {before['text']['recall_at_10']:.3f} at {before['text']['p50_ms']:.2f} ms",
                          f"{(1 - before['text']['recall_at_10']) / max(1 - ours['text']['recall_at_10'], 1e-3):.1f}x "
                          "fewer neighbours missed"))
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
                lines.append(_row(f"held-out recall after that ({name}, mean of {seeds}), T->I R@1/5/10 · I->T R@1/5/10",
                                  _recall_cells(t["ours"]["recall"]), f"open_clip trainer {_recall_cells(t['open_clip']['recall'])}",
                                  ""))
    if "stream" in results:
        for name, regime in results["stream"]["regimes"].items():
            t = regime.get("throughput")
            if t:
                c, rate = t["config"], t["samples_per_second"]
                what = (f"train {name} streamed from 127.0.0.1 HTTP ({c['model']}, batch {c['batch']}, {t['steps']} steps, "
                        f"median of {len(t['runs']['http'])} rounds)")
                lines.append(_row(what, f"{rate['http']:.1f} samples/s", f"the same shards streamed from disk "
                                  f"{rate['disk']:.1f}", f"{t['http_vs_disk']:.3f}x"))
                lines.append(_row(f"{what}, against the same pairs read as files", f"{rate['http']:.1f} samples/s",
                                  f"files (map-style) {rate['disk_indexed']:.1f}", f"{t['http_vs_disk_indexed']:.3f}x"))
                lines.append(_row(f"{what}, against open_clip_train over the same URLs", f"{rate['http']:.1f} samples/s",
                                  f"open_clip_train {rate['open_clip_http']:.1f}", f"{t['ours_vs_open_clip']:.2f}x"))
            held = regime.get("recall")
            if held:
                n_seeds = len(held["runs"]["streamed"])
                lines.append(_row(f"held-out recall, {name}, {held['steps']} steps, streamed over HTTP against files "
                                  f"(mean of {n_seeds} seeds), T->I R@1/5/10 · I->T R@1/5/10",
                                  _recall_cells(held["mean"]["streamed"]), f"files {_recall_cells(held['mean']['disk'])}",
                                  ("within 2 SE" if held["within_noise"] else "not within 2 SE")
                                  + f", T->I R@10 lower in {_seeds_lower(held)} of {n_seeds} seeds"))
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


# what each benchmark compares, and how: the page's words (its numbers all come from the result files)
SECTIONS = {
    "index": ("Indexing throughput", "`clipengine index`'s pipeline end to end (scan, hash, decode, embed, commit, "
              "faiss) against the naive loop (PIL open, open_clip preprocess, model, one image at a time) and against the "
              "model alone on ready tensors, ViT-B-32 with random weights (they cost what trained ones do), batch 32, "
              "2 decode workers, medians of 3 interleaved rounds; and `clipengine index` over an unchanged folder."),
    "add_photos": ("Adding photos", "`clipengine index FOLDER` in a fresh process adding new photos (new content each "
                   "time) to an index of 200, its runtime chosen as a user gets it (torch-free: the index's ONNX image "
                   "tower, PIL and numpy), against `--runtime torch`, medians of interleaved rounds; the floor is the "
                   "same command with nothing new."),
    "watch": ("Watching", "`clipengine index FOLDER --watch` in its own process on a tiny index of 200 photos: from the "
              "end of each file's write to its row committed (a file waits 1 s to hold still first), for one photo a "
              "second and for a burst dropped at once; the watcher's CPU over a quiet minute."),
    "metadata_scan": ("Reading metadata", "10,000 photo-like 256x192 JPEGs with EXIF (taken time, camera, GPS on "
                      "walks through ten cities), indexed with the tiny model; then `clipengine index` in fresh "
                      "processes over the unchanged folder (metadata was read while decoding: today's scan and "
                      "nothing more) against the same run on a copy of the index without its metadata and places, "
                      "which reads every header and names every position once; medians of 3 interleaved rounds."),
    "formats": ("Phone and camera formats", "`open_image` as indexing calls it on 12 MP photo-like pictures "
                "saved as JPEG and as HEIC, and on 24 MP DNG files without a preview against the JPEG preview a "
                "camera embeds, rounds interleaved; then `index_folder` with the tiny model, where decoding "
                "dominates. pillow-heif writes each picture as one HEVC image, which libheif decodes on one "
                "thread: a phone's HEIC is a grid of tiles decoded in parallel, so this is the slow case. PiDNG's "
                "DNGs are uncompressed: a camera's compressed RAW costs more to unpack. The recall rows: held-out "
                "scenes read through each route a RAW file takes, the embedded preview (a 256 px JPEG) or LibRaw's "
                "full demosaic of a 512 px RGGB mosaic of the scene (linearised; no registry ships captioned RAW "
                "photos), scored by a tiny model trained on the scenes."),
    "video": ("Videos", "Generated 1280x720 H.264 videos with a keyframe a second, as phones write them: scenes of "
              "3 to 12 s of photo-like pictures panning a pixel a frame, every other change to a picture half made "
              "of the one before, one video with a black intro; where each scene starts is known. `index_folder` "
              "end to end on 2 cores (hash, looks, embedding, commit) against decoding every frame and embedding it "
              "at the measured cost per frame. A scene is found when its still picture, as the query (tiny model), "
              "finds a frame of its own video inside that scene. The sweep below chose the defaults: the highest "
              "scene-change threshold and the lowest cap that still find every scene; a look every second rather "
              "than every 2 (which found as many here, where no scene is shorter than 3 s) so that a scene of a "
              "second or two is not missed. Generated scenes change more cleanly than a phone's clips do, so "
              "a real library keeps more frames per minute than this."),
    "search": ("Search in a running process", "`Searcher.search_vector` over an exact index against numpy's brute "
               "force on the same vectors."),
    "cold_search": ("A search in a fresh process", "`clipengine search` as a user runs it (fresh processes, "
                    "bytecode cached) through the exported query encoders, alternating with `--runtime torch` (the "
                    "path every search took before them), medians of fresh processes; then where the time goes."),
    "serve": ("`clipengine serve`", "Distinct text queries through HTTP with keep-alive, throughput by the number "
              "of clients, and `clipengine search` in a fresh process with and without a running service."),
    "duplicates": ("`clipengine duplicates`", "Planted near and identical copies among random vectors: the command "
                   "in a fresh process, and its range search against the exact all-pairs scan."),
    "embed_runtime": ("Embedding through onnxruntime", "The indexing hot path embedding JPEGs with torch, "
                      "onnxruntime fp32 and onnxruntime int8, interleaved."),
    "export": ("Which architectures export", "Each architecture's query encoders exported and checked against torch "
               "(random weights)."),
    "ann": ("Approximate indexes at a million vectors", "Unit vectors from a mixture of Gaussians shaped like CLIP "
            "embeddings; the depth tuned to the recall target on held-out queries and measured on others against "
            "exact inner-product search; single-query latency. Each speed-up is against exact flat search in its "
            "own run. The last rows go through an index on disk: committed vectors, the automatic choice, training "
            "and tuning, then `Searcher` and a fresh `clipengine search --vector`."),
    "filtered": ("Filtered search at a million vectors", "Clustered unit vectors (as above) in the index clipengine "
                 "chooses for them, tuned to recall@10 0.95 as a build tunes it; a filter keeps a random sample of "
                 "the ids. Ours is the planner (`ann.SearchableIndex.search` with the kept ids: an exact scan of the "
                 "kept vectors, or the index with the filter at a depth raised for the fraction kept); the baselines "
                 "are the unfiltered index asked for 10·k hits then filtered, and numpy's scan of the kept vectors. "
                 "Recall@10 is against the exact filtered top 10, p50 of single queries (the pre-filter's on 20 "
                 "queries where it keeps over 1%)."),
    "text_queries": ("Text queries: the modality gap", "An image gallery with held-out image queries and caption "
                     "queries across a modality gap (tests/synthetic.py `cross_modal_set`, its hardness matched to "
                     "LAION's CLIP ViT-B/32 embeddings: LID10 and RC10 below). Each index kind is built once and "
                     "tuned three ways: on images only (one depth for every query, as before), autofaiss-style (the "
                     "deepest search within 10 ms, recall never measured), and ours (each kind of query tuned on its "
                     "own sample and searched at its own depth). Recall@10 against exact search on 500 other "
                     "queries of each kind; p50 of single queries."),
    "train": ("Training against open_clip's trainer", "`clipengine train` and `open_clip_train.main` at equal data, "
              "steps, batch, learning rate, warmup, weight decay, clipping and precision, seeds run alternately; "
              "samples/s is each trainer's own clock after step 5, recall is each final model scored by the same "
              "code on the same held-out set (percent)."),
    "stream": ("Training on streamed shards", "`clipengine train` on img2dataset-layout shards (250 samples each, "
               "sizes.json) served by a local HTTP server on 127.0.0.1, against the same shards streamed from the disk "
               "(`--stream`), the same pairs read as files (a CSV: the map-style path), and open_clip_train streaming "
               "the same URLs (webdataset over curl) with the same model, batch, steps and settings; no decode cache; "
               "samples/s is each trainer's own clock (ours from the step its CPU plan was chosen, open_clip's after "
               "step 5), the median of alternating rounds. Recall: each "
               "final model scored on the same held-out set (percent); within noise means every column's mean "
               "difference is within 2 standard errors of the seeds' paired differences."),
    "recall": ("Recall@k at scale", "`clipengine.metrics.retrieval_recall` against CLIP_benchmark's dense score "
               "matrix on the same embeddings, then at a size the dense matrix cannot hold."),
}


def latest_results(folder: Path = RESULTS) -> dict[str, tuple[str, Path]]:
    """The newest full run of each benchmark: name -> (date, file), from results/<name>-<date>.json."""
    found: dict[str, tuple[str, Path]] = {}
    for path in sorted(folder.glob("*.json")):
        match = re.fullmatch(r"(.+)-(\d{4}-\d\d-\d\d)\.json", path.name)
        if match and match.group(1) in BENCHMARKS and match.group(2) >= found.get(match.group(1), ("",))[0]:
            found[match.group(1)] = (match.group(2), path)
    return found


def _detail(name: str, data: dict) -> list[str]:
    """Tables beside the summary rows, where a benchmark measured more than one line can say."""
    lines: list[str] = []
    if name == "index" and data.get("peak_rss_mb"):
        sizes = list(data["peak_rss_mb"])
        lines += ["", "| peak memory (tiny model) | " + " | ".join(f"{int(n):,} images" for n in sizes) + " |",
                  "|---|" + "---|" * len(sizes),
                  "| main process | " + " | ".join(f"{data['peak_rss_mb'][n]['main_peak_mb']:,.0f} MB" for n in sizes) + " |",
                  "| main + decode workers | " + " | ".join(f"{data['peak_rss_mb'][n]['tree_peak_mb']:,.0f} MB"
                                                        for n in sizes) + " |"]
    if name == "ann" and data.get("kinds"):
        lines += ["", "| kind | factory | build | memory | depth | recall@10 | p50 | p99 | vs exact flat |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for k in data["kinds"]:
            reached = "" if k["reached"] else " (target not reached)"
            auto = " (auto)" if k.get("chosen_at") else ""
            lines.append(f"| {k['kind']}{auto} | `{k['factory']}` | {k['build_s']:.0f} s | {k['bytes'] / 2**20:,.0f} MiB | "
                         f"{k['param']}={k['value']} | {k['recall_at_10']:.3f}{reached} | {k['p50_ms']:.2f} ms | "
                         f"{k['p99_ms']:.2f} ms | {k['speedup_vs_flat']:.1f}x |")
    if name == "add_photos":
        lines += ["", "| model | photos added | ours | with torch | ratio | ours ran |", "|---|---|---|---|---|---|"]
        for model, m in data["models"].items():
            for what, r in m["added"].items():
                lines.append(f"| {model} | {what} | {r['ours_s']:.2f} s | {r['torch_s']:.2f} s | {r['speedup']:.1f}x | "
                             f"{r['chosen'].split(' (')[0]} |")
            imports = ", ".join(f"{k} {v:.2f} s" for k, v in list(m["imports_s"].items())[:5])
            lines += [f"| {model} | nothing new (the floor) | {m['noop_s']:.2f} s | | | python alone "
                      f"{m['python_start_s']:.2f} s; imports: {imports} |"]
    if name == "text_queries":
        h, laion = data["hardness"], data["laion"]
        lines += ["", "Hardness of the queries (medians): " + "; ".join(
            f"{kind} LID10 {h[kind]['lid']:.1f} (LAION {laion[kind]['lid']}), RC10 {h[kind]['rc']:.2f} "
            f"(LAION {laion[kind]['rc']})" for kind in ("image", "text")) + ".", "",
            "| kind | build | tuning | text recall@10 | text p50 | image recall@10 | image p50 |", "|---|---|---|---|---|---|---|"]
        for k in data["kinds"]:
            for name_, label in (("image_only", "on images only"), ("autofaiss_style", "autofaiss-style"),
                                 ("ours", "per query kind")):
                r = k[name_]
                lines.append(f"| {k['kind']} | {k['build_s']:.0f} s | {label} | {r['text']['recall_at_10']:.3f} | "
                             f"{r['text']['p50_ms']:.2f} ms | {r['image']['recall_at_10']:.3f} | {r['image']['p50_ms']:.2f} ms |")
        for key, label in (("trained", "the tiny model trained here on the built-in scenes: {n:,} scenes it never saw"),
                           ("emoji", "a small model trained here on the emoji development set: its {n:,} drawings")):
            t = data.get(key)
            if not t:
                continue
            lines += ["", f"Bed (a), {label.format(n=t['n'])} indexed with `{t['factory']}`, {t['captions']:,} held-out "
                      f"captions as queries (text LID10 {t['hardness']['text']['lid']:.1f}, RC10 "
                      f"{t['hardness']['text']['rc']:.2f}; image {t['hardness']['image']['lid']:.1f}, "
                      f"{t['hardness']['image']['rc']:.2f}). Captions get recall@10 "
                      f"{t['captions_at_image_depth']['recall_at_10']:.3f} at the depth tuned on images (nprobe "
                      f"{t['image_tuning']['value']}) and {t['captions_at_prompt_depth']['recall_at_10']:.3f} at the "
                      f"depth the build tuned on the shipped prompts (nprobe {t['prompt_tuning']['value']}, which "
                      f"predicted {t['prompt_tuning']['recall_at_10']:.3f}); tuned on half of the captions themselves, "
                      f"nprobe {t['caption_tuning']['value']}."]
        if data.get("scale"):
            lines += ["", "The generator at scale, its gallery streamed: hardness, and the probes `IVF4096,Flat` needs "
                      "for recall@100 0.95 (LAION at 1M: 31 for images, 113 for texts, 3.6x).", "",
                      "| gallery | image LID10 | image RC10 | text LID10 | text RC10 | nprobe, images | nprobe, texts | "
                      "ratio | texts at the image nprobe |", "|---|---|---|---|---|---|---|---|---|"]
            lines += [f"| {r['n']:,} | {r['image']['lid']:.1f} | {r['image']['rc']:.2f} | {r['text']['lid']:.1f} | "
                      f"{r['text']['rc']:.2f} | {r['probes_for_recall_at_100']['image']} | "
                      f"{r['probes_for_recall_at_100']['text']} | {r['probe_ratio']:.2f}x | "
                      f"{r['text_recall_at_image_probes']:.3f} |" for r in data["scale"]]
    if name == "embed_runtime" and data.get("recall"):
        lines += ["", "Held-out recall through each runtime (percent), T->I R@1/5/10 · I->T R@1/5/10:", "",
                  "| runtime | recall |", "|---|---|"]
        lines += [f"| {runtime} | {_recall_cells(r)} |" for runtime, r in data["recall"].items()
                  if runtime != "change_vs_torch_points"]
    if name == "export":
        failed = [r for r in data["architectures"] if not r["loaded"]]
        if failed:
            lines += ["", "Could not be built here: " + "; ".join(
                f"{r['arch']} ({r.get('reason', '').splitlines()[0][:100]}...)"
                for r in failed) + "."]
    if name == "video" and data.get("sweep"):
        split = data["look_split_seconds"]
        lines += ["", "Where the looks' time goes at the defaults (seconds, all videos): " + ", ".join(
            f"{stage} {seconds:.2f}" for stage, seconds in split.items()) + f"; decoding every frame instead: "
            f"{data['decode_every_frame_seconds']:.1f} s.", "",
            "| look every | scene change | frames at most | frames per minute | scenes found at their moment | seconds of video looked at per second |",
            "|---|---|---|---|---|---|"]
        lines += [f"| {r['interval']:g} s | {r['scene_change']:g} | {r['max_frames']} | {r['frames_per_minute']:.1f} | "
                  f"{100 * r['moments_found']:.0f}% | {r['looked_seconds_per_second']:.0f} |" for r in data["sweep"]]
    if name == "cold_search":
        stages = None
        for model, m in data["models"].items():
            if stages is None:
                stages = list(m["split_ms"])
                lines += ["", "Where a cold text search goes (ms, medians of fresh processes):", "",
                          "| model | " + " | ".join(stages) + " |", "|---|" + "---|" * len(stages)]
            lines.append(f"| {model} | " + " | ".join(f"{m['split_ms'][s]:.0f}" for s in stages) + " |")
    return lines


def performance_page(folder: Path = RESULTS) -> str:
    """docs/performance.md: every benchmark's newest result, generated, so that no number is typed twice."""
    lines = ["# Performance", "",
             "Generated by `python benchmarks/run_all.py --page` from the newest result of each benchmark in "
             "[`benchmarks/results/`](../benchmarks/results/); do not edit it by hand. Every benchmark runs side by side "
             "with its baseline in one run (these machines are shared and noisy), on the project's machine: 2 CPU "
             "cores, no GPU. `make bench` runs them all.", ""]
    for name, (date, path) in sorted(latest_results(folder).items(), key=lambda item: BENCHMARKS.index(item[0])):
        data = json.loads(path.read_text())
        title, method = SECTIONS[name]
        rows = markdown({"date": date, "machine": "", "quick": False, name: data}).splitlines()[4:]
        lines += [f"## {title}", "", f"{method} `python benchmarks/bench_{name}.py`, {date} "
                  f"([`{path.name}`](../benchmarks/results/{path.name})).", "",
                  "| measurement | ours | baseline | ratio |", "|---|---|---|---|", *rows, *_detail(name, data), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    parser.add_argument("--reuse", action="store_true", help="use today's result of a benchmark if it exists")
    parser.add_argument("--page", action="store_true", help=f"only write {PAGE.relative_to(HERE.parent)} from the results")
    args = parser.parse_args()
    if args.page:
        PAGE.write_text(performance_page())
        print(f"written {PAGE}")
        return
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
        PAGE.write_text(performance_page())
        print(f"written {RESULTS / results['date']}.json and .md, and {PAGE}")


if __name__ == "__main__":
    main()
