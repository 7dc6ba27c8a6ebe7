"""JPEGs decoded on the model's device: nvJPEG on CUDA (`torchvision.io.decode_jpeg`), a batch at a time, then
turned upright, resized and cropped there, so that decoding keeps up with a GPU.

Why: a 12 MP JPEG costs 42-46 ms of a CPU core, most of it Huffman decoding, which DCT scaling cannot skip;
16 cores decode about 380 such photos a second, and a ViT-B/32 at bf16 on an H100-class GPU embeds well over
10,000. Who does what:
- the decode workers read and hash each file as always and read a JPEG's header
  (`images.device_jpeg_header`: size, EXIF orientation and metadata, no pixels); a JPEG the device takes
  travels to the main process as its bytes, a uint8 tensor that a DataLoader hands over in shared memory.
  Every other file (PNG, HEIC, RAW, video; CMYK, progressive or huge JPEGs) is decoded on the CPU as before;
- the main process decodes a batch's JPEGs in one call on the device, turns each upright (EXIF), resizes
  (antialiased, with the preprocessing's interpolation) and center-crops as the model's preprocessing says,
  and joins them with the CPU rows in file order. A JPEG the device fails on is decoded on the CPU there and
  then (PIL), so no file is lost to it.

On a CPU device the same code decodes through libjpeg-turbo (torchvision's CPU decoder): that is how the tests
cover everything but nvJPEG itself. The pixels differ from the CPU path's (full decode and torch's resampling
against a DCT-scaled decode and PIL's); the embeddings' agreement is measured in tests/test_device_decode.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import CenterCrop, InterpolationMode, Resize
from torchvision.transforms.v2 import functional as F

from clipengine.decode import ImageEmbedding, check_decode_choice
from clipengine.errors import BadInput


@dataclass(frozen=True)
class DeviceJpeg:
    """A JPEG's bytes on their way to the device, and how to turn it upright."""

    data: torch.Tensor  # uint8, 1-D
    orientation: int


def jpeg_payload(data: bytes, orientation: int) -> DeviceJpeg:
    """What a decode worker hands over for a JPEG the device decodes (`FileReader`'s `device_jpeg`)."""
    return DeviceJpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), orientation)


def upright(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """A (3, H, W) image turned as EXIF `orientation` says, as PIL's `ImageOps.exif_transpose` turns it."""
    if orientation == 2:
        return image.flip(-1)
    if orientation == 3:
        return image.flip(-1).flip(-2)
    if orientation == 4:
        return image.flip(-2)
    if orientation == 5:
        return image.transpose(-2, -1)
    if orientation == 6:
        return torch.rot90(image, -1, dims=(-2, -1))
    if orientation == 7:
        return image.transpose(-2, -1).flip(-1).flip(-2)
    if orientation == 8:
        return torch.rot90(image, 1, dims=(-2, -1))
    return image


@dataclass(frozen=True)
class DevicePreprocess:
    """The model's resize and center crop, on tensors on `device`."""

    resize: int
    crop: tuple[int, int]
    interpolation: InterpolationMode
    device: torch.device

    @classmethod
    def of(cls, pixel_transform: Any, device: torch.device) -> DevicePreprocess | None:
        """The device version of a PIL transform (`embed.split_transform`'s first half), or None when it is not
        a shorter-side resize then a center crop (open_clip's 'shortest' mode, the default of every pretrained
        model); other modes keep the CPU path."""
        steps = [s for s in getattr(pixel_transform, "transforms", []) if type(s).__name__ not in
                 ("MaybeConvertMode", "PILToTensor", "_convert_to_rgb")]
        if len(steps) != 2 or not isinstance(steps[0], Resize) or not isinstance(steps[1], CenterCrop):
            return None
        size = steps[0].size
        size = size if isinstance(size, int) else size[0] if len(size) == 1 else None
        if size is None or steps[0].max_size is not None:
            return None
        crop = steps[1].size
        return cls(size, (int(crop[0]), int(crop[1])), steps[0].interpolation, device)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        image = F.resize(image, [self.resize], interpolation=self.interpolation, antialias=True)
        return F.center_crop(image, list(self.crop))

    def decode(self, jpegs: list[DeviceJpeg]) -> list[torch.Tensor | None]:
        """Each JPEG as a (3, crop) uint8 tensor on the device, or None where the device cannot decode it."""
        if not jpegs:
            return []
        try:
            images: list[torch.Tensor | None] = list(
                decode_jpeg([j.data for j in jpegs], mode=ImageReadMode.RGB, device=self.device))
        except RuntimeError:  # one bad file fails the batch: find which, one at a time
            images = [_decode_one(j.data, self.device) for j in jpegs]
        return [None if image is None else self(upright(image, j.orientation)) for image, j in zip(images, jpegs,
                                                                                                   strict=True)]


def _decode_one(data: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        return None


CpuFallback = Callable[[bytes, str], "torch.Tensor | str"]  # a JPEG's bytes -> (1, 3, H, W) uint8, or why not


def joined(batches: Iterable[tuple[list[ImageEmbedding], list[Any]]], preprocess: DevicePreprocess,
           cpu_fallback: CpuFallback) -> Iterator[tuple[list[ImageEmbedding], torch.Tensor | None]]:
    """Batches of (outcomes, each file's payload: CPU pixels, a `DeviceJpeg` or None) as (outcomes, pixels on the
    device in file order), the JPEGs decoded there; a JPEG that fails on the device and on the CPU becomes
    a skipped file."""
    for metas, payloads in batches:
        jpegs = [p for p in payloads if isinstance(p, DeviceJpeg)]
        decoded = iter(preprocess.decode(jpegs))
        rows: list[torch.Tensor] = []
        out: list[ImageEmbedding] = []
        for meta, payload in zip(metas, payloads, strict=True):
            if isinstance(payload, DeviceJpeg):
                image = next(decoded)
                if image is None:
                    fallback = cpu_fallback(payload.data.numpy().tobytes(), meta.path)
                    if isinstance(fallback, str):
                        out.append(replace(meta, skip_reason=fallback))
                        continue
                    rows.append(fallback.to(preprocess.device))
                else:
                    rows.append(image[None])
            elif payload is not None:
                rows.append(payload.to(preprocess.device, non_blocking=True))
            out.append(meta)
        yield out, torch.cat(rows) if rows else None


def check_decode(decode: str, device: torch.device) -> None:
    """A `--decode` choice that can run here, or a one-line error."""
    check_decode_choice(decode)
    if decode == "gpu" and device.type != "cuda":
        raise BadInput(f"--decode gpu decodes JPEGs with nvJPEG on a CUDA device; this run embeds on {device.type}")


def device_decodes(decode: str, device: torch.device) -> bool:
    """Whether JPEGs go to the device: asked for ("gpu": on a CPU device too, through torchvision's CPU decoder,
    which is how the tests run this path), or (auto) on a CUDA device whose nvJPEG decodes a probe JPEG."""
    check_decode_choice(decode)
    if decode != "auto":
        return decode == "gpu"
    return device.type == "cuda" and _nvjpeg_works(device)


_PROBE: dict[str, bool] = {}


def _nvjpeg_works(device: torch.device) -> bool:
    key = str(device)
    if key not in _PROBE:
        import io

        from PIL import Image

        buffer = io.BytesIO()
        Image.new("RGB", (16, 16), (200, 30, 30)).save(buffer, "JPEG")
        _PROBE[key] = _decode_one(torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8), device) is not None
    return _PROBE[key]
