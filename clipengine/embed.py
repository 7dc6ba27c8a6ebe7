"""The hot path: image files and texts -> L2-normalised float32 embeddings, in big batches.

Work is split where it is cheapest to move between processes:
  * DataLoader worker processes read each file once, hash its bytes (sha256: the content identity a
    moved photo is recognised by), decode it safely (`images.open_image`, with reduced-size JPEG
    decoding) and run the PIL half of open_clip's transform (resize, crop). They hand back uint8
    tensors, a quarter of the bytes of float32.
  * The main process moves each batch to the device (pinned memory, non-blocking copies and
    channels_last on GPU), converts to float and normalises there, and runs the model under
    `torch.inference_mode` with autocast on GPU (float32 on CPU).
Memory stays flat however large the folder: files stream through a bounded prefetch queue, and each
batch of vectors is handed to the caller before the next is computed.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import Compose, Normalize, PILToTensor

from clipengine.formats import DEFAULT_SAMPLING, VideoSampling, is_video_name
from clipengine.images import (
    DEFAULT_MAX_PIXELS,
    WHITE,
    Decoded,
    ImageRef,
    Skipped,
    content_hash,
    describe_ref,
    file_content_hash,
    open_image,
    read_image_bytes,
)
from clipengine.metadata import MediaInfo
from clipengine.models import LoadedModel
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


def split_transform(transform: Compose) -> tuple[Compose, Normalize]:
    """Cut an open_clip transform (eval or train) into its PIL part (ending in uint8 tensors) and its Normalize.

    Applying `x.float().div(255)` and the Normalize to the uint8 output gives bit-identical results
    to the whole transform, while the heavy part stays in the workers and the float part on the device.
    """
    steps = list(transform.transforms)
    cut = next((i for i, s in enumerate(steps) if type(s).__name__ in ("ToTensor", "MaybeToTensor")), None)
    if cut is None or not isinstance(steps[-1], Normalize) or cut != len(steps) - 2:
        raise ValueError(f"unexpected preprocessing pipeline: {transform}")
    return Compose([*steps[:cut], PILToTensor()]), steps[-1]


def is_video(ref: ImageRef) -> bool:
    return isinstance(ref, str) and is_video_name(ref)


class ImageFiles(Dataset):
    """Reads, hashes, decodes and resizes one file (or tar member) per item; never raises for a bad file.
    An item's pixels are (n, 3, H, W) uint8: n = 1 for an image, the kept frames of a video."""

    def __init__(self, paths: Sequence[ImageRef], pixel_transform: Callable, *, known_hashes: Collection[str] = (),
                 max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: int | None = 224, transparency: str = WHITE,
                 video: VideoSampling = DEFAULT_SAMPLING):
        self.paths = paths
        self.pixel_transform = pixel_transform
        self.known_hashes = known_hashes
        self.max_pixels = max_pixels
        self.draft_size = draft_size
        self.transparency = transparency
        self.video = video

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[ImageEmbedding, torch.Tensor | None]:
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

    def _video(self, path: str) -> tuple[ImageEmbedding, torch.Tensor | None]:
        digest = file_content_hash(path)  # read in pieces: a video may be far larger than memory
        if isinstance(digest, Skipped):
            return ImageEmbedding(path, skip_reason=digest.reason), None
        if digest in self.known_hashes:
            return ImageEmbedding(path, hash=digest), None
        result = open_video(path, self.video, max_pixels=self.max_pixels, draft_size=self.draft_size)
        if not isinstance(result, DecodedVideo):
            return ImageEmbedding(path, hash=digest, skip_reason=result.reason), None
        try:
            pixels = torch.stack([self.pixel_transform(frame.image) for frame in result.frames])
        except Exception as e:
            return ImageEmbedding(path, hash=digest, skip_reason=f"preprocessing failed ({e})"), None
        return ImageEmbedding(path, hash=digest, width=result.width, height=result.height,
                              frames=tuple(f.seconds for f in result.frames), metadata=result.metadata,
                              duration=result.duration), pixels


def _collate(items: list) -> tuple[list[ImageEmbedding], torch.Tensor | None]:
    pixels = [p for _, p in items if p is not None]
    return [m for m, _ in items], (torch.cat(pixels) if pixels else None)


def default_batch_size(device: torch.device) -> int:
    """Big batches feed a GPU; on a CPU the model is as efficient at 32 as at 256, and smaller batches
    start the model sooner and keep the decoders busy while it runs."""
    return 256 if device.type == "cuda" else 32


