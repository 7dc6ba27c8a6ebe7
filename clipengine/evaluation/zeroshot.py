"""Zero-shot classification: each class becomes a text embedding, each image takes the nearest class.

A class's embedding is the mean of its L2-normalised prompt embeddings (one per template), normalised
again: open_clip's `build_zero_shot_classifier`, which is what CLIP and CLIP_benchmark use.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Sequence

import numpy as np

from clipengine.errors import BadInput
from clipengine.evaluation.report import EvaluationResult
from clipengine.evaluation.retrieval import embed_image_refs, model_settings
from clipengine.images import WHITE
from clipengine.metrics import classification_metrics
from clipengine.models import ModelSpec, load_model, resolve_source
from clipengine.pairs import read_labelled, read_lines
from clipengine.progress import StageProgress

DEFAULT_TEMPLATES = ("a photo of a {c}.",)
_WNID = re.compile(r"^n\d{8}$")


def class_names(folders: Sequence[str], classnames_file: str | os.PathLike | None) -> tuple[list[str], str]:
    """Readable class names for the class folders, and where they came from.

    A file gives one name per line, in the sorted order of the folders (ImageNet's classnames.txt is in
    sorted-WNID order). Without one, 1000 WNID folders get open_clip's ImageNet names, and other
    folders their own names with ``_`` read as a space.
    """
    if classnames_file:
        names = read_lines(classnames_file, "class names")
        if len(names) != len(folders):
            raise BadInput(f"{classnames_file} has {len(names)} names but the data has {len(folders)} class "
                           "folders: give one name per line, in the sorted order of the folders")
        return names, str(classnames_file)
    if len(folders) == 1000 and all(_WNID.match(f) for f in folders):
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

        return list(IMAGENET_CLASSNAMES), "open_clip ImageNet class names"
    return [f.replace("_", " ") for f in folders], "folder names"


def prompt_templates(templates_file: str | os.PathLike | None, imagenet: bool) -> tuple[list[Callable], str]:
    """Templates as callables (class name -> prompt). A file has one per line with ``{c}`` or ``{}``
    where the class name goes; without one, ImageNet gets OpenAI's 80 templates, others one."""
    if templates_file:
        lines = read_lines(templates_file, "templates")
        bad = [t for t in lines if "{c}" not in t and "{}" not in t]
        if bad:
            raise BadInput(f"template '{bad[0]}' in {templates_file} has no {{c}} (or {{}}) for the class name")
        return [lambda c, t=t: t.replace("{c}", c).replace("{}", c) for t in lines], str(templates_file)
    if imagenet:
        from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

        return list(OPENAI_IMAGENET_TEMPLATES), "OpenAI ImageNet templates (80)"
    return [lambda c, t=t: t.replace("{c}", c) for t in DEFAULT_TEMPLATES], DEFAULT_TEMPLATES[0]


def zeroshot_classifier(model, classnames: Sequence[str], templates: Sequence[Callable]) -> np.ndarray:
    """(n_classes, dim) float32: normalised mean of normalised prompt embeddings, per class."""
    import torch
    from open_clip.zero_shot_classifier import build_zero_shot_classifier

    with torch.inference_mode(), model.autocast():
        weights = build_zero_shot_classifier(model.model, model.tokenizer, list(classnames), list(templates),
                                             num_classes_per_batch=max(1, 256 // len(templates)),
                                             device=model.device)
    weights = weights.float().T
    return (weights / weights.norm(dim=1, keepdim=True)).cpu().numpy()


def zeroshot_benchmark(data: str | os.PathLike, *, spec: ModelSpec = ModelSpec(),
                       classnames_file: str | os.PathLike | None = None,
                       templates_file: str | os.PathLike | None = None, device: str | None = None,
                       batch_size: int | None = None, workers: int | None = None,
                       progress: StageProgress | None = None, transparency: str = WHITE) -> EvaluationResult:
    """acc@1, acc@5 and mean per-class recall on an image folder with one sub-folder per class."""
    started = time.perf_counter()
    labelled = read_labelled(data)
    names, names_from = class_names(labelled.classes, classnames_file)
    templates, templates_from = prompt_templates(templates_file, names_from.startswith("open_clip ImageNet"))
    source = resolve_source(spec)
    model = load_model(source, device=device)
    classifier = zeroshot_classifier(model, names, templates)
    image_emb, kept, skipped = embed_image_refs(model, labelled.images, batch_size=batch_size, workers=workers,
                                                progress=progress, transparency=transparency)
    if not kept:
        raise BadInput(f"none of the {len(labelled)} images in {data} could be decoded")
    labels = np.asarray(labelled.labels)[kept]
    metrics = classification_metrics(image_emb @ classifier.T, labels, ks=(1, 5))
    return EvaluationResult(
        task="zeroshot", dataset={"path": os.path.abspath(str(data)), "layout": "class folders"},
        model=source, metrics=metrics,
        counts={"n_images": len(kept), "n_classes": len(names), "n_skipped_images": len(skipped)},
        settings={"classnames": names_from, "templates": templates_from, "n_templates": len(templates),
                  "decode": "full size", "transparency": transparency, **model_settings(model), "batch_size": batch_size, "workers": workers},
        seconds=time.perf_counter() - started, skipped=skipped)
