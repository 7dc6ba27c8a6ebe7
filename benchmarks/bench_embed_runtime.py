"""Embedding images on the CPU: torch fp32 vs ONNX Runtime fp32 vs ONNX Runtime int8, side by side in one run.

Speed: ViT-B-32 (random weights: they cost what trained ones do) embeds a folder of 640x480 JPEGs through
clipengine's indexing hot path (`embed_images`: decode workers, batches of 32), once per runtime per
round, rounds interleaved so that all three see the same machine load; images/s is the median. The towers
are the index's own exported ones (`index --quantize int8`), and the runtime `clipengine index` would
choose here by itself (from the export's measurement) is printed next to it.

Recall: what each runtime changes, measured by `clipengine bench retrieval` (same code as the command) on
500 held-out built-in scenes, with the shipped `tiny` model trained on 3,000 others (random weights would
make every recall chance, so a trained model is the honest check).

    python benchmarks/bench_embed_runtime.py            # 256 photos, 3 rounds, a few minutes
    python benchmarks/bench_embed_runtime.py --quick    # 48 photos, 1 round
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import os
import statistics
import tempfile
import time
from pathlib import Path

from results_file import save_result  # benchmarks/ is on sys.path when a script runs
from synthetic import write_photo_folder

from clipengine.embed import embed_images
from clipengine.index.pipeline import IndexOptions, embedding_runtime, index_folder
from clipengine.index.query_encoders import QueryEncoders
from clipengine.index.store import IndexStore
from clipengine.models import ModelSpec, load_model

RUNTIMES = (("torch", None), ("onnx", "fp32"), ("onnx", "int8"))


def images_per_second(model, paths: list[str]) -> float:
    started = time.perf_counter()
    count = sum(len(batch) for batch in embed_images(model, paths, batch_size=32))
    return count / (time.perf_counter() - started)


def speed(root: Path, n: int, rounds: int) -> dict:
    photos = root / "photos"
    paths = [str(p) for p in write_photo_folder(photos, n, (640, 480), seed=7)]
    index = root / "vit-b-32"
    started = time.perf_counter()
    index_folder(photos, index, ModelSpec("ViT-B-32", "none"), quantize="int8")
    print(f"indexed {n} photos with ViT-B-32 and exported fp32 + int8 towers in {time.perf_counter() - started:.0f} s",
          flush=True)
    with IndexStore.open(index) as store:
        record = store.query_encoders
        torch_model = load_model(store.manifest["model"], device="cpu")
        _, chosen = embedding_runtime(store, torch_model, IndexOptions())
    models = {"torch": torch_model}
    for precision in ("fp32", "int8"):
        models[f"onnx {precision}"] = dataclasses.replace(
            torch_model, onnx=QueryEncoders.open(index, record, precision=precision))
    rates: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            rates[name].append(images_per_second(model, paths))
    medians = {name: statistics.median(r) for name, r in rates.items()}
    for name, rate in medians.items():
        print(f"  {name:10s} {rate:6.1f} images/s  ({rate / medians['torch']:.2f}x torch)", flush=True)
    print(f"  `clipengine index` chooses here: {chosen}")
    return {"images": n, "size": "640x480 JPEG", "model": "ViT-B-32", "rounds": rounds, "images_per_second": medians,
            "all": rates, "vs_torch": {k: v / medians["torch"] for k, v in medians.items()},
            "export_measurement_ms_per_image": record["image"]["speed"]["ms_per_image"], "index_chooses": chosen,
            "int8_on_index": {t: {k: record[t]["int8"].get(k) for k in ("max_abs_diff", "min_cosine", "reason")}
                              for t in ("text", "image")}}


def recall(root: Path, quick: bool) -> dict:
    from scene_model import tiny_trained_on_scenes

    from clipengine.evaluation.retrieval import retrieval_benchmark

    run, test_set = tiny_trained_on_scenes(root, quick, 200 if quick else 500)
    out: dict[str, dict] = {}
    for runtime, precision in RUNTIMES:
        result = retrieval_benchmark(test_set, spec=ModelSpec(checkpoint=str(run)), runtime=runtime,
                                     precision=precision)
        name = runtime if not precision else f"{runtime} {precision}"
        out[name] = result.metrics
        print(f"  {name:10s} " + "  ".join(f"{k} {100 * v:.2f}" for k, v in sorted(result.metrics.items())), flush=True)
    out["change_vs_torch_points"] = {name: {k: round(100 * (v - out["torch"][k]), 2) for k, v in metrics.items()}
                                     for name, metrics in out.items() if name != "torch"}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, help="where to write the JSON (default: results/embed_runtime-DATE.json)")
    args = parser.parse_args()
    result: dict[str, object] = {"date": dt.date.today().isoformat(), "cores": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        print("== speed: images/s through the indexing hot path", flush=True)
        result["speed"] = speed(Path(tmp), 48 if args.quick else 256, 1 if args.quick else 3)
        print("== recall through each runtime (trained tiny, held-out scenes, percent)", flush=True)
        result["recall"] = recall(Path(tmp), args.quick)
    save_result("embed_runtime", result, args.out, args.quick)


if __name__ == "__main__":
    main()
