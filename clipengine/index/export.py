"""Export a model's text and image towers to ONNX, verify them against torch, and keep only what passes.

`export_query_encoders` writes, into a new directory of the index, what `clipengine.index.query_encoders` runs
without torch: the towers (weights as external data, so that they are memory-mapped), the token table and
positions of a causal text tower, and the tokenizer's files. Each tower is then checked the way queries will
use it: 200 fixed prompts of every length (empty to far beyond the context, with Unicode, emoji and HTML
entities) through the torch-free tokenizer and the ONNX text tower, and 50 generated images of many shapes
through the PIL/numpy preprocessing and the ONNX image tower, against open_clip's own tokenizer, transform
and torch model. A tower is kept only if no coordinate of any normalised embedding differs by more than
1e-4; otherwise (or if it does not export at all) the record says why and queries stay on torch.

The graphs the index gets are onnxruntime's optimised ones (done once here, so a query's session skips
it). With `quantize="int8"` each tower also gets a dynamically quantised twin, and what it changes is
measured on the index's own vectors (recall@10 of its results against fp32's); the image tower's speed
through torch and onnxruntime is measured too, which is how `clipengine index` picks its runtime.

Exporting ViT-B-32 takes about a minute on 2 cores, so the exporter's graphs are also cached per model
identity and library versions (`$CLIPENGINE_CACHE_DIR`, default ~/.cache/clipengine): a second index of the
same model copies them, and still verifies them; a cached copy that fails is exported afresh.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import hashlib
import io
import json
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from clipengine.cache import cache_dir
from clipengine.cores import available_cores
from clipengine.durable import replace_durably, replacing, temporary_name
from clipengine.errors import BadInput, first_line
from clipengine.index import ann
from clipengine.index import query_encoders as qe
from clipengine.index.location import ENCODERS_PREFIX
from clipengine.index.store import IndexStore
from clipengine.progress import StageProgress
from clipengine.tokenizer import save_tokenizer

MAX_ABS_DIFF = 1e-4
EXPORT_FORMAT = 2  # 2: the cache holds the exporter's raw graphs; indexes get optimised ones
INT8_MAX_RECALL_DROP = 0.005  # int8 is used by default only if recall@10 against fp32 drops by at most 0.5 points

_SUBJECTS = ["dog", "cat", "red car", "sunset over the sea", "bowl of ramen", "mountain lake", "child with a kite",
             "old bicycle", "neon sign", "snowy forest", "two red circles", "a blue square", "wedding cake",
             "city skyline at night", "horse in a field", "plate of sushi", "laptop on a desk", "lighthouse"]
_DETAILS = ["on a beach", "in the rain", "at dawn", "seen from above", "in black and white", "with a person",
            "next to a window", "under a bridge", "in autumn", "close-up", "blurry", "on a wooden table"]
_ODD = ["", "a", "!", "🐶🏖️", "犬と海辺", "собака на пляже", "chien &amp; chat", "caf\u00e9 cr\u00e8me",
        "  lots   of   space  ", "CAPITALS AND Punctuation?!", "it's a dog's life", "<end_of_text> inside",
        "emoji 👨‍👩‍👧 family", "x" * 500, "tab\tand\nnewline", "ﬁsh and ﬂowers", "“quoted”"]


def check_prompts() -> list[str]:
    """The 200+ fixed prompts a text tower is verified on: from empty to far beyond the context length."""
    prompts = list(_ODD)
    for i in range(190):
        subject = _SUBJECTS[i % len(_SUBJECTS)]
        words = [f"a photo of a {subject}"] + [_DETAILS[(i + j) % len(_DETAILS)] for j in range(i % 7)]
        text = ", ".join(words)
        if i % 10 == 9:  # long: 20 to 180 words, beyond any context
            text = " ".join([text] * (2 + i // 20))
        prompts.append(text)
    return prompts


def check_images(n: int = 50) -> list:
    """The 50 generated images an image tower is verified on: landscape, portrait, square, tiny, huge."""
    from clipengine.scenes import photo_like

    shapes = [(640, 480), (480, 640), (224, 224), (100, 80), (1000, 300), (64, 64), (333, 517), (1200, 900),
              (250, 251), (31, 400)]
    return [photo_like(*shapes[i % len(shapes)], seed=1000 + i) for i in range(n)]


# --------------------------------------------------------------------------------------------------
# Tower modules (what is traced)
# --------------------------------------------------------------------------------------------------


def _tower_modules():
    import torch
    import torch.nn.functional as F

    from clipengine.causal_text import encode_prefix

    class SplitTextTower(torch.nn.Module):
        """Token embeddings (with positions) and the pooling position -> normalised embedding."""

        mask: torch.Tensor  # a buffer

        def __init__(self, owner):
            super().__init__()
            self.transformer, self.ln_final = owner.transformer, owner.ln_final
            self.projection: torch.Tensor = owner.text_projection
            self.register_buffer("mask", owner.attn_mask.detach().clone(), persistent=False)

        def forward(self, x, pool_index):
            return F.normalize(encode_prefix(self.transformer, self.ln_final, self.projection, self.mask, x, pool_index),
                               dim=-1)

    class Normalised(torch.nn.Module):
        """One of the model's own encoders (`encode_text`, `encode_image`), L2-normalised."""

        def __init__(self, model, method: str):
            super().__init__()
            self.model, self.method = model, method

        def forward(self, x):
            return F.normalize(getattr(self.model, self.method)(x), dim=-1)

    return SplitTextTower, Normalised


