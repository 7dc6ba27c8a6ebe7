"""Which open_clip architectures export to query encoders, how long that takes, and how closely they match.

For each architecture (random weights: export and verification do not depend on them), `export_towers`
runs as `clipengine index` runs it on a new index: torch.onnx export, onnxruntime optimisation, and the
check against torch on 207 prompts and 50 images (max abs difference of normalised embeddings <= 1e-4).
A tower that does not export or fails the check is recorded with its reason: those models keep working
on the torch path. Architectures whose weights or tokenizer must be downloaded fail here for that reason
alone (no network on this machine) and are reported as such.

    python benchmarks/bench_export.py                          # the default list
    python benchmarks/bench_export.py --arch RN50 --arch tiny  # chosen ones
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import tempfile
import time
from pathlib import Path

from results_file import save_result  # benchmarks/ is on sys.path when a script runs

DEFAULT = ["tiny", "ViT-S-32", "ViT-B-32", "RN50", "convnext_base", "coca_ViT-B-32", "MobileCLIP-S1",
           "ViT-B-16-SigLIP", "roberta-ViT-B-32"]


def one(arch: str) -> dict:
    from clipengine.index.export import export_towers
    from clipengine.models import ModelSpec, load_model

    started = time.perf_counter()
    try:
        model = load_model(ModelSpec(arch, None if arch == "tiny" else "none"), device="cpu")
    except Exception as e:  # noqa: BLE001  (a model that cannot even be built here is a result too)
        return {"arch": arch, "loaded": False, "reason": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    loaded = time.perf_counter() - started
    os.environ["CLIPENGINE_CACHE_DIR"] = tempfile.mkdtemp(prefix="export-bench-cache-")  # a cold export
    with tempfile.TemporaryDirectory() as directory:
        started = time.perf_counter()
        record = export_towers(model, directory)
        seconds = time.perf_counter() - started
        sizes = {p.name: p.stat().st_size for p in Path(directory).iterdir()}
    towers = {t: {k: record[t].get(k) for k in ("status", "reason", "max_abs_diff", "checked", "form")}
              for t in ("text", "image")}
    return {"arch": arch, "loaded": True, "load_s": round(loaded, 1), "export_and_check_s": round(seconds, 1),
            "towers": towers, "megabytes": round(sum(sizes.values()) / 2**20, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", action="append", help="an architecture to try (repeatable)")
    parser.add_argument("--quick", action="store_true", help="tiny only")
    parser.add_argument("--out", type=Path, help="where to write the JSON (default: results/export-DATE.json)")
    args = parser.parse_args()
    archs = ["tiny"] if args.quick else (args.arch or DEFAULT)
    results = []
    for arch in archs:
        r = one(arch)
        results.append(r)
        if not r["loaded"]:
            print(f"{arch:18s} not built here: {r['reason']}", flush=True)
            continue
        towers = "; ".join(f"{t} {v['status']}" + (f" ({v['form']})" if v.get("form") else "")
                           + (f" to {v['max_abs_diff']:.1e}" if v["status"] == "verified" else f": {v['reason']}")
                           for t, v in r["towers"].items())
        print(f"{arch:18s} {r['export_and_check_s']:6.1f} s, {r['megabytes']:7.1f} MB: {towers}", flush=True)
    save_result("export", {"date": dt.date.today().isoformat(), "cores": os.cpu_count(), "architectures": results},
                args.out, args.quick)


if __name__ == "__main__":
    main()
