"""Indexing without torch: image files -> embeddings through an index's verified ONNX image tower.

Adding three photos to an index used to take 7.9 s, 5.4 s of it importing torch and open_clip, which
the run then never used: it embedded with onnxruntime. When the index's image tower is exported,
verified, and measured faster than torch on this CPU (`pipeline.embedding_runtime`), an indexing run now
preprocesses with PIL and numpy, as image queries do (`query_encoders.ImagePreprocess`, which reproduces
open_clip's resize, crop and normalisation), and embeds with onnxruntime. Files are read by the same
`decode.FileReader` as on the torch path, in decode worker processes, with the same drafts and caps.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Iterator, Sequence

import numpy as np

from clipengine.decode import CPU_BATCH, FileReader, ImageEmbedding, cpu_workers, decoded_batches, embedded
from clipengine.formats import DEFAULT_SAMPLING, VideoSampling
from clipengine.images import DEFAULT_MAX_PIXELS, WHITE, ImageRef
from clipengine.index.query_encoders import ImagePreprocess, QueryEncoders, normalise_pixels


def chw_pixels(preprocess: ImagePreprocess, image) -> np.ndarray:
    """A decoded RGB image -> (3, size, size) uint8, resized and cropped as open_clip's eval transform does."""
    return np.ascontiguousarray(np.asarray(preprocess.pil_part(image), dtype=np.uint8).transpose(2, 0, 1))


def embed_files(encoders: QueryEncoders, paths: Sequence[ImageRef], *, batch_size: int | None = None,
                workers: int | None = None, known_hashes: Collection[str] = (), max_pixels: int = DEFAULT_MAX_PIXELS,
                exact_decode: bool = False, video: VideoSampling = DEFAULT_SAMPLING) -> Iterator[list[ImageEmbedding]]:
    """`clipengine.embed.embed_images` through the exported image tower: the same outcomes, in the same
    batches, with vectors within the export check's tolerance of torch's."""
    if not paths:
        return
    preprocess = ImagePreprocess.from_config(encoders.record["image"]["preprocess"])
    reader = FileReader(paths, functools.partial(chw_pixels, preprocess), np.stack, known_hashes=known_hashes,
                        max_pixels=max_pixels, draft_size=None if exact_decode else preprocess.size, transparency=WHITE,
                        video=video)
    workers = cpu_workers() if workers is None else workers
    batch_size = batch_size or CPU_BATCH
    batches = decoded_batches(reader, batch_size, workers, while_decoding=lambda: encoders.prepare("image"))
    yield from embedded(batches, lambda pixels: encoders.encode_pixels(
        normalise_pixels(pixels, preprocess.mean, preprocess.std)), batch_size, known_hashes)