def _export(module, args: tuple, names: list[str], dynamic: tuple, path: Path) -> None:
    """torch.onnx's dynamo exporter, weights saved as one external data file next to the graph."""
    import torch

    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module.eval(), args, dynamo=True, dynamic_shapes=dynamic, input_names=names,
                                    output_names=["normalised_features"], external_data=False, verbose=False)
    if program is None:  # only the legacy exporter returns nothing, and dynamo=True does not use it
        raise RuntimeError("torch.onnx.export returned no program")
    _save_external(program.model_proto, path)


def _save_external(model_proto, path: Path) -> None:
    """An ONNX graph with its weights in one external data file beside it, which onnxruntime memory-maps."""
    import onnx

    onnx.save_model(model_proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + qe.EXTERNAL_DATA_SUFFIX, size_threshold=1024)
    shutil.copymode(path, path.with_name(path.name + qe.EXTERNAL_DATA_SUFFIX))  # onnx writes it owner-only


def raw_name(file: str) -> str:
    """The exporter's own graph of `file`: kept only in the export cache, and the input to quantisation."""
    return file.removesuffix(".onnx") + ".raw.onnx"


def _optimise(raw: Path, final: Path) -> None:
    """Write onnxruntime's optimised graph of `raw` (fusions, constant folding: the portable "extended" level,
    not the machine-specific layouts of "all") with external weights, so that a query's session skips
    optimising: ViT-B-32's text tower then starts and runs its first query in 62 ms instead of 111 (medians
    of 15 fresh processes)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(final)
    options.log_severity_level = 3
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                     final.name + qe.EXTERNAL_DATA_SUFFIX)
    options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    options.add_session_config_entry("session.disable_prepacking", "1")
    ort.InferenceSession(str(raw), options, providers=["CPUExecutionProvider"])


def _export_text(model, directory: Path) -> dict:
    import torch
    from torch.export import Dim

    split_cls, normalised = _tower_modules()
    from clipengine.causal_text import causal_text

    parts = causal_text(model.model)
    context = int(model.tokenizer.context_length)
    if parts is not None:
        owner, pool, eos = parts.owner, parts.pool, parts.eos
        np.save(directory / qe.TOKEN_TABLE_FILE, owner.token_embedding.weight.detach().float().cpu().numpy())
        np.save(directory / qe.POSITIONS_FILE, owner.positional_embedding.detach().float().cpu().numpy())
        width = owner.token_embedding.weight.shape[1]
        length = min(10, context)
        example = (torch.randn(2, length, width), torch.tensor([length - 1, 2]))
        dynamic = ({0: Dim("batch"), 1: Dim("length", min=2, max=context)}, {0: Dim("batch")})
        _export(split_cls(owner), example, ["x", "pool_index"], dynamic, directory / raw_name(qe.TEXT_FILE))
        return {"form": "split", "pool": pool, "eos_id": eos, "context_length": context}
    ids = (model.tokenizer(["a photo", "two dogs"]),)
    _export(normalised(model.model, "encode_text"), ids, ["ids"], ({0: Dim("batch")},),
            directory / raw_name(qe.TEXT_FILE))
    return {"form": "whole", "context_length": context}


def _export_image(model, directory: Path) -> dict:
    import torch
    from torch.export import Dim

    _, normalised = _tower_modules()
    preprocess = qe.ImagePreprocess.from_config(model.preprocess_cfg)  # refuses what numpy cannot reproduce
    example = (torch.randn(2, 3, preprocess.size, preprocess.size),)
    _export(normalised(model.model, "encode_image"), example, ["pixels"], ({0: Dim("batch")},),
            directory / raw_name(qe.IMAGE_FILE))
    return {"preprocess": model.preprocess_cfg}


# --------------------------------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------------------------------


def _check_inputs(tower: str) -> list:
    return check_prompts() if tower == "text" else check_images()


def _onnx_tower(tower: str, directory: Path, record: dict, file: str) -> qe.TextTower | qe.ImageTower:
    kind = qe.TextTower if tower == "text" else qe.ImageTower
    return kind(directory, record, file=file, one_shot=True)


def _torch_embed(tower: str, model, inputs: list) -> np.ndarray:
    from clipengine.embed import embed_pil_images, embed_texts

    return embed_texts(model, inputs) if tower == "text" else embed_pil_images(model, inputs)


def _verify(tower: str, model, directory: Path, record: dict, file: str) -> tuple[dict, np.ndarray | None]:
    """Check an exported tower the way queries use it, against open_clip and torch; returns the verdict and the
    tower's embeddings of the check inputs."""
    inputs = _check_inputs(tower)
    what = "prompts" if tower == "text" else "images"
    onnx = _onnx_tower(tower, directory, record, file)
    if isinstance(onnx, qe.TextTower):
        differ = int((onnx.tokenizer(inputs) != model.tokenizer(inputs).numpy()).any(axis=1).sum())
        if differ:
            return {"status": "failed", "reason": f"the torch-free tokenizer differs from open_clip's on {differ} of "
                                                  f"{len(inputs)} check prompts"}, None
    embedded = onnx(inputs)
    diff = float(np.abs(embedded - _torch_embed(tower, model, inputs)).max())
    checked = {"max_abs_diff": diff, "checked": len(inputs)}
    if not np.isfinite(diff) or diff > MAX_ABS_DIFF:
        return {**checked, "status": "failed", "reason": f"its output differs from torch's by {diff:.2e} on "
                                                         f"{len(inputs)} check {what} (limit {MAX_ABS_DIFF:.0e})"}, None
    return {**checked, "status": "verified"}, embedded


