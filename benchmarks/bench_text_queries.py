"""Text queries against an image gallery: the recall users get from an index tuned three ways.

Most searches are texts, and CLIP's text embeddings lie away from its image embeddings (the modality
gap), so a partition index tuned on image queries under-serves them. Data: tests/synthetic.py
`cross_modal_set`, an image gallery with held-out image queries and caption queries shaped after LAION's
CLIP ViT-B/32 embeddings; its hardness (`query_hardness`: LID10, RC10) is printed beside LAION's (VIBE,
Jääsaari et al. 2025). 500 queries of each kind tune, 500 others measure.

For each index kind (the automatic choice, or --kinds), built once, three tunings side by side:
  - image-only: `ann.tune` on held-out images, that one depth for every query (how clipengine tuned before
    issue 24, with today's `ann.tune`);
  - autofaiss-style: the deepest nprobe/efSearch whose single-query p50 on indexed vectors stays within
    autofaiss's default max_query_time_ms (10 ms): tuned for speed, recall never measured;
  - ours: `ann.tune` on the image sample and, separately, on the text sample (text_queries.py), each kind of
    query at its own depth (`SearchableIndex.search(kind=)`), as an index build now does.
For each: recall@10 against exact search and p50 single-query latency, for text and for image queries.
Target at 1M x 512 on 2 cores: text recall@10 >= 0.95 at p50 <= 6 ms, image recall@10 >= 0.95.

Bed (a), real embeddings from models trained here (`captions_bed`), indexed as a user would (`index_folder`,
IVF forced), their held-out captions as the text queries: the tiny model trained on the built-in scenes with
20,000 scenes it never saw, and small trained on the emoji development set (`make emoji-set`) with every
drawing. Does the depth the build tuned on the shipped prompts hold for the real captions?

At scale (`at_scale`): the generator at 100k, 1M and 10M, its gallery streamed: the hardness of each kind of
query and the probes IVF4096,Flat needs for recall@100 0.95 with each (LAION 1M: 31 for images, 113 for texts).

    python benchmarks/bench_text_queries.py                 # N = 1,000,000, both beds, at scale (about 50 minutes)
    python benchmarks/bench_text_queries.py --quick         # N = 100,000
    python benchmarks/bench_text_queries.py --kinds ivf-flat,hnsw
    python benchmarks/bench_text_queries.py --parts beds    # bed (a) alone, added to today's result
    python benchmarks/bench_text_queries.py --parts beds --beds emoji
    python benchmarks/bench_text_queries.py --parts scale   # hardness and probe gap at 100k, 1M, 10M
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from results_file import RESULTS, save_result  # benchmarks/ is on sys.path when a script runs
from synthetic import cross_modal_set, cross_modal_stream, nearest_in, query_hardness

from clipengine.index import ann

DIM, K = 512, 10
LAION = {"image": {"lid": 14.7, "rc": 2.97}, "text": {"lid": 81.7, "rc": 1.27}}  # VIBE, at 1M
VIBE_LISTS, VIBE_PROBES = 4096, {"image": 31, "text": 113}  # IVF4096,Flat's nprobe for recall@100 0.95 on LAION 1M
AUTOFAISS_MAX_QUERY_MS = 10.0  # autofaiss's default max_query_time_ms
P50_TARGET_MS = 6.0


def factories(n: int) -> dict[str, str]:
    """Every kind clipengine can choose at n (ann.candidate_plans), and an HNSW graph."""
    return {**{p.kind: p.factory for p in ann.candidate_plans(n, DIM)}, "hnsw": f"IDMap2,HNSW{ann.HNSW_M}"}


def measured(searchable: ann.SearchableIndex, truth: ann.GroundTruth, kind: str | None) -> dict:
    """recall@10 of one kind of query at the depth `searchable` gives that kind, and its p50 one at a time."""
    _, found = searchable.search(truth.queries, K, kind=kind)
    p50, _ = ann.single_query_latency(searchable.index, truth.queries[:300],
                                      search=lambda q: searchable.search(q, K, kind=kind))
    return {"recall_at_10": round(truth.recall(found), 4), "p50_ms": p50}


def autofaiss_depth(index, indexed: np.ndarray) -> int | None:
    """The deepest depth (doubling) whose single-query p50 on indexed vectors stays within the time budget."""
    if ann.depth_name(index) is None:
        return None
    best = None
    for depth in ann._depths(index):
        ann.set_depth(index, depth)
        p50, _ = ann.single_query_latency(index, indexed[:200])
        if p50 > AUTOFAISS_MAX_QUERY_MS:
            break
        best = depth
    ann.set_depth(index, best or 1)
    return best


def bench_kind(kind: str, factory: str, images: np.ndarray, truths: dict[str, ann.GroundTruth],
               seed: int) -> dict:
    n = len(images)
    ids = np.arange(n, dtype=np.int64)
    start = time.perf_counter()
    index = ann.new_index(factory, DIM)
    ann.train_index(index, images[ann.sample_ids(ids, ann.training_size(factory, n), seed)])
    ann.add_chunks(index, ann.iter_array_chunks(ids, images))
    build_s = time.perf_counter() - start
    print(f"  {kind} ({factory}): built in {build_s:.0f} s", flush=True)
    row: dict = {"kind": kind, "factory": factory, "build_s": round(build_s, 1)}

    def both(searchable: ann.SearchableIndex) -> dict:
        return {"text": measured(searchable, truths["text_test"], "text"),
                "image": measured(searchable, truths["image_test"], "image")}

    start = time.perf_counter()
    image_tuning = ann.tune(index, truths["image_tune"])
    row["image_only"] = {"depth": image_tuning.to_dict(), **both(ann.SearchableIndex(index))}
    depth = autofaiss_depth(index, images[ann.sample_ids(ids, 200, seed + 5)])
    row["autofaiss_style"] = {"depth": depth, **both(ann.SearchableIndex(index))}
    text_tuning = ann.tune(index, truths["text_tune"])
    image_tuning = ann.tune(index, truths["image_tune"])  # last: its depth stays in the index, as a build leaves it
    row["tune_s"] = round(time.perf_counter() - start, 1)
    row["ours"] = {"depth": {"image": image_tuning.to_dict(), "text": text_tuning.to_dict()},
                   **both(ann.SearchableIndex(index, text_depth=text_tuning.depth))}
    for name in ("image_only", "autofaiss_style", "ours"):
        r = row[name]
        print(f"    {name:<16} text recall@10 {r['text']['recall_at_10']:.3f} p50 {r['text']['p50_ms']:6.2f} ms | "
              f"image recall@10 {r['image']['recall_at_10']:.3f} p50 {r['image']['p50_ms']:6.2f} ms", flush=True)
    print(f"    depths: image {image_tuning.param} {image_tuning.value} (k_factor {image_tuning.k_factor}), "
          f"text {text_tuning.param} {text_tuning.value} (k_factor {text_tuning.k_factor}); "
          f"autofaiss-style {depth}", flush=True)
    return row


def captions_bed(root: Path, run: Path, images: Path, captions: list[str], label: str) -> dict:
    """An index of `images` built the way a user builds one with the model in `run` (IVF forced with --faiss:
    the automatic choice is exact at these sizes), its own held-out `captions` as text queries. The build
    tunes text queries on the shipped prompts; how well that predicts recall on the real captions is
    measured on the second half of them, beside the depth tuning on the first half would choose."""
    from clipengine.index.faiss_view import FaissPolicy, SearchStructure
    from clipengine.index.pipeline import index_folder
    from clipengine.index.search import Searcher
    from clipengine.index.store import IndexStore
    from clipengine.models import ModelSpec

    n = sum(1 for _ in images.iterdir())
    factory = f"IVF{ann.n_lists(n)},Flat"
    start = time.perf_counter()
    index_folder(images, root / "idx", ModelSpec(checkpoint=str(run)), faiss_policy=FaissPolicy(factory=factory),
                 export=False)
    print(f"  indexed {n:,} {label} with {factory} in {time.perf_counter() - start:.0f} s", flush=True)
    with IndexStore.open(root / "idx") as store:
        state = SearchStructure(store).state
        gallery = list(store.vectors_of(store.live_ids()))
        index = SearchStructure(store).view()
    with Searcher(root / "idx") as searcher:
        vectors = np.ascontiguousarray(searcher.text_vectors(captions), dtype=np.float32)
    half = len(vectors) // 2
    tune_truth, test_truth = (ann.GroundTruth.compute(vectors[rows], np.full(len(vectors[rows]), -1), iter(gallery))
                              for rows in (slice(0, half), slice(half, None)))
    prompts = state.text_tuning
    assert prompts is not None and state.tuning is not None
    on_captions = ann.tune(index.index, tune_truth)  # what tuning on the real captions would choose
    ann.set_depth(index.index, state.tuning.value)
    searchable = ann.SearchableIndex(index.index, text_depth=prompts.depth)
    gallery_vectors = np.concatenate([v for _, v in gallery])
    row = {"n": n, "factory": factory, "captions": len(captions), "hardness": {  # image queries: 500 not in the rest
        "image": query_hardness(gallery_vectors[:500], gallery_vectors[500:]),
        "text": query_hardness(vectors[:half], gallery_vectors)},
        "image_tuning": state.tuning.to_dict(), "prompt_tuning": prompts.to_dict(), "caption_tuning": on_captions.to_dict(),
        "captions_at_image_depth": measured(searchable, test_truth, "image"),
        "captions_at_prompt_depth": measured(searchable, test_truth, "text")}
    print(f"  captions: recall@10 {row['captions_at_image_depth']['recall_at_10']:.3f} at the image depth "
          f"(nprobe {state.tuning.value}), {row['captions_at_prompt_depth']['recall_at_10']:.3f} at the depth tuned "
          f"on prompts (nprobe {prompts.value}, which predicted {prompts.recall_at_10:.3f}); tuned on captions: nprobe "
          f"{on_captions.value}", flush=True)
    return row


def scenes_bed(root: Path, n: int) -> dict:
    """Bed (a) on the built-in scenes: the tiny model trained here, `n` scenes it never saw, 1,000 of their
    captions."""
    import csv

    from scene_model import tiny_trained_on_scenes

    run, captions_csv = tiny_trained_on_scenes(root, quick=False, held_out=n)
    with open(captions_csv, newline="") as f:
        captions = list(dict.fromkeys(row["caption"] for row in csv.DictReader(f)))
    captions = [captions[i] for i in np.random.default_rng(0).permutation(len(captions))[:1000]]
    return captions_bed(root, run, captions_csv.parent / "images", captions, "held-out scenes")


def emoji_bed(root: Path) -> dict:
    """Bed (a) on the emoji development set (`make emoji-set`): a small model trained here on its training
    half, every drawing of both halves as the gallery, the held-out emoji's names and keywords as queries
    (each names exactly one drawing)."""
    import csv
    import shutil

    from scene_model import small_trained_on_emoji

    run, train_csv, val_csv = small_trained_on_emoji(root)
    gallery = root / "emoji-gallery"
    gallery.mkdir()
    captions = []
    for table in (train_csv, val_csv):
        with open(table, newline="") as f:
            for row in csv.DictReader(f):
                path = Path(row["filepath"])  # .../emoji-datasource-VENDOR/img/VENDOR/64/CODE.png
                shutil.copyfile(path, gallery / f"{path.parents[1].name}-{path.name}")
                if table == val_csv:
                    captions.append(row["caption"])
    return captions_bed(root, run, gallery, captions, "emoji drawings")


def at_scale(n: int, lists: int = VIBE_LISTS) -> dict:
    """The generator's hardness and IVF probe gap at `n`, its gallery streamed (10M x 512 is 20 GB): one pass
    finds the exact 100 nearest of 500 image and 500 text queries; an IVF-Flat's recall@100 at nprobe p is
    the fraction of those neighbours whose list is among the query's p nearest centroids, so the probes
    each kind needs for recall@100 0.95 follow from k-means centroids alone, as VIBE measured them on LAION."""
    import faiss

    start = time.perf_counter()
    stream = cross_modal_stream(n, DIM, queries=1000, seed=0)
    queries = np.concatenate([stream.image_queries[:500], stream.text_queries[:500]])
    found = nearest_in(queries, stream.image_chunks(), 100, keep_vectors=True)
    assert found.vectors is not None
    sample = []
    for chunk in stream.image_chunks():  # draws are independent: the first ones are a random sample
        sample.append(chunk)
        if sum(map(len, sample)) >= 39 * lists:
            break
    kmeans = faiss.Kmeans(DIM, lists, niter=10, seed=0)
    kmeans.train(np.concatenate(sample)[:39 * lists])
    _, neighbour_list = kmeans.index.search(found.vectors.reshape(-1, DIM), 1)
    _, probe_order = kmeans.index.search(queries, lists)
    list_rank = np.empty_like(probe_order)
    np.put_along_axis(list_rank, probe_order, np.arange(lists)[None, :].repeat(len(queries), axis=0), axis=1)
    ranks = np.take_along_axis(list_rank, neighbour_list.reshape(len(queries), -1), axis=1)
    kinds = {"image": slice(0, 500), "text": slice(500, 1000)}
    probes = {kind: int(np.sort(ranks[rows].ravel())[int(np.ceil(ann.TARGET_RECALL * ranks[rows].size)) - 1] + 1)
              for kind, rows in kinds.items()}
    row = {"n": n, "lists": lists, **{kind: found.rows(rows).hardness() for kind, rows in kinds.items()},
           "probes_for_recall_at_100": probes, "probe_ratio": round(probes["text"] / probes["image"], 2),
           "text_recall_at_image_probes": round(float((ranks[kinds["text"]] < probes["image"]).mean()), 4),
           "seconds": round(time.perf_counter() - start)}
    print(f"  {n:,}: image LID10 {row['image']['lid']:.1f} RC10 {row['image']['rc']:.2f}, text LID10 "
          f"{row['text']['lid']:.1f} RC10 {row['text']['rc']:.2f}; IVF{lists},Flat recall@100 0.95 at nprobe "
          f"{probes['image']} (images) vs {probes['text']} (texts): {row['probe_ratio']}x (LAION {VIBE_PROBES['text']} "
          f"vs {VIBE_PROBES['image']}); texts at the image nprobe {row['text_recall_at_image_probes']:.3f} "
          f"({row['seconds']} s)", flush=True)
    return row


def trained_beds(scenes: int, beds: list[str]) -> dict:
    """Bed (a) for each of `beds`: {"trained": the scenes bed, "emoji": the emoji bed}."""
    record = {}
    for bed in beds:
        with tempfile.TemporaryDirectory() as root:
            if bed == "scenes" and scenes:
                print(f"bed (a): the tiny model trained on the built-in scenes, {scenes:,} held-out scenes", flush=True)
                record["trained"] = scenes_bed(Path(root), scenes)
            elif bed == "emoji":
                print("bed (a): a small model trained on the emoji development set", flush=True)
                record["emoji"] = emoji_bed(Path(root))
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--n", type=int, help="gallery images (default 1,000,000; --quick 100,000)")
    parser.add_argument("--kinds", help="comma-separated kinds (default: the automatic choice and ivf-flat)")
    parser.add_argument("--trained", type=int, default=20_000,
                        help="held-out scenes in bed (a), the model trained here (0: skip it)")
    parser.add_argument("--out", type=Path, help="where to write the JSON (default: results/text_queries-DATE.json)")
    parser.add_argument("--beds", default="scenes,emoji", help="bed (a): the models trained here (scenes, emoji)")
    parser.add_argument("--scale", default="100000,1000000,10000000",
                        help="gallery sizes whose hardness and probe gap are measured, streamed ('': none)")
    parser.add_argument("--parts", default="kinds,beds,scale",
                        help="kinds (the index kinds at --n), beds (bed a), scale; without kinds the others are "
                             "added to the --out file (default: today's result)")
    args = parser.parse_args()
    n = args.n or (100_000 if args.quick else 1_000_000)
    threads = ann.configure_threads(DIM)
    parts = set(args.parts.split(","))
    extra = {}
    if "scale" in parts and args.scale:
        print(f"the generator at scale, IVF{VIBE_LISTS}, 500 queries of each kind:", flush=True)
        extra["scale"] = [at_scale(int(size)) for size in args.scale.split(",")]
    if "beds" in parts:
        extra.update(trained_beds(args.trained, args.beds.split(",")))
    if "kinds" not in parts:
        path = args.out or RESULTS / f"text_queries-{dt.date.today().isoformat()}.json"
        record = json.loads(path.read_text())
        record.update(extra)
        path.write_text(json.dumps(record, indent=2) + "\n")
        print(f"written {path}")
        return
    start = time.perf_counter()
    bed = cross_modal_set(n, DIM, queries=1000, seed=0)
    print(f"{n:,} x {DIM} gallery and 1,000 + 1,000 queries generated in {time.perf_counter() - start:.0f} s; "
          f"{threads} threads", flush=True)
    hardness = {"image": query_hardness(bed.image_queries[:500], bed.images),
                "text": query_hardness(bed.text_queries[:500], bed.images)}
    for kind in ("image", "text"):
        ours, real = hardness[kind], LAION[kind]
        print(f"  {kind} queries: LID10 {ours['lid']:.1f} (LAION {real['lid']}, {ours['lid'] / real['lid'] - 1:+.0%}), "
              f"RC10 {ours['rc']:.2f} (LAION {real['rc']}, {ours['rc'] / real['rc'] - 1:+.0%})", flush=True)
    ids = np.arange(n, dtype=np.int64)
    truths = {f"{kind}_{part}": ann.GroundTruth.compute(queries[rows], np.full(500, -1),
                                                        ann.iter_array_chunks(ids, bed.images))
              for kind, queries in (("image", bed.image_queries), ("text", bed.text_queries))
              for part, rows in (("tune", slice(0, 500)), ("test", slice(500, 1000)))}
    known = factories(n)
    chosen = ann.choose_index(n, DIM)
    kinds = args.kinds.split(",") if args.kinds else list(dict.fromkeys([chosen.kind, "ivf-flat"]))
    rows = [bench_kind(kind, known[kind], bed.images, truths, seed=0) for kind in kinds]
    ours = next(r for r in rows if r["kind"] == chosen.kind) if chosen.kind in kinds else rows[0]
    text, image = ours["ours"]["text"], ours["ours"]["image"]
    meets = text["recall_at_10"] >= ann.TARGET_RECALL and text["p50_ms"] <= P50_TARGET_MS \
        and image["recall_at_10"] >= ann.TARGET_RECALL
    before = ours["image_only"]["text"]["recall_at_10"]
    print(f"{ours['kind']}: text recall@10 {before:.3f} tuned on images -> {text['recall_at_10']:.3f} tuned on texts "
          f"(p50 {text['p50_ms']:.2f} ms), image {image['recall_at_10']:.3f}: "
          f"{'meets' if meets else 'MISSES'} the target (text >= {ann.TARGET_RECALL} at p50 <= {P50_TARGET_MS} ms, "
          f"image >= {ann.TARGET_RECALL})")
    record = {"benchmark": "text_queries", "date": dt.date.today().isoformat(), "n": n, "dim": DIM, "threads": threads,
              "data": f"cross_modal_set({n}, {DIM}, queries=1000, seed=0): 500 of each kind tune, 500 measure",
              "hardness": hardness, "laion": LAION, "chosen": chosen.kind, "kinds": rows, **extra,
              "autofaiss_max_query_ms": AUTOFAISS_MAX_QUERY_MS, "p50_target_ms": P50_TARGET_MS,
              "target_recall": ann.TARGET_RECALL, "meets_target": meets}
    save_result("text_queries", record, args.out, args.quick)


if __name__ == "__main__":
    main()
