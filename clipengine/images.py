"""Open one image safely, or say in a few words why it was skipped.

Real photo folders hold 12+ megapixel JPEGs, PNGs of hundreds of megapixels, CMYK and 16-bit files,
palette images with transparency, animated GIFs, EXIF-rotated photos, and files that are truncated,
empty or not images at all. Nothing here raises on a bad file: `open_image` returns `Decoded` or
`Skipped`, so one bad file can never stop an indexing run.

Two choices keep decoding cheap and bounded: the pixel count is read from the header and checked
against a cap *before* any pixel is decoded, and a JPEG much larger than the model input is decoded at
a reduced size by libjpeg's DCT scaling (`Image.draft`), which is several times faster and is what
makes large photos affordable. Both happen before the image is ever held in memory at full size.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
import threading
import warnings
from dataclasses import dataclass
from typing import IO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from clipengine.sizes import DEFAULT_MAX_PIXELS

MAX_FILE_BYTES = 1 << 30  # larger "images" are almost always something else; never read them whole
TarMember = tuple[str, int, int]  # (tar shard path, data offset, size): an image inside a WebDataset shard
ImageRef = str | TarMember  # where an image's bytes are: a file path or a tar member
_PIL_GUARD = threading.Lock()

# What transparent pixels become. One policy, WHITE, for training, indexing, search and bench; DROP is there
# to reproduce numbers of the open_clip world (`bench --transparency drop`, which records it in the result):
WHITE = "white"  # composited on white, as a viewer shows the image on a page
DROP = "drop"  # alpha dropped as open_clip's transform (and so CLIP_benchmark) drops it: the image stays RGBA
#                and the transform's own convert("RGB") drops alpha after its alpha-weighted resize, which
#                leaves transparent areas black (and, where nothing is resized, whatever colour lies under them)
TRANSPARENCY = (WHITE, DROP)


@dataclass(frozen=True)
class Decoded:
    image: Image.Image  # RGB (RGBA with transparency under DROP), EXIF orientation applied, maybe draft-reduced
    width: int  # size of the full image as the viewer sees it (after EXIF rotation, before draft)
    height: int


@dataclass(frozen=True)
class Skipped:
    reason: str


def _megapixels(n: int) -> str:
    return f"{n / 1e6:.0f} MP" if n >= 10**7 else f"{n / 1e6:.1f} MP"


def _oriented_size(img: Image.Image, size: tuple[int, int]) -> tuple[int, int]:
    """`size` as the viewer sees it: EXIF orientations 5-8 swap width and height."""
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # a broken EXIF block must not cost us the image
        orientation = 1
    return (size[1], size[0]) if orientation in (5, 6, 7, 8) else size


def _high_bit_depth_to_l(img: Image.Image) -> Image.Image:
    """16-bit or float greyscale -> 8-bit. PIL's own conversion clips at 255, turning photos white."""
    arr = np.asarray(img)
    if img.mode == "F":
        arr = np.nan_to_num(arr.astype(np.float32))
        hi = float(arr.max()) if arr.size else 1.0
        arr = arr * 255.0 if hi <= 1.0 else arr / max(hi, 1e-12) * 255.0
    elif img.mode.startswith("I;16") or (img.mode == "I" and arr.size and arr.max() > 255):
        arr = arr.astype(np.float32) / 257.0
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")


def to_rgb(img: Image.Image, transparency: str = WHITE) -> Image.Image:
    """Any PIL mode -> RGB, transparent areas as `transparency` says; under DROP an image with
    transparency comes back RGBA, for the transform to drop (see TRANSPARENCY)."""
    if img.mode == "RGB" and "transparency" not in img.info:
        return img
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        img = _high_bit_depth_to_l(img)
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        img.mode in ("P", "L", "RGB") and "transparency" in img.info
    )
    if not has_alpha:
        return img.convert("RGB")
    rgba = img.convert("RGBA")  # (P -> RGB directly would warn about byte transparency on every such file)
    if transparency == DROP:
        return rgba
    canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    canvas.alpha_composite(rgba)
    return canvas.convert("RGB")


def read_file(path: str | os.PathLike, max_bytes: int = MAX_FILE_BYTES) -> bytes | Skipped:
    """A file's bytes, or why they cannot be had. Read once: the caller hashes and decodes the same bytes."""
    try:
        size = os.path.getsize(path)
        if size > max_bytes:
            return Skipped(f"file too large ({size / 2**30:.1f} GiB)")
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return Skipped("file disappeared before it could be read")
    except IsADirectoryError:
        return Skipped("is a directory")
    except OSError as e:
        return Skipped(f"cannot read file: {e.strerror or e}")


def content_hash(data: bytes) -> str:
    """A file's content identity: the index keys vectors by it, so a moved, copied or uploaded image that is
    already indexed needs no decoding."""
    return hashlib.sha256(data).hexdigest()


def describe_ref(ref: ImageRef) -> str:
    return ref if isinstance(ref, str) else f"{ref[0]}@{ref[1]}"


def read_image_bytes(ref: ImageRef) -> bytes | Skipped:
    """The bytes of a file or of a tar member (read by offset: shards get random access like folders)."""
    if isinstance(ref, str):
        return read_file(ref)
    shard, offset, size = ref
    try:
        with open(shard, "rb") as f:
            f.seek(offset)
            return f.read(size)
    except OSError as e:
        return Skipped(f"cannot read shard: {e.strerror or e}")


def _open_unguarded(fp: IO[bytes]) -> Image.Image:
    """Image.open without PIL's decompression-bomb check: our cap, applied after draft, decides.

    PIL's check counts header pixels, so it would refuse a 200 MP JPEG that draft decodes at 3 MP.
    The limit is a PIL global, so it is lifted only for the header parse, under a lock.
    """
    with _PIL_GUARD, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            return Image.open(fp)
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def open_image(
    source: str | os.PathLike | bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_size: int | None = 224,
    transparency: str = WHITE,
) -> Decoded | Skipped:
    """Decode an image file (or its bytes) to RGB, or return why it was skipped.

    `draft_size`: decode JPEGs at the smallest libjpeg scale (1/2, 1/4, 1/8) that keeps both sides at
    least this many pixels; None decodes at full size, for exact reproduction.
    `max_pixels`: skip images that would need more pixels than this decoded (checked from the header).
    `transparency`: WHITE or DROP (see TRANSPARENCY).
    """
    data = source if isinstance(source, (bytes, bytearray, memoryview)) else read_file(source)
    if isinstance(data, Skipped):
        return data
    if len(data) == 0:
        return Skipped("empty file")
    with io.BytesIO(data) as fp:
        try:
            img = _open_unguarded(fp)
            full_size = img.size
            if draft_size and img.format == "JPEG":
                img.draft("RGB", (draft_size, draft_size))
            decoded_pixels = img.size[0] * img.size[1]
            if decoded_pixels > max_pixels:
                return Skipped(f"too large to decode safely: {full_size[0]}x{full_size[1]} "
                               f"({_megapixels(decoded_pixels)} > {_megapixels(max_pixels)} cap, --max-pixels)")
            width, height = _oriented_size(img, full_size)
            img.load()  # decodes the first frame of animated images
            img = ImageOps.exif_transpose(img) or img
            rgb = to_rgb(img, transparency)
        except UnidentifiedImageError:
            return Skipped("not a recognised image format")
        except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, struct.error) as e:
            message = str(e).splitlines()[0] if str(e) else type(e).__name__
            return Skipped(f"corrupt or truncated image ({message})")
        except MemoryError:
            return Skipped("not enough memory to decode")
    return Decoded(rgb, width, height)
