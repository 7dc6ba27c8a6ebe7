"""Turn a query (text, image or raw vector) into ranked hits from an index.

A `Searcher` opens an index read-only and encodes a query the cheapest way that gives the same vector:
a raw vector needs nothing; an image that is itself in the index and unchanged uses its stored vector;
anything else goes through the index's exported ONNX towers (`clipengine.index.query_encoders`: no torch, a
fraction of a second in a fresh process), and only an index without verified towers loads the torch
model. The model is always the index's own; naming another is refused before anything is loaded.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from clipengine.errors import BadInput, FallbackNotice
from clipengine.formats import is_video_name
from clipengine.index.faiss_view import SearchStructure
from clipengine.index.filters import KEEP_ALL, Filter
from clipengine.index.hits import Hit
from clipengine.index.query_encoders import EncodersUnavailable, QueryEncoders, check_runtime, fallback_advice
from clipengine.index.store import IndexStore
from clipengine.models import ModelSpec, check_same_model

if TYPE_CHECKING:
    from clipengine.index.ann import SearchableIndex
    from clipengine.index.terms import Term
    from clipengine.models import LoadedModel


class Searcher:
    """An open index, ready for many queries. Close it when done (or use `with`).

    `runtime`: "onnx" (the exported towers, with a notice and torch where they cannot be used), "torch"
    (the model itself: the reference, and seconds to load), or None for onnx. `one_shot=True` suits a
    process that runs one query (the CLI): the ONNX sessions start ~4x faster and run ~2x slower.
    `precision` "int8" uses the quantised towers (`clipengine export --quantize int8`); None takes them only
    where their measured recall change allowed it.
    """

    def __init__(self, index_path: str | os.PathLike, *, spec: ModelSpec = ModelSpec(), device: str | None = None,
                 runtime: str | None = None, one_shot: bool = False, precision: str | None = None):
        check_runtime(runtime, precision)
        self.store = IndexStore.open(Path(index_path))
        try:
            check_same_model(self.store.manifest["model"], spec, f"index {index_path}")
        except BaseException:
            self.store.close()
            raise
        self.device = device
        self.one_shot = one_shot
        self.precision = precision
        self._faiss: SearchableIndex | None = None
        self._faiss_generation = -1
        self._model: LoadedModel | None = None
        self._encoders: QueryEncoders | None | bool = False if runtime == "torch" else None

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Searcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def model(self) -> LoadedModel:
        if self._model is None:
            from clipengine.models import load_model

            self._model = load_model(self.store.manifest["model"], device=self.device)
        return self._model

    @property
    def faiss(self) -> SearchableIndex:
        """The index's faiss structure, memory-mapped: opening costs milliseconds at any size."""
        if self._faiss is None:
            self._faiss_generation = self.store.generation
            self._faiss = SearchStructure(self.store).view(mmap=True)
        return self._faiss

    def refresh(self) -> bool:
        """Follow commits made since the search structure was read (by an `index` run going on now): the next
        query reads it again, current with the catalogue. Returns whether there was anything to follow.
        A resident searcher calls this before its queries; the catalogue itself is always read live."""
        if self._faiss is None or self.store.generation == self._faiss_generation:
            return False
        self._faiss = None
        return True

    @property
    def encoders(self) -> QueryEncoders | None:
        """The index's exported towers, or None (then queries go through torch, with a notice if that is fixable)."""
        if self._encoders is None:
            try:
                self._encoders = QueryEncoders.open(self.store.path, self.store.query_encoders,
                                                    precision=self.precision, one_shot=self.one_shot)
            except EncodersUnavailable as e:
                self._fall_back(e)
        return self._encoders if isinstance(self._encoders, QueryEncoders) else None

    def _fall_back(self, e: EncodersUnavailable) -> None:
        self._encoders = False
        advice = fallback_advice(self.store.query_encoders, e, self.store.path)
        if advice:
            warnings.warn(advice, FallbackNotice, stacklevel=3)

    def _encode(self, tower: str, inputs: list, on_torch: Callable[[list], np.ndarray]) -> np.ndarray:
        """The vectors of `inputs` (one row each) through the exported tower, or `on_torch` where it cannot."""
        encoders = self.encoders
        if encoders is not None and encoders.available(tower):
            try:
                return (encoders.encode_texts if tower == "text" else encoders.encode_images)(inputs)
            except EncodersUnavailable as e:
                self._fall_back(e)
        return on_torch(inputs)

    # ---- queries -> vectors -------------------------------------------------------------------

    def text_vector(self, text: str) -> np.ndarray:
        if not text.strip():
            raise BadInput("the text query is empty")

        def on_torch(texts: list[str]) -> np.ndarray:
            from clipengine.embed import embed_texts

            return embed_texts(self.model, texts)
        return self._encode("text", [text], on_torch)[0]

    def text_vectors(self, texts: Sequence[str]) -> np.ndarray:
        """Many texts at once, (len(texts), dim): through the exported text tower in batches when there is one."""
        encoders = self.encoders
        if encoders is not None and encoders.available("text"):
            try:
                return np.concatenate([encoders.encode_texts(list(texts[i:i + 256])) for i in range(0, len(texts), 256)])
            except EncodersUnavailable as e:
                self._fall_back(e)
        from clipengine.embed import embed_texts

        return embed_texts(self.model, list(texts))

    def image_vector(self, image_path: str | os.PathLike) -> np.ndarray:
        path, st = _query_file(image_path, "image")
        stored = self.store.stored_vector(path, st.st_size, st.st_mtime_ns)
        if stored is not None:
            return stored
        if is_video_name(path):  # as indexing makes a video's own vector: the mean of its frames'
            mean = self.video_vectors(image_path).mean(axis=0)
            return mean / np.linalg.norm(mean)
        return self._decoded_vector(path, str(image_path))

    def video_vectors(self, video_path: str | os.PathLike) -> np.ndarray:
        """A video's frame vectors (n, dim): stored if the index holds it unchanged, else its frames chosen and
        embedded as indexing does."""
        path, st = _query_file(video_path, "video")
        stored = self.store.stored_frames(path, st.st_size, st.st_mtime_ns)
        if stored is not None:
            return stored
        from clipengine.video import DecodedVideo, open_video

        video = open_video(path, draft_size=self._input_size())
        if not isinstance(video, DecodedVideo):
            raise BadInput(f"cannot use {video_path} as a query: {video.reason}")

        def on_torch(images: list) -> np.ndarray:
            from clipengine.embed import embed_pil_images

            return embed_pil_images(self.model, images)
        return self._encode("image", [f.image for f in video.frames], on_torch)

    def image_bytes_vector(self, data: bytes, max_pixels: int | None = None, name: str | None = None) -> np.ndarray:
        """The vector of an image given as bytes (an upload called `name`: its extension tells a camera RAW
        file), decoded under the same pixel cap as indexing; or, for the bytes of an indexed image, its stored
        vector (as `image_vector` gives for its path)."""
        from clipengine.images import content_hash

        stored = self.store.vector_of_content(content_hash(bytes(data)))
        if stored is not None:
            return stored
        if name and is_video_name(name):  # PyAV reads a video from its file; an upload is held in memory
            raise BadInput(f"{os.path.basename(name)} is a video: search by a video with `clipengine search --image "
                           "FILE`, or by an indexed one's id")
        return self._decoded_vector(data, "the uploaded image", max_pixels, name)

    def id_vector(self, file_id: int) -> np.ndarray:
        """The stored vector of an indexed file: "more like this" without reading the file."""
        ids, vectors = self.store.gather(np.asarray([file_id], dtype=np.int64))
        if not ids.size:
            from clipengine.index.thumbnails import FileUnavailable

            raise FileUnavailable(f"no searchable file has id {file_id} in this index")
        return vectors[0]

    def _input_size(self) -> int:
        """The image tower's input size, which a query is decoded to as indexing decodes (without loading torch
        when the exported tower will embed it)."""
        encoders = self.encoders
        return encoders.image_size if encoders is not None and encoders.available("image") else self.model.image_size

    def _decoded_vector(self, source: str | bytes, what: str, max_pixels: int | None = None,
                        name: str | None = None) -> np.ndarray:
        from clipengine.images import DEFAULT_MAX_PIXELS, Decoded, open_image  # PIL: not needed by text queries

        decoded = open_image(source, draft_size=self._input_size(), max_pixels=max_pixels or DEFAULT_MAX_PIXELS,
                             name=name)
        if not isinstance(decoded, Decoded):
            raise BadInput(f"cannot use {what} as a query: {decoded.reason}")

        def on_torch(images: list) -> np.ndarray:
            from clipengine.embed import embed_pil_images

            return embed_pil_images(self.model, images)
        return self._encode("image", [decoded.image], on_torch)[0]

    # ---- vectors -> hits ----------------------------------------------------------------------

    def search_vector(self, vector: np.ndarray, k: int = 10, prefix: str | None = None, *,
                      where: Filter | None = None, kind: str | None = None) -> list[Hit]:
        """Top-k files by cosine similarity to `vector` (normalised here), optionally under a path prefix. A video
        is one hit, at the moment of its best-matching frame (`Hit.seconds`). Several vectors (rows) search
        together, each file scored by its best match with any of them (a video's frames: `search_id`). `where`
        keeps only the files a `Filter` matches (its prefix replaced by `prefix` when that is given). `kind`
        ("text" or "image") picks the depth tuned for that kind of query; a vector of no known kind searches
        at the deeper of the two."""
        if k < 1:
            raise BadInput("-k must be at least 1")
        q = np.array(vector, dtype=np.float32, ndmin=2)
        if q.shape[1] != self.store.dim:
            raise BadInput(f"query vector has dimension {q.shape[1]}, but this index holds {self.store.dim}")
        norms = np.linalg.norm(q, axis=1, keepdims=True)
        if not np.all(np.isfinite(norms)) or np.any(norms == 0):
            raise BadInput("query vector is zero or not finite")
        q /= norms
        allowed = None
        kept = self.store.visible((where or KEEP_ALL).under(prefix))
        if not kept.is_empty:
            allowed = self.store.ids_matching(kept)
            if allowed.size == 0:
                return []
        total = self.faiss.ntotal
        if total == 0:
            return []
        depth = k
        while True:  # a video's frames may fill the top: look deeper until k files are found, or everything is seen
            scores, ids = self.faiss.search(q, min(depth, total), allowed, kind)
            best: dict[int, float] = {}
            for score, i in zip(scores.ravel().tolist(), ids.ravel().tolist(), strict=True):
                if i >= 0 and score > best.get(i, -np.inf):
                    best[i] = score
            found = sorted(((s, i) for i, s in best.items()), key=lambda pair: -pair[0])
            plan = self.faiss.last_plan
            hits = self._hits(found, k, plan.describe() if plan is not None else None)
            if len(hits) >= k or len(found) < min(depth, total) or depth >= total:
                return hits
            depth *= 4

    def _hits(self, found: list[tuple[float, int]], k: int, plan: str | None = None) -> list[Hit]:
        """(score, search structure id), best first -> at most k hits, one per file: a video at its best frame;
        `plan` says how a filtered search ran."""
        rows = self.store.rows(i for _, i in found)
        hits: list[Hit] = []
        files: set[int] = set()
        for score, i in found:
            row = rows.get(i)
            if row is None or row.id in files:  # a row deleted since the view was read; a video already found
                continue
            files.add(row.id)
            hits.append(Hit(len(hits) + 1, score, row.path, row.width, row.height, row.id, row.seconds, row.taken,
                            row.taken_at, row.place, plan))
            if len(hits) == k:
                break
        return hits

    def search_text(self, text: str, k: int = 10, prefix: str | None = None, *,
                    where: Filter | None = None) -> list[Hit]:
        return self.search_vector(self.text_vector(text), k, prefix, where=where, kind="text")

    def search_image(self, image_path: str | os.PathLike, k: int = 10, prefix: str | None = None, *,
                     where: Filter | None = None) -> list[Hit]:
        """Files like an image; like any scene of a video (`video_vectors`)."""
        if is_video_name(image_path):
            return self.search_vector(self.video_vectors(image_path), k, prefix, where=where, kind="image")
        return self.search_vector(self.image_vector(image_path), k, prefix, where=where, kind="image")

    def terms_vector(self, terms: Sequence[Term]) -> np.ndarray:
        """Query arithmetic (`clipengine.index.terms`): the normalised sum of each term's normalised vector
        times its weight."""
        if not terms:
            raise BadInput("give at least one query term")
        total = np.zeros(self.store.dim, dtype=np.float64)
        for term in terms:
            if term.text is not None:
                vector = self.text_vector(term.text)
            elif term.image is not None:
                vector = self.image_vector(term.image)
            else:
                assert term.id is not None
                vector = self.id_vector(term.id)
            vector = np.asarray(vector, dtype=np.float64).reshape(-1)
            total += term.weight * vector / np.linalg.norm(vector)
        norm = float(np.linalg.norm(total))
        if norm < 1e-6:
            raise BadInput("the query terms cancel out: nothing is left to search for")
        return (total / norm).astype(np.float32)

    def search_terms(self, terms: Sequence[Term], k: int = 10, prefix: str | None = None, *,
                     where: Filter | None = None) -> list[Hit]:
        """Images for a weighted sum of texts, image files and indexed images (see `terms_vector`): at the text
        queries' depth when any term is a text."""
        kind = "text" if any(term.text is not None for term in terms) else "image"
        return self.search_vector(self.terms_vector(terms), k, prefix, where=where, kind=kind)

    def search_id(self, file_id: int, k: int = 10, prefix: str | None = None, *,
                  where: Filter | None = None) -> list[Hit]:
        """Files like an indexed one (itself first, at score 1); like any scene of a video."""
        frames = self.store.frames_of_file(file_id)
        return self.search_vector(frames if frames is not None else self.id_vector(file_id), k, prefix, where=where,
                                  kind="image")


def _query_file(path: str | os.PathLike, what: str) -> tuple[str, os.stat_result]:
    """A query file's absolute path and stat (its identity in the index), or a one-line error."""
    absolute = os.path.abspath(os.path.expanduser(os.fspath(path)))
    try:
        return absolute, os.stat(absolute)
    except OSError as e:
        raise BadInput(f"cannot read query {what} {path}: {e.strerror}") from None