def top_k_overlap(gallery: np.ndarray, reference: np.ndarray, candidate: np.ndarray, k: int = 10) -> float:
    """recall@k of `candidate` queries against the top k that `reference` queries find in `gallery`."""
    k = min(k, len(gallery))
    expected = np.argsort(-(reference @ gallery.T), axis=1)[:, :k]
    found = np.argsort(-(candidate @ gallery.T), axis=1)[:, :k]
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(expected, found, strict=True)]))


GALLERY_MIN = 100  # fewer indexed vectors than this cannot say whether int8 changes rankings
GALLERY_SIZE = 20_000  # at most this many of the index's vectors (a random sample) for that measurement


def _quantize(tower: str, directory: Path, record: dict, fp32: np.ndarray, gallery: np.ndarray | None) -> dict:
    """Write the tower's dynamically quantised (int8 weights) twin and measure what it changes: the largest
    difference from the fp32 tower, and recall@10 of its results against fp32's over the index's own vectors."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    file = f"{tower}-int8.onnx"
    single = directory / f".{file}.single"
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        quantize_dynamic(directory / raw_name(record["file"]), single, weight_type=QuantType.QInt8)
    _save_external(onnx.load(str(single)), directory / raw_name(file))
    single.unlink()
    _optimise(directory / raw_name(file), directory / file)
    int8 = _onnx_tower(tower, directory, record, file)(_check_inputs(tower))
    result = {"file": file, "max_abs_diff": float(np.abs(int8 - fp32).max()),
              "min_cosine": float((int8 * fp32).sum(axis=1).min())}
    if gallery is None or len(gallery) < GALLERY_MIN:
        return {**result, "recall_drop": None, "preferred": False,
                "reason": f"fewer than {GALLERY_MIN} indexed vectors to measure its recall on"}
    recall = top_k_overlap(gallery, fp32, int8)
    return {**result, "gallery": len(gallery), "recall_at_10_vs_fp32": recall, "recall_drop": round(1 - recall, 6),
            "preferred": 1 - recall <= INT8_MAX_RECALL_DROP}


def _image_speed(model, directory: Path, record: dict) -> dict:
    """ms per image of the image tower through torch and through onnxruntime (each precision it has), on a
    batch of check images: what `clipengine index --runtime` decides by."""
    import torch

    from clipengine.embed import encode_pixels

    pixels = qe.ImagePreprocess.from_config(record["preprocess"])(check_images()[:16])
    runners: dict[str, Callable[[], object]] = {"torch": lambda: encode_pixels(model, torch.from_numpy(pixels))}
    for precision, file in (("onnx", record["file"]), ("onnx-int8", (record.get("int8") or {}).get("file"))):
        if file:
            session = qe.create_session(directory / file, one_shot=False)
            runners[precision] = functools.partial(session.run, None, {"pixels": pixels})
    speed = {}
    for name, run in runners.items():
        run()  # warm-up: allocations, pre-packing
        times = []
        for _ in range(2):
            started = time.perf_counter()
            run()
            times.append(time.perf_counter() - started)
        speed[name] = round(min(times) * 1e3 / len(pixels), 3)
    return {"ms_per_image": speed, "cores": available_cores(), "batch": len(pixels)}


# --------------------------------------------------------------------------------------------------
# Export cache
# --------------------------------------------------------------------------------------------------


def _cache_key(source: dict, tower: str) -> str:
    import open_clip
    import torch

    text = json.dumps({"identity": source["identity"], "tower": tower, "torch": torch.__version__,
                       "open_clip": open_clip.__version__, "format": EXPORT_FORMAT}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _from_cache(key: str, directory: Path) -> dict | None:
    """Copy a cached tower's files into `directory`; returns its record, or None if there is none (or it is damaged)."""
    entry = cache_dir() / "encoders" / key
    try:
        cached = json.loads((entry / "record.json").read_text())
        for name in cached["files"]:
            shutil.copyfile(entry / name, directory / name)
        return cached["record"]
    except (OSError, ValueError, KeyError):
        return None


