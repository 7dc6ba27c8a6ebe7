"""The hot path: image files and texts -> L2-normalised float32 embeddings, in big batches.

Work is split where it is cheapest to move between processes:
  * DataLoader worker processes read each file once (`clipengine.decode.FileReader`), hash its bytes
    (sha256: the content identity a moved photo is recognised by), decode it safely (`images.open_image`,
    with reduced-size JPEG decoding) and run the PIL half of open_clip's transform (resize, crop). They
    hand back uint8 tensors, a quarter of the bytes of float32.
  * The main process moves each batch to the device (pinned memory, non-blocking copies and
    channels_last on GPU), converts to float and normalises there, and runs the model under
    `torch.inference_mode` with autocast on GPU (float32 on CPU).
Memory stays flat however large the folder: files stream through a bounded prefetch queue, and each
batch of vectors is handed to the caller before the next is computed. An index whose ONNX image tower
runs faster embeds without torch instead (`clipengine.index.onnx_embed`), reading files the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import Compose, Normalize, PILToTensor

from clipengine.cores import available_cores
from clipengine.decode import CPU_BATCH, FileReader, ImageEmbedding, cpu_workers, embedded
from clipengine.device_decode import DevicePreprocess, device_decodes, joined, jpeg_payload
from clipengine.errors import BadInput
from clipengine.formats import DEFAULT_SAMPLING, VideoSampling
from clipengine.images import DEFAULT_MAX_PIXELS, WHITE, Decoded, ImageRef, open_image
from clipengine.models import LoadedModel


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


class ImageFiles(FileReader, Dataset):
    """`FileReader` as a DataLoader's dataset: pixels as torch uint8 tensors."""

    def __init__(self, paths: Sequence[ImageRef], pixel_transform: Callable, **options):
        super().__init__(paths, pixel_transform, torch.stack, **options)


def _collate(items: list) -> tuple[list[ImageEmbedding], torch.Tensor | None]:
    pixels = [p for _, p in items if p is not None]
    return [m for m, _ in items], (torch.cat(pixels) if pixels else None)


def _payloads(items: list) -> tuple[list[ImageEmbedding], list]:
    """A batch left unjoined: each file's pixels, `DeviceJpeg` or None (`device_decode.joined` joins them)."""
    return [m for m, _ in items], [p for _, p in items]


def default_batch_size(device: torch.device) -> int:
    """Big batches feed a GPU; on a CPU the model is as efficient at 32 as at 256, and smaller batches
    start the model sooner and keep the decoders busy while it runs."""
    return 256 if device.type == "cuda" else CPU_BATCH


def default_workers(device: torch.device) -> int:
    """Decode workers: on a GPU every core can decode; on the CPU they share cores with the model."""
    return max(1, min(available_cores() - 1, 16)) if device.type == "cuda" else cpu_workers()


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
    decode: str = "auto",
) -> Iterator[list[ImageEmbedding]]:
    """Embed image (and video) files in batches, yielding each batch's outcomes in input order.

    Files whose content hash is in `known_hashes` are hashed but not decoded (their vector exists).
    `exact_decode=True` decodes JPEGs at full size, for exact reproduction of open_clip's preprocessing;
    `transparency` DROP treats alpha as open_clip does (clipengine.images.TRANSPARENCY); `video` says how a
    video becomes frames. A batch holds `batch_size` files; the model sees at most `batch_size` pictures at once.
    `decode`: where JPEGs are decoded: "cpu" (the workers), "gpu" (the model's device, `clipengine.device_decode`;
    on a CPU device through torchvision's decoder), or "auto" (the device when it is a GPU whose nvJPEG works).
    """
    if not paths:
        return
    pixel_transform, normalize = split_transform(model.image_transform())
    draft_size = None if exact_decode else model.image_size
    preprocess = DevicePreprocess.of(pixel_transform, model.device) if device_decodes(decode, model.device) else None
    if decode == "gpu" and preprocess is None:
        raise BadInput(f"--decode gpu reproduces a resize then a center crop; this model's preprocessing is "
                       f"{pixel_transform}: use --decode cpu")
    dataset = ImageFiles(paths, pixel_transform, known_hashes=known_hashes, max_pixels=max_pixels,
                         draft_size=draft_size, transparency=transparency, video=video,
                         device_jpeg=jpeg_payload if preprocess else None)
    workers = default_workers(model.device) if workers is None else workers
    loader = DataLoader(
        dataset,
        batch_size=batch_size or default_batch_size(model.device),
        num_workers=workers,
        collate_fn=_collate if preprocess is None else _payloads,
        pin_memory=model.device.type == "cuda",
        prefetch_factor=4 if workers else None,
    )

    def on_the_cpu(data: bytes, name: str) -> torch.Tensor | str:  # a JPEG the device could not decode
        result = open_image(data, max_pixels=max_pixels, draft_size=draft_size, transparency=transparency, name=name)
        return pixel_transform(result.image)[None] if isinstance(result, Decoded) else result.reason

    batches: Iterable = loader if preprocess is None else joined(loader, preprocess, on_the_cpu)
    to_device = PixelNormalizer(normalize, model.device)
    yield from embedded(batches, lambda pixels: encode_pixels(model, to_device(pixels)), loader.batch_size or 1,
                        known_hashes)


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