def available_cores() -> int:
    """Cores this process may run on (its affinity mask, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_workers(device: torch.device) -> int:
    """Decode workers: on a GPU every core can decode; on the CPU they share cores with the model."""
    cores = available_cores()
    return max(1, min(cores - 1, 16)) if device.type == "cuda" else max(1, min(cores, 4))


class PixelNormalizer:
    """uint8 batches -> normalised float batches on the model's device (the float half of preprocess)."""

    def __init__(self, normalize: Normalize, device: torch.device):
        self.device = device
        self.mean = torch.tensor(normalize.mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(normalize.std, dtype=torch.float32, device=device).view(1, -1, 1, 1)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        return x.float().div(255).sub_(self.mean).div_(self.std)


def encode_pixels(model: LoadedModel, x: torch.Tensor) -> np.ndarray:
    """Normalised float pixels -> L2-normalised float32 embeddings (numpy, on the CPU), through the exported
    image tower when the model carries one (`model.onnx`), else through torch."""
    if model.onnx is not None and model.onnx.available("image"):
        return model.onnx.encode_pixels(x.cpu().numpy())
    with torch.inference_mode(), model.autocast():
        features = model.model.encode_image(x)
    return F.normalize(features.float(), dim=-1).cpu().numpy()


def embed_images(
    model: LoadedModel,
    paths: Sequence[ImageRef],
    *,
    batch_size: int | None = None,
    workers: int | None = None,
    known_hashes: Collection[str] = (),
    max_pixels: int = DEFAULT_MAX_PIXELS,
    exact_decode: bool = False,
    transparency: str = WHITE,
    video: VideoSampling = DEFAULT_SAMPLING,
) -> Iterator[list[ImageEmbedding]]:
    """Embed image (and video) files in batches, yielding each batch's outcomes in input order.

    Files whose content hash is in `known_hashes` are hashed but not decoded (their vector exists).
    `exact_decode=True` decodes JPEGs at full size, for exact reproduction of open_clip's preprocessing;
    `transparency` DROP treats alpha as open_clip does (clipengine.images.TRANSPARENCY); `video` says how a
    video becomes frames. A batch holds `batch_size` files; the model sees at most `batch_size` pictures at once.
    """
    if not paths:
        return
    pixel_transform, normalize = split_transform(model.image_transform())
    dataset = ImageFiles(paths, pixel_transform, known_hashes=known_hashes, max_pixels=max_pixels,
                         draft_size=None if exact_decode else model.image_size, transparency=transparency, video=video)
    workers = default_workers(model.device) if workers is None else workers
    loader = DataLoader(
        dataset,
        batch_size=batch_size or default_batch_size(model.device),
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=model.device.type == "cuda",
        prefetch_factor=4 if workers else None,
    )
    to_device = PixelNormalizer(normalize, model.device)
    step = loader.batch_size or 1
    for metas, pixels in loader:
        if pixels is not None:
            vectors = np.concatenate([encode_pixels(model, to_device(pixels[i:i + step]))
                                      for i in range(0, len(pixels), step)])
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


def embed_pil_images(model: LoadedModel, images: Sequence[Image.Image]) -> np.ndarray:
    """Embed already-decoded images (e.g. a query), with exactly the preprocessing of `embed_images`."""
    pixel_transform, normalize = split_transform(model.image_transform())
    pixels = torch.stack([pixel_transform(im) for im in images])
    return encode_pixels(model, PixelNormalizer(normalize, model.device)(pixels))


def embed_texts(model: LoadedModel, texts: Sequence[str], *, batch_size: int = 256) -> np.ndarray:
    """Texts -> L2-normalised float32 embeddings, shape (len(texts), dim) (through the exported text tower when
    the model carries one)."""
    out = np.empty((len(texts), model.embed_dim), dtype=np.float32)
    for start in range(0, len(texts), batch_size):
        batch = list(texts[start:start + batch_size])
        out[start:start + len(batch)] = _encode_texts(model, batch)
    return out


def _encode_texts(model: LoadedModel, texts: list[str]) -> np.ndarray:
    if model.onnx is not None and model.onnx.available("text"):
        return model.onnx.encode_texts(texts)
    tokens = model.tokenizer(texts).to(model.device)
    with torch.inference_mode(), model.autocast():
        features = model.model.encode_text(tokens)
    return F.normalize(features.float(), dim=-1).cpu().numpy()