def _to_cache(key: str, directory: Path, names: list[str], record: dict) -> None:
    """Keep a verified tower's files for the next index of the same model (written aside, then renamed)."""
    entry = cache_dir() / "encoders" / key
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        with replacing(entry) as tmp:
            tmp.mkdir()
            files = [n for n in names if (directory / n).exists()]
            for name in files:
                shutil.copyfile(directory / name, tmp / name)
            (tmp / "record.json").write_text(json.dumps({"files": files, "record": record}))
    except OSError:  # the cache only saves time: a read-only home must not stop an export
        pass


# --------------------------------------------------------------------------------------------------
# The whole export
# --------------------------------------------------------------------------------------------------


def _optimised_and_verified(tower: str, model, directory: Path, exported: dict,
                            file: str) -> tuple[dict, np.ndarray | None]:
    """The raw graph optimised into `file`, then checked against torch (the verdict, and what it embedded)."""
    _optimise(directory / raw_name(file), directory / file)
    return _verify(tower, model, directory, exported, file)


def export_query_encoders(model, store: IndexStore, *, quantize: str | None = None,
                          progress: StageProgress | None = None) -> dict:
    """Export, verify and install `model`'s towers into an index opened writable (whose model it must be).

    Returns the record written to the index manifest (`query_encoders`): per tower, "verified" with the
    largest difference from torch, or "failed" with the reason. Nothing is installed if neither tower passes;
    an earlier export stays in place until a new one is complete, and is then replaced in one manifest write.
    `quantize` "int8" adds int8 twins, measured on the index's own vectors (see `_quantize`).
    """
    from clipengine.models import load_model, require_same_source

    require_same_source(store.manifest["model"], model.source, f"index {store.path}")
    if model.device.type != "cpu":
        model = load_model(model.source, device="cpu")
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S%f")
    tmp = temporary_name(store.path / f"{ENCODERS_PREFIX}{stamp}")
    tmp.mkdir()
    try:
        gallery = None
        if quantize:
            gallery = store.gather(ann.sample_ids(store.live_ids(), GALLERY_SIZE, seed=0))[1]
        record = export_towers(model, tmp, quantize=quantize, gallery=gallery, progress=progress)
        record["dir"] = None
        if any(record[t]["status"] == "verified" for t in ("text", "image")):
            record["files"] = {p.name: qe.fingerprint(p) for p in sorted(tmp.iterdir())}
            record["dir"] = f"{ENCODERS_PREFIX}{stamp}"
            replace_durably(tmp, store.path / record["dir"])
        store.set_query_encoders(record)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return record


