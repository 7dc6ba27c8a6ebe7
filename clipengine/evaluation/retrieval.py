"""Image–text retrieval benchmarks: a model on a captioned set, or a saved index against its exact search.

`retrieval_benchmark` embeds every image (decoded at full size, then open_clip's preprocessing; transparent
pixels composited on white, or with `transparency` "drop" as open_clip and CLIP_benchmark do) and every caption, then computes recall@k in both directions (`clipengine.metrics`).
`index_retrieval_benchmark` takes the image vectors from an index and asks its faiss index for the
top k of each caption, next to the exact recall on the same queries: what the index's search costs.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from clipengine.errors import BadInput
from clipengine.evaluation.report import EvaluationResult
from clipengine.images import TRANSPARENCY, WHITE
from clipengine.metrics import DEFAULT_KS, hits_at_k, retrieval_recall
from clipengine.models import LoadedModel, ModelSpec, autocast_dtype, check_same_model, load_model, resolve_source
from clipengine.pairs import PairSet, read_pairs
from clipengine.progress import StageProgress


@dataclass
class EmbeddedPairs:
    """Embeddings of a captioned set: images that could be decoded, and the captions of those images."""

    image_emb: np.ndarray
    text_emb: np.ndarray
    owners: np.ndarray  # owners[t]: the row of image_emb that caption t describes
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (image, reason)


def model_settings(model: LoadedModel) -> dict:
    """What decides the embeddings besides the weights: runtime, device, precision and preprocessing."""
    if model.onnx is not None:
        precision = model.onnx.precision or "fp32"
        return {"runtime": "onnxruntime", "device": "cpu", "precision": "float32" if precision == "fp32" else "int8 weights",
                "preprocess": dict(model.preprocess_cfg)}
    dtype = autocast_dtype(model.device)
    return {"runtime": "torch", "device": str(model.device),
            "precision": f"autocast {str(dtype).removeprefix('torch.')}" if dtype else "float32",
            "preprocess": dict(model.preprocess_cfg)}


@contextlib.contextmanager
def model_for(source: dict, device: str | None, runtime: str | None, precision: str | None) -> Iterator[LoadedModel]:
    """The model a benchmark embeds with: torch (default), or its exported ONNX towers (`runtime` "onnx", or
    `precision` "int8"), so that what the query encoders change is a measured number."""
    from clipengine.index.query_encoders import check_runtime

    check_runtime(runtime, precision)
    onnx = runtime == "onnx" or precision == "int8"
    model = load_model(source, device="cpu" if onnx else device)
    if not onnx:
        yield model
        return
    from clipengine.index.export import onnx_runtime

    with onnx_runtime(model, precision or "fp32") as exported:
        yield exported


def embed_image_refs(model: LoadedModel, images: Sequence, *, batch_size: int | None = None,
                     workers: int | None = None, progress: StageProgress | None = None, transparency: str = WHITE
                     ) -> tuple[np.ndarray, list[int], list[tuple[str, str]]]:
    """Embed images decoded at full size; returns (vectors, rows of `images` they belong to, skipped)."""
    if transparency not in TRANSPARENCY:
        raise BadInput(f"unknown transparency '{transparency}' (one of {', '.join(TRANSPARENCY)})")
    from clipengine.embed import embed_images

    vectors, kept, skipped = [], [], []
    done = 0
    for batch in embed_images(model, images, batch_size=batch_size, workers=workers, exact_decode=True,
                              transparency=transparency):
        for item in batch:
            if item.vector is not None:
                vectors.append(item.vector)
                kept.append(done)
            else:
                skipped.append((item.path, item.skip_reason or "not embedded"))
            done += 1
        if progress:
            progress("images", done, len(images))
    matrix = np.stack(vectors) if vectors else np.empty((0, model.embed_dim), np.float32)
    return matrix, kept, skipped


def embed_captions(model: LoadedModel, texts: Sequence[str], *, batch_size: int = 256,
                   progress: StageProgress | None = None) -> np.ndarray:
    from clipengine.embed import embed_texts

    out = np.empty((len(texts), model.embed_dim), dtype=np.float32)
    for begin in range(0, len(texts), batch_size * 4):
        chunk = texts[begin:begin + batch_size * 4]
        out[begin:begin + len(chunk)] = embed_texts(model, chunk, batch_size=batch_size)
        if progress:
            progress("captions", begin + len(chunk), len(texts))
    return out


def embed_pairs(model: LoadedModel, pairs: PairSet, *, batch_size: int | None = None, workers: int | None = None,
                progress: StageProgress | None = None, transparency: str = WHITE) -> EmbeddedPairs:
    """Embed a captioned set. An image that cannot be decoded is left out with its captions, and listed."""
    image_emb, kept, skipped = embed_image_refs(model, pairs.images, batch_size=batch_size, workers=workers,
                                                progress=progress, transparency=transparency)
    texts = [c for i in kept for c in pairs.captions[i]]
    owners = np.repeat(np.arange(len(kept)), [len(pairs.captions[i]) for i in kept])
    return EmbeddedPairs(image_emb, embed_captions(model, texts, progress=progress), owners, skipped)


def _dataset_info(data: str | os.PathLike, pairs: PairSet, image_root, split) -> dict:
    return {"path": os.path.abspath(os.path.expanduser(str(data))) if "{" not in str(data) else str(data),
            "layout": pairs.layout, "split": split if split else ("test" if pairs.layout == "karpathy" else None),
            "image_root": os.path.abspath(os.path.expanduser(str(image_root))) if image_root else None}


def retrieval_benchmark(data: str | os.PathLike, *, spec: ModelSpec = ModelSpec(), image_root=None,
                        split: str | None = None, ks: Sequence[int] = DEFAULT_KS, device: str | None = None,
                        batch_size: int | None = None, workers: int | None = None, runtime: str | None = None,
                        precision: str | None = None, progress: StageProgress | None = None,
                        transparency: str = WHITE) -> EvaluationResult:
    """Recall@k of a model on an image–caption set (any layout `clipengine.pairs.read_pairs` reads;
    a Karpathy split file gives its ``test`` split unless `split` says otherwise). `runtime` "onnx" embeds
    through the model's exported towers (`precision` fp32 or int8) instead of torch. `transparency` DROP
    treats alpha as open_clip and CLIP_benchmark do, to reproduce their numbers."""
    started = time.perf_counter()
    pairs = read_pairs(data, image_root, split, default_split="test")
    source = resolve_source(spec)
    with model_for(source, device, runtime, precision) as model:
        embedded = embed_pairs(model, pairs, batch_size=batch_size, workers=workers, progress=progress,
                               transparency=transparency)
        settings = model_settings(model)
    if not len(embedded.image_emb):
        raise BadInput(f"none of the {len(pairs)} images in {data} could be decoded "
                       f"(first: {embedded.skipped[0][0]}: {embedded.skipped[0][1]})")
    metrics = retrieval_recall(embedded.image_emb, embedded.text_emb, embedded.owners, ks)
    return EvaluationResult(
        task="retrieval", dataset=_dataset_info(data, pairs, image_root, split), model=source, metrics=metrics,
        counts={"n_images": len(embedded.image_emb), "n_captions": len(embedded.text_emb),
                "n_skipped_images": len(embedded.skipped), "n_dropped_rows": len(pairs.dropped)},
        settings={"ks": sorted(set(ks)), "decode": "full size", "transparency": transparency, **settings,
                  "batch_size": batch_size, "workers": workers},
        seconds=time.perf_counter() - started, skipped=embedded.skipped)


def index_retrieval_benchmark(index_path: str | os.PathLike, data: str | os.PathLike, *, spec: ModelSpec = ModelSpec(),
                              image_root=None, split: str | None = None, ks: Sequence[int] = DEFAULT_KS,
                              device: str | None = None, progress: StageProgress | None = None) -> EvaluationResult:
    """Recall@k with an index's images as the gallery: captions from `data` whose images the index
    holds are the queries. Reports exact recall (both directions, on the index's stored vectors) and
    text→image recall through the index's own faiss search (``index_text_to_image_R@k``)."""
    from clipengine.index.faiss_view import SearchStructure
    from clipengine.index.store import IndexStore

    started = time.perf_counter()
    pairs = read_pairs(data, image_root, split, default_split="test")
    with IndexStore.open(index_path) as store:
        source = check_same_model(store.manifest["model"], spec, f"index {index_path}")
        ids, gallery = store.vectors()
        wanted = [os.path.abspath(p) if isinstance(p, str) else None for p in pairs.images]  # tar members: never indexed
        id_of = store.ids_of_paths(p for p in wanted if p)
        structure = SearchStructure(store)
        faiss_index = structure.view()
        faiss_state = structure.state
    if not len(ids):
        raise BadInput(f"index {index_path} holds no searchable images")
    row_of_id = {int(i): r for r, i in enumerate(ids)}
    queries, owners, owner_ids, missing = [], [], [], []
    for image, path, captions in zip(pairs.images, wanted, pairs.captions, strict=True):
        image_id = id_of.get(path) if path else None
        if image_id is None or image_id not in row_of_id:
            missing.append((str(image), "not in the index"))
            continue
        queries += captions
        owners += [row_of_id[image_id]] * len(captions)
        owner_ids += [image_id] * len(captions)
    if not queries:
        raise BadInput(f"none of the {len(pairs)} images of {data} is in index {index_path}: "
                       "build the index from the folder those paths point to")
    model = load_model(source, device=device)
    text_emb = embed_captions(model, queries, progress=progress)
    metrics = retrieval_recall(gallery, text_emb, owners, ks)
    k_max = min(max(ks), faiss_index.ntotal)
    _, ranked = faiss_index.search(text_emb, k_max)
    through_index = hits_at_k(ranked, np.asarray(owner_ids), ks)
    metrics.update({f"index_text_to_image_R@{k}": v for k, v in through_index.items()})
    return EvaluationResult(
        task="retrieval", dataset={**_dataset_info(data, pairs, image_root, split), "index": str(index_path)},
        model=source, metrics=metrics,
        counts={"n_images": len(ids), "n_query_images": len(set(owner_ids)), "n_captions": len(queries),
                "n_not_in_index": len(missing), "n_dropped_rows": len(pairs.dropped)},
        settings={"ks": sorted(set(ks)), "image_vectors": "from the index", "faiss_index": faiss_state.factory,
                  "faiss_kind": faiss_state.kind, "faiss_tuning": faiss_state.tuning and faiss_state.tuning.to_dict(),
                  **model_settings(model)},
        seconds=time.perf_counter() - started, skipped=missing)
