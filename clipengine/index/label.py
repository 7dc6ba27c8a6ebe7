"""Texts ranked for an image: the other direction of retrieval, and zero-shot classification with templates.

`label_image` scores each text (a line of a file, or the captions of a CSV) by cosine similarity with the
image. With templates ("a photo of a {}."), a text's vector is the normalised mean of its normalised prompt
vectors, as `clipengine bench zeroshot` and CLIP's paper build a classifier. Given an index, the index's own
model embeds both, through its exported query encoders when it has them (no torch, a fraction of a second);
otherwise the named model does.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from clipengine.errors import BadInput
from clipengine.models import ModelSpec

CAPTION_COLUMNS = ("caption", "text", "title", "label")


@dataclass(frozen=True)
class Label:
    rank: int
    score: float  # cosine similarity, in [-1, 1]
    text: str

    def to_dict(self) -> dict:
        return asdict(self)


def read_texts(path: str | os.PathLike) -> list[str]:
    """The texts of a file: a CSV or TSV's caption column (caption, text, title or label; else the last
    column), distinct and in order; any other file's non-empty lines."""
    from clipengine.pairs import read_lines

    path = Path(path).expanduser()
    if path.suffix.lower() not in (".csv", ".tsv"):
        return list(dict.fromkeys(read_lines(path, "texts")))
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ","))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise BadInput(f"cannot read texts file {path}: {e}") from None
    if not rows or not rows[0]:
        raise BadInput(f"texts file {path} is empty")
    header = [h.strip().lower() for h in rows[0]]
    column = next((header.index(c) for c in CAPTION_COLUMNS if c in header), None)
    body = rows[1:] if column is not None else rows
    column = len(header) - 1 if column is None else column
    texts = list(dict.fromkeys(r[column].strip() for r in body if len(r) > column and r[column].strip()))
    if not texts:
        raise BadInput(f"texts file {path} has no captions")
    return texts


def text_matrix(encode: Callable[[list[str]], np.ndarray], texts: Sequence[str], templates: Sequence[str]) -> np.ndarray:
    """(len(texts), dim) unit vectors: each text as is, or the normalised mean over its templated prompts."""
    for t in templates:
        if "{}" not in t and "{c}" not in t:
            raise BadInput(f"template '{t}' has no {{}} for the text")
    if not templates:
        vectors = encode(list(texts))
    else:
        prompts = [t.replace("{c}", x).replace("{}", x) for x in texts for t in templates]
        vectors = encode(prompts).reshape(len(texts), len(templates), -1)
        vectors = vectors / np.linalg.norm(vectors, axis=2, keepdims=True)
        vectors = vectors.mean(axis=1)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def rank_texts(image_vector: np.ndarray, text_vectors: np.ndarray, texts: Sequence[str], k: int) -> list[Label]:
    if k < 1:
        raise BadInput("-k must be at least 1")
    v = np.asarray(image_vector, dtype=np.float32).reshape(-1)
    scores = text_vectors @ (v / np.linalg.norm(v))
    order = np.argsort(-scores, kind="stable")[:k]
    return [Label(rank + 1, float(scores[i]), texts[i]) for rank, i in enumerate(order)]


def label_image(image: str | os.PathLike, texts: Sequence[str] | None, *, index: str | os.PathLike | None = None,
                spec: ModelSpec = ModelSpec(), templates: Sequence[str] = (), k: int = 5,
                device: str | None = None) -> list[Label]:
    """The `k` texts that best describe `image`, best first, with their cosine scores. `texts` None: the caption
    set stored in `index` (`clipengine.index.texts`), searched through faiss."""
    if texts is not None and not texts:
        raise BadInput("no texts to rank: give a file with one per line, or a CSV with a caption column")
    if not Path(image).expanduser().is_file():
        raise BadInput(f"image not found: {image}")
    image = Path(image).expanduser()
    if texts is None:
        from clipengine.index.search import Searcher
        from clipengine.index.texts import has_texts, search_texts

        if index is None or not has_texts(Path(index)):
            raise BadInput("name the texts to rank: --texts FILE, or store a caption set in the index first "
                           "(`clipengine index-texts CAPTIONS --index NAME`)")
        if templates:
            raise BadInput("--template applies to --texts; an indexed caption set is searched as it was stored")
        if k < 1:
            raise BadInput("-k must be at least 1")
        with Searcher(index, spec=spec, device=device) as searcher:
            image_vector = searcher.image_vector(image)
        return [Label(rank + 1, score, text) for rank, (score, text) in enumerate(search_texts(index, image_vector, k))]
    if index is not None:
        from clipengine.index.search import Searcher

        with Searcher(index, spec=spec, device=device) as searcher:
            image_vector = searcher.image_vector(image)
            return rank_texts(image_vector, text_matrix(searcher.text_vectors, texts, templates), texts, k)
    from clipengine.embed import embed_pil_images, embed_texts
    from clipengine.images import Decoded, open_image
    from clipengine.models import load_model, resolve_source

    model = load_model(resolve_source(spec), device=device)
    decoded = open_image(image, draft_size=model.image_size)
    if not isinstance(decoded, Decoded):
        raise BadInput(f"cannot use {image}: {decoded.reason}")
    image_vector = embed_pil_images(model, [decoded.image])[0]
    return rank_texts(image_vector, text_matrix(lambda batch: embed_texts(model, batch), texts, templates), texts, k)