@contextlib.contextmanager
def onnx_runtime(model, precision: str = "fp32") -> Iterator:
    """`model` embedding through its exported towers, exported (or taken from the cache) into a temporary
    directory and verified as an index's are: how `clipengine bench --runtime onnx` measures what the ONNX
    towers (and int8) change."""
    import dataclasses
    import tempfile

    from clipengine.models import load_model

    cpu = model if model.device.type == "cpu" else load_model(model.source, device="cpu")
    with tempfile.TemporaryDirectory(prefix="clipengine-towers-") as tmp:
        record = export_towers(cpu, tmp, quantize="int8" if precision == "int8" else None)
        failed = [f"{t}: {record[t]['reason']}" for t in ("text", "image") if record[t]["status"] != "verified"]
        if failed:
            raise BadInput("the model's towers cannot run in onnxruntime (" + "; ".join(failed) + "): use --runtime torch")
        yield dataclasses.replace(cpu, onnx=qe.QueryEncoders(Path(tmp), record, precision=precision))


def export_index(index_path: str | os.PathLike, *, quantize: str | None = None,
                 progress: StageProgress | None = None) -> dict:
    """Export (again) the query encoders of an existing index with its own model: `clipengine export`."""
    from clipengine.models import load_model

    with IndexStore.open(Path(index_path), writable=True) as store:
        model = load_model(store.manifest["model"], device="cpu")
        return export_query_encoders(model, store, quantize=quantize, progress=progress)


def export_towers(model, directory: str | os.PathLike, *, quantize: str | None = None,
                  gallery: np.ndarray | None = None, progress: StageProgress | None = None) -> dict:
    """Export and verify `model`'s towers (a CPU `LoadedModel`) into `directory`; `quantize` "int8" also writes
    int8 twins, measured against fp32 on `gallery` (the index's vectors). Returns the encoders record that
    `QueryEncoders(directory, record)` loads; the files of a tower that fails are removed."""
    import onnxruntime
    import torch

    if quantize not in (None, "int8"):
        raise BadInput(f"unknown quantisation '{quantize}': the one there is, is int8")
    directory = Path(directory)
    record: dict = {"format": EXPORT_FORMAT, "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                    "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__}}
    steps = [("text", _export_text, [qe.TEXT_FILE, qe.TOKEN_TABLE_FILE, qe.POSITIONS_FILE]),
             ("image", _export_image, [qe.IMAGE_FILE])]
    try:
        save_tokenizer(model.tokenizer, directory)
    except (ValueError, AttributeError) as e:
        steps = steps[1:]
        record["text"] = {"status": "failed", "reason": first_line(e)[:300]}
    for i, (tower, export, names) in enumerate(steps):
        if progress:
            progress("exporting query encoders", i, len(steps))
        file = names[0]
        raw = [raw_name(file), raw_name(file) + qe.EXTERNAL_DATA_SUFFIX, *names[1:]]
        names = [file, file + qe.EXTERNAL_DATA_SUFFIX, *raw]
        key = _cache_key(model.source, tower)
        try:
            exported = _from_cache(key, directory)
            verdict: dict | None = None
            embedded: np.ndarray | None = None
            if exported:
                try:
                    verdict, embedded = _optimised_and_verified(tower, model, directory, exported, file)
                except Exception:  # a damaged cache entry that does not even load
                    verdict = None
            if exported is None or verdict is None or verdict["status"] != "verified":  # not cached, or fails
                exported = export(model, directory)
                verdict, embedded = _optimised_and_verified(tower, model, directory, exported, file)
                if verdict["status"] == "verified":
                    _to_cache(key, directory, raw, exported)
            record[tower] = {**exported, "file": file, **verdict}
            if verdict["status"] == "verified" and quantize and embedded is not None:
                record[tower]["int8"] = _quantize(tower, directory, record[tower], embedded, gallery)
            if verdict["status"] == "verified" and tower == "image":
                record[tower]["speed"] = _image_speed(model, directory, record[tower])
        except Exception as e:  # a model that does not export keeps the torch path; the reason is recorded
            record[tower] = {"status": "failed", "reason": f"export failed: {type(e).__name__}: {first_line(e)[:300]}"}
        int8 = [f"{tower}-int8.onnx", raw_name(f"{tower}-int8.onnx")]
        int8 = [n + suffix for n in int8 for suffix in ("", qe.EXTERNAL_DATA_SUFFIX)]
        unused = names + int8 if record[tower]["status"] != "verified" else raw[:2] + int8[2:]
        for name in unused:  # a failed tower's files, and the raw graphs (the cache keeps those)
            (directory / name).unlink(missing_ok=True)
    if progress:
        progress("exporting query encoders", len(steps), len(steps))
    return record
