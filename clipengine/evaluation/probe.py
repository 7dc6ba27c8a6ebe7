"""Linear probe: logistic regression on frozen features, the CLIP paper's measure of representation quality.

Features are the model's L2-normalised image embeddings, optionally concatenated with the mean embedding
of each image's captions (for paired data). The L2 strength is chosen on a validation split carved from
the training images (a coarse sweep over C = 1e-6 … 1e6, then a finer one around the best; accuracy,
ties broken by log-loss), the
classifier is refitted on all training images, and accuracy is measured once on the test images.
scikit-learn's L-BFGS logistic regression does the fitting, as in the CLIP paper.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from clipengine.errors import BadInput
from clipengine.evaluation.report import EvaluationResult
from clipengine.evaluation.retrieval import embed_captions, embed_image_refs, model_settings
from clipengine.images import WHITE
from clipengine.metrics import classification_metrics
from clipengine.models import LoadedModel, ModelSpec, load_model, resolve_source
from clipengine.pairs import LabelledSet, read_labelled
from clipengine.progress import StageProgress

COARSE_C = tuple(10.0 ** e for e in range(-6, 7))
MAX_ITER = 1000


def hash_split(items: Sequence[str], fraction: float) -> tuple[list[int], list[int]]:
    """(kept, held out): `fraction` of the items held out by a hash of their name, so the split is the
    same whatever the listing order and whichever run asks."""
    order = sorted(range(len(items)), key=lambda i: hashlib.sha1(items[i].encode()).digest())
    n_held = int(round(fraction * len(items)))
    held = set(order[:n_held])
    return [i for i in range(len(items)) if i not in held], sorted(held)


def read_probe_data(data: str | os.PathLike, test_fraction: float) -> tuple[LabelledSet, LabelledSet, str]:
    """`data/train` + `data/test` when both exist, else one class-folder tree split by hash."""
    root = Path(data).expanduser()
    if (root / "train").is_dir() and (root / "test").is_dir():
        train = read_labelled(root / "train")
        return train, read_labelled(root / "test", classes=train.classes), "train/ and test/ folders"
    labelled = read_labelled(root)
    kept, held = hash_split(labelled.images, test_fraction)
    if not held or not kept:
        raise BadInput(f"{data} has too few images ({len(labelled)}) to hold out a test set")
    return labelled.subset(kept), labelled.subset(held), f"hash split, {test_fraction:.0%} test"


def features(model: LoadedModel, labelled: LabelledSet, with_text: bool, *, batch_size, workers,
             progress: StageProgress | None, transparency: str = WHITE
             ) -> tuple[np.ndarray, np.ndarray, list[str], list[tuple[str, str]]]:
    """(features, labels, image names, skipped) for the images that could be decoded."""
    image_emb, kept, skipped = embed_image_refs(model, labelled.images, batch_size=batch_size, workers=workers,
                                                progress=progress, transparency=transparency)
    labels = np.asarray(labelled.labels, dtype=np.int64)[kept]
    names = [labelled.images[i] for i in kept]
    if not with_text:
        return image_emb, labels, names, skipped
    lacking = [labelled.images[i] for i in kept if not labelled.captions[i]]
    if lacking:
        raise BadInput(f"--with-text needs captions for every image (a .txt beside it); {lacking[0]} has none")
    texts = [c for i in kept for c in labelled.captions[i]]
    counts = [len(labelled.captions[i]) for i in kept]
    text_emb = embed_captions(model, texts, progress=progress)
    owners = np.repeat(np.arange(len(kept)), counts)
    mean = np.zeros((len(kept), text_emb.shape[1]), np.float32)
    np.add.at(mean, owners, text_emb)
    mean /= np.linalg.norm(mean, axis=1, keepdims=True).clip(1e-12)
    return np.concatenate([image_emb, mean], axis=1), labels, names, skipped


def _fit(x: np.ndarray, y: np.ndarray, c: float):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=c, max_iter=MAX_ITER).fit(x, y)


def choose_c(x: np.ndarray, y: np.ndarray, names: Sequence[str], val_fraction: float) -> tuple[float, float]:
    """The regularisation with the best validation accuracy (a sweep over decades, then a finer one),
    and that accuracy. Accuracy on a small validation set ties over wide ranges of C, and the edge of
    such a plateau generalises badly, so ties go to the lower validation log-loss."""
    from sklearn.metrics import log_loss

    fit_rows, val_rows = hash_split(list(names), val_fraction)
    if not val_rows or len(set(y[fit_rows].tolist())) < 2:
        raise BadInput("too few training images to hold out a validation set for choosing the regularisation")

    def score(c: float) -> tuple[float, float]:
        model = _fit(x[fit_rows], y[fit_rows], c)
        loss = log_loss(y[val_rows], model.predict_proba(x[val_rows]), labels=model.classes_)
        return float(model.score(x[val_rows], y[val_rows])), -float(loss)

    scores = {c: score(c) for c in COARSE_C}
    best = max(scores, key=scores.__getitem__)
    for c in np.clip(np.logspace(np.log10(best) - 1, np.log10(best) + 1, 9), COARSE_C[0], COARSE_C[-1]):
        scores.setdefault(float(c), score(float(c)))
    best = max(scores, key=scores.__getitem__)
    return best, scores[best][0]


def probe_benchmark(data: str | os.PathLike, *, spec: ModelSpec = ModelSpec(), with_text: bool = False,
                    test_fraction: float = 0.2, val_fraction: float = 0.2, device: str | None = None,
                    batch_size: int | None = None, workers: int | None = None,
                    progress: StageProgress | None = None, transparency: str = WHITE) -> EvaluationResult:
    """Test accuracy of a logistic-regression probe on frozen features of a class-folder image set."""
    started = time.perf_counter()
    if not 0 < test_fraction < 1 or not 0 < val_fraction < 1:
        raise BadInput("--test-fraction and --val-fraction must be between 0 and 1")
    train, test, split_from = read_probe_data(data, test_fraction)
    source = resolve_source(spec)
    model = load_model(source, device=device)
    x_train, y_train, train_names, skipped = features(model, train, with_text, batch_size=batch_size, workers=workers,
                                                      progress=progress, transparency=transparency)
    x_test, y_test, _, skipped_test = features(model, test, with_text, batch_size=batch_size, workers=workers,
                                               progress=progress, transparency=transparency)
    if len(set(y_train.tolist())) < 2 or not len(y_test):
        raise BadInput(f"{data}: a probe needs at least two classes to train on and some test images")
    best_c, val_accuracy = choose_c(x_train, y_train, train_names, val_fraction)
    classifier = _fit(x_train, y_train, best_c)
    scores = classifier.decision_function(x_test)
    if scores.ndim == 1:  # two classes: sklearn gives the score of classes_[1] alone
        scores = np.stack([-scores, scores], axis=1)
    logits = np.full((len(x_test), len(train.classes)), -np.inf, dtype=np.float32)
    logits[:, classifier.classes_] = scores  # classes absent from training are never predicted
    metrics = classification_metrics(logits, y_test, ks=(1, 5))
    metrics["val_acc@1"] = val_accuracy
    return EvaluationResult(
        task="probe", dataset={"path": os.path.abspath(str(data)), "layout": "class folders", "split": split_from},
        model=source, metrics=metrics,
        counts={"n_images": len(y_train) + len(y_test), "n_train": len(y_train), "n_test": len(y_test),
                "n_classes": len(train.classes), "n_skipped_images": len(skipped) + len(skipped_test)},
        settings={"features": "image+text" if with_text else "image", "C": best_c, "max_iter": MAX_ITER,
                  "val_fraction": val_fraction, "test_fraction": test_fraction, "decode": "full size",
                  "transparency": transparency,
                  **model_settings(model), "batch_size": batch_size, "workers": workers},
        seconds=time.perf_counter() - started, skipped=skipped + skipped_test)
