"""What a decode worker does to one file, and a pool of them, with no torch: files -> outcomes + uint8 pixels.

Both embedding paths read files the same way: the torch one (`clipengine.embed`, a DataLoader over
`ImageFiles`) and the torch-free one that embeds through an index's ONNX image tower
(`clipengine.index.onnx_embed`, over `decoded_batches`). A reader hashes each file's bytes (sha256: the
content identity a moved photo is recognised by), skips decoding when the hash is known, decodes safely
(`images.open_image`, with reduced-size JPEG decoding) and runs the PIL half of the preprocessing. Nothing
here raises for a bad file: it becomes an outcome with a skip reason.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
from collections import deque
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from clipengine.cores import available_cores
from clipengine.errors import BadInput
from clipengine.formats import DEFAULT_SAMPLING, VideoSampling, is_video_name
from clipengine.images import (
    DEFAULT_MAX_PIXELS,
    WHITE,
    Decoded,
    ImageRef,
    Skipped,
    content_hash,
    describe_ref,
    device_jpeg_header,
    file_content_hash,
    open_image,
    read_image_bytes,
)
from clipengine.metadata import MediaInfo
from clipengine.video import DecodedVideo, open_video


@dataclass(frozen=True)
class ImageEmbedding:
    """One file's outcome. Exactly one of: a vector, a skip reason, or `reused` (its hash is known). A video's
    vector is the mean of its frames' (normalised); `frames` are their moments in seconds, `frame_vectors`
    their embeddings."""

    path: str
    hash: str | None = None
    width: int = 0
    height: int = 0
    vector: np.ndarray | None = None
    skip_reason: str | None = None
    frames: tuple[float, ...] = ()
    frame_vectors: np.ndarray | None = None
    metadata: MediaInfo | None = None  # read while decoding (None: not decoded)
    duration: float | None = None  # a video's, in seconds

    @property
    def reused(self) -> bool:
        return self.vector is None and self.skip_reason is None


def cpu_workers() -> int:
    """Decode workers beside a model on the CPU: they share its cores."""
    return max(1, min(available_cores(), 4))


def is_video(ref: ImageRef) -> bool:
    return isinstance(ref, str) and is_video_name(ref)


class FileReader:
    """Reads, hashes, decodes and resizes one file (or tar member) per item; never raises for a bad file.
    An item's pixels are (n, 3, H, W) uint8 as `pixel_transform` and `stack` make them (torch tensors or
    numpy arrays): n = 1 for an image, the kept frames of a video. With `device_jpeg`, a JPEG the model's device
    can decode (`images.device_jpeg_header`) is not decoded here: its item is `device_jpeg(bytes, orientation)`
    (`clipengine.device_decode`)."""

    def __init__(self, paths: Sequence[ImageRef], pixel_transform: Callable, stack: Callable, *,
                 known_hashes: Collection[str] = (), max_pixels: int = DEFAULT_MAX_PIXELS,
                 draft_size: int | None = 224, transparency: str = WHITE, video: VideoSampling = DEFAULT_SAMPLING,
                 device_jpeg: Callable[[bytes, int], Any] | None = None):
        self.device_jpeg = device_jpeg
        self.paths = paths
        self.pixel_transform = pixel_transform
        self.stack = stack
        self.known_hashes = known_hashes
        self.max_pixels = max_pixels
        self.draft_size = draft_size
        self.transparency = transparency
        self.video = video

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[ImageEmbedding, Any]:
        ref = self.paths[i]
        if is_video(ref):
            assert isinstance(ref, str)
            return self._video(ref)
        path = describe_ref(ref)
        data = read_image_bytes(ref)
        if isinstance(data, Skipped):
            return ImageEmbedding(path, skip_reason=data.reason), None
        digest = content_hash(data)
        if digest in self.known_hashes:
            return ImageEmbedding(path, hash=digest), None
        if self.device_jpeg is not None and (header := device_jpeg_header(data, max_pixels=self.max_pixels)):
            return (ImageEmbedding(path, hash=digest, width=header.width, height=header.height, metadata=header.metadata),
                    self.device_jpeg(data, header.orientation))
        result = open_image(data, max_pixels=self.max_pixels, draft_size=self.draft_size, transparency=self.transparency,
                            name=path)
        if not isinstance(result, Decoded):
            return ImageEmbedding(path, hash=digest, skip_reason=result.reason), None
        try:
            pixels = self.pixel_transform(result.image)[None]
        except Exception as e:  # a transform failing on a decoded image is still one bad file
            return ImageEmbedding(path, hash=digest, skip_reason=f"preprocessing failed ({e})"), None
        return ImageEmbedding(path, hash=digest, width=result.width, height=result.height,
                              metadata=result.metadata), pixels

    def _video(self, path: str) -> tuple[ImageEmbedding, Any]:
        digest = file_content_hash(path)  # read in pieces: a video may be far larger than memory
        if isinstance(digest, Skipped):
            return ImageEmbedding(path, skip_reason=digest.reason), None
        if digest in self.known_hashes:
            return ImageEmbedding(path, hash=digest), None
        result = open_video(path, self.video, max_pixels=self.max_pixels, draft_size=self.draft_size)
        if not isinstance(result, DecodedVideo):
            return ImageEmbedding(path, hash=digest, skip_reason=result.reason), None
        try:
            pixels = self.stack([self.pixel_transform(frame.image) for frame in result.frames])
        except Exception as e:
            return ImageEmbedding(path, hash=digest, skip_reason=f"preprocessing failed ({e})"), None
        return ImageEmbedding(path, hash=digest, width=result.width, height=result.height,
                              frames=tuple(f.seconds for f in result.frames), metadata=result.metadata,
                              duration=result.duration), pixels


DECODE_CHOICES = ("auto", "gpu", "cpu")  # where JPEGs are decoded (`--decode`; clipengine.device_decode)


def check_decode_choice(decode: str) -> None:
    """A `--decode` value that names something, or a one-line error."""
    if decode not in DECODE_CHOICES:
        raise BadInput(f"--decode is one of {', '.join(DECODE_CHOICES)}, not {decode!r}")


CPU_BATCH = 32  # files per batch on a CPU: the model is as efficient at 32 as at 256, and starts sooner


def embedded(batches: Iterable[tuple[list[ImageEmbedding], Any]], encode: Callable[[Any], np.ndarray], step: int,
             known_hashes: Collection[str]) -> Iterator[list[ImageEmbedding]]:
    """Each batch's outcomes with their vectors: its pixels `encode`d at most `step` pictures at a time (a
    batch of videos holds more pictures than files)."""
    for metas, pixels in batches:
        if pixels is not None:
            vectors = np.concatenate([encode(pixels[i:i + step]) for i in range(0, len(pixels), step)])
            metas = list(_with_vectors(metas, vectors, known_hashes))
        yield metas


def _with_vectors(metas: list[ImageEmbedding], vectors: np.ndarray, known_hashes: Collection[str]
                  ) -> Iterator[ImageEmbedding]:
    """Hand each decoded file its rows of `vectors` (one for an image, one per frame for a video)."""
    row = 0
    for m in metas:
        if m.skip_reason or m.hash in known_hashes:
            yield m
        elif m.frames:
            frames = vectors[row:row + len(m.frames)]
            row += len(m.frames)
            mean = frames.mean(axis=0)
            yield dataclasses.replace(m, vector=mean / np.linalg.norm(mean), frame_vectors=frames)
        else:
            yield dataclasses.replace(m, vector=vectors[row])
            row += 1


_READER: FileReader | None = None  # a pool worker's reader


def _set_reader(reader: FileReader) -> None:
    global _READER
    _READER = reader


def _read_items(start: int, stop: int, reader: FileReader | None = None) -> list[tuple[ImageEmbedding, Any]]:
    reader = reader or _READER
    assert reader is not None
    return [reader[i] for i in range(start, stop)]


def decoded_batches(reader: FileReader, batch_size: int, workers: int, while_decoding: Callable[[], Any] | None = None
                    ) -> Iterator[tuple[list[ImageEmbedding], np.ndarray | None]]:
    """The reader's items in batches, in order: (outcomes, their pixels stacked, or None when no file of the
    batch needs embedding). `workers` processes decode ahead of the caller, a bounded two batches each, so
    memory stays flat however many files there are; 0 decodes here. `while_decoding` runs here once the
    workers have their first batches (loading the model then costs no wall time). A worker that dies
    (killed for memory) raises BrokenProcessPool rather than hanging."""
    starts = iter(range(0, len(reader), batch_size))
    if workers == 0:
        if while_decoding is not None:
            while_decoding()
        for start in starts:
            yield _stacked(_read_items(start, min(start + batch_size, len(reader)), reader))
        return
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(), initializer=_set_reader,
                             initargs=(reader,)) as pool:
        pending: deque[list[Future]] = deque()

        def submit() -> bool:
            start = next(starts, None)
            if start is None:
                return False
            stop = min(start + batch_size, len(reader))
            step = -(-(stop - start) // workers)  # the batch split over every worker
            pending.append([pool.submit(_read_items, s, min(s + step, stop)) for s in range(start, stop, step)])
            return True

        for _ in range(2 * workers):
            if not submit():
                break
        if while_decoding is not None:
            while_decoding()
        while pending:
            items = [item for future in pending.popleft() for item in future.result()]
            submit()
            yield _stacked(items)


def _stacked(items: list[tuple[ImageEmbedding, Any]]) -> tuple[list[ImageEmbedding], np.ndarray | None]:
    pixels = [p for _, p in items if p is not None]
    return [m for m, _ in items], (np.concatenate(pixels) if pixels else None)
