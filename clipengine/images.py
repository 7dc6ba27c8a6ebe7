"""Open one image safely, or say in a few words why it was skipped.

Real photo folders hold 12+ megapixel JPEGs, PNGs of hundreds of megapixels, CMYK and 16-bit files,
palette images with transparency, animated GIFs, EXIF-rotated photos, and files that are truncated,
empty or not images at all. Nothing here raises on a bad file: `open_image` returns `Decoded` or
`Skipped`, so one bad file can never stop an indexing run.

Two choices keep decoding cheap and bounded: the pixel count is read from the header and checked
against a cap *before* any pixel is decoded, and a JPEG much larger than the model input is decoded at
a reduced size by libjpeg's DCT scaling (`Image.draft`), which is several times faster and is what
makes large photos affordable. Both happen before the image is ever held in memory at full size.

Phone and camera formats go through maintained decoders, each loaded the first time a file needs it (a
JPEG pays nothing): HEIC/HEIF through pillow-heif (its primary image, rotated as stored, 10/12-bit brought
to 8), AVIF through Pillow's own decoder, JPEG XL through pillow-jxl-plugin, all recognised by their
content whatever the file is called; camera RAW through LibRaw (rawpy), from the embedded JPEG preview
when it is at least the model's input size, else demosaiced at half size. A missing decoder skips the
file with the command that installs it.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import os
import struct
import threading
import warnings
from dataclasses import dataclass
from typing import IO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError, features

from clipengine.formats import RAW_EXTENSIONS
from clipengine.metadata import NO_METADATA, MediaInfo, from_exif
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
    metadata: MediaInfo = NO_METADATA  # when, with what and where, from its EXIF (clipengine.metadata)


@dataclass(frozen=True)
class Skipped:
    reason: str


def megapixels(n: int) -> str:
    """A pixel count as people say it: '24 MP', '2.1 MP'."""
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


def header_metadata(path: str | os.PathLike) -> MediaInfo:
    """An image file's EXIF, read from its header alone (nothing is decoded); a camera RAW file's from its
    embedded preview, where it has one."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            if os.path.splitext(path)[1].lower() in RAW_EXTENSIONS:
                rawpy = _rawpy()
                if rawpy is None:
                    return NO_METADATA
                f.seek(0)
                with rawpy.imread(f) as raw:
                    thumb = raw.extract_thumb()
                if thumb.format != rawpy.ThumbFormat.JPEG:
                    return NO_METADATA
                with Image.open(io.BytesIO(bytes(thumb.data))) as preview:
                    return _metadata(preview)
            kind = sniff(head)
            if kind and _load_decoder(kind):
                return NO_METADATA
            f.seek(0)
            with _open_unguarded(f) as img:
                if img.format == "PNG" and "exif" not in img.info:  # past the pixels, if anywhere: not read here
                    return NO_METADATA
                return _metadata(img)
    except Exception:  # unreadable, not an image, no preview: nothing is known
        return NO_METADATA


def _metadata(img: Image.Image) -> MediaInfo:
    try:
        return from_exif(img.getexif())
    except Exception:  # a damaged EXIF block costs the metadata, never the image
        return NO_METADATA


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


def file_content_hash(path: str | os.PathLike) -> str | Skipped:
    """`content_hash` of a file too large to hold (a video), read in pieces: the same digest as of its bytes."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    except FileNotFoundError:
        return Skipped("file disappeared before it could be read")
    except OSError as e:
        return Skipped(f"cannot read file: {e.strerror or e}")
    return digest.hexdigest()


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


# decoders beyond Pillow's own: (module, what installs it, what it reads)
_PLUGINS = {"HEIF": ("pillow_heif", "pillow-heif", "HEIC/HEIF"), "JXL": ("pillow_jxl", "pillow-jxl-plugin", "JPEG XL"),
            "AVIF": ("pillow_avif", "pillow-avif-plugin", "AVIF")}
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"}
_ready: set[str] = set()


def sniff(data: bytes) -> str | None:
    """The format a file's first bytes announce, among those Pillow may need a plugin for: HEIF, AVIF, JXL."""
    if data[4:8] == b"ftyp":
        box = min(int.from_bytes(data[:4], "big"), 64)
        brands = [data[8:12], *(data[i:i + 4] for i in range(16, box, 4))]
        if brands[0] in (b"avif", b"avis"):
            return "AVIF"
        if _HEIF_BRANDS & set(brands):
            return "HEIF"
        if b"avif" in brands:
            return "AVIF"
    if data[:2] == b"\xff\x0a" or data[:12] == b"\x00\x00\x00\x0cJXL \r\n\x87\n":
        return "JXL"
    return None


def _load_decoder(kind: str) -> Skipped | None:
    """Make Pillow read `kind` (once per process), or say what to install."""
    if kind in _ready:
        return None
    with _PIL_GUARD:
        if kind not in _ready and not (kind == "AVIF" and features.check("avif")):  # Pillow >= 11.3 reads AVIF
            module, package, name = _PLUGINS[kind]
            try:
                plugin = importlib.import_module(module)
            except ImportError:
                return Skipped(f"{name} needs its decoder: pip install {package}")
            if kind == "HEIF":
                plugin.register_heif_opener()
        _ready.add(kind)
    return None


def open_image(
    source: str | os.PathLike | bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_size: int | None = 224,
    transparency: str = WHITE,
    name: str | None = None,
) -> Decoded | Skipped:
    """Decode an image file (or its bytes) to RGB, or return why it was skipped.

    `draft_size`: decode JPEGs at the smallest libjpeg scale (1/2, 1/4, 1/8) that keeps both sides at
    least this many pixels (a RAW file's preview must be that large); None decodes at full size, for
    exact reproduction.
    `max_pixels`: skip images that would need more pixels than this decoded (checked from the header).
    `transparency`: WHITE or DROP (see TRANSPARENCY).
    `name`: the file name of `source` given as bytes (an upload), whose extension tells a RAW file.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        data: bytes | Skipped = bytes(source)
    else:
        data, name = read_file(source), os.fspath(source)
    if isinstance(data, Skipped):
        return data
    if len(data) == 0:
        return Skipped("empty file")
    if os.path.splitext(str(name or ""))[1].lower() in RAW_EXTENSIONS:
        return _open_raw(data, max_pixels=max_pixels, draft_size=draft_size, transparency=transparency)
    kind = sniff(data[:64])
    missing = _load_decoder(kind) if kind else None
    if missing:
        return missing
    with io.BytesIO(data) as fp:
        try:
            img = _open_unguarded(fp)
            full_size = img.size
            if draft_size and img.format == "JPEG":
                img.draft("RGB", (draft_size, draft_size))
            decoded_pixels = img.size[0] * img.size[1]
            if decoded_pixels > max_pixels:
                return Skipped(f"too large to decode safely: {full_size[0]}x{full_size[1]} "
                               f"({megapixels(decoded_pixels)} > {megapixels(max_pixels)} cap, --max-pixels)")
            width, height = _oriented_size(img, full_size)
            img.load()  # decodes the first frame of animated images
            metadata = _metadata(img)  # after the cap: a PNG's EXIF may follow its pixels, and reading it decodes them
            img = ImageOps.exif_transpose(img) or img
            rgb = to_rgb(img, transparency)
        except UnidentifiedImageError:
            return Skipped("not a recognised image format")
        except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, struct.error) as e:
            message = str(e).splitlines()[0] if str(e) else type(e).__name__
            return Skipped(f"corrupt or truncated image ({message})")
        except MemoryError:
            return Skipped("not enough memory to decode")
    return Decoded(rgb, width, height, metadata)


@dataclass(frozen=True)
class JpegHeader:
    """A JPEG that can be decoded on the model's device (`clipengine.device_decode`): what its header says."""

    width: int  # as the viewer sees it (after EXIF rotation)
    height: int
    orientation: int  # EXIF orientation, 1-8
    metadata: MediaInfo


def device_jpeg_header(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> JpegHeader | None:
    """The header of a JPEG that nvJPEG decodes, read without decoding a pixel; None sends the file down the CPU
    path: not a JPEG, CMYK or YCCK (Adobe), progressive (nvJPEG's batched decoder takes baseline and extended
    sequential only), over `max_pixels` (the CPU path decodes those reduced, by DCT scaling), or a header PIL
    cannot read."""
    if data[:3] != b"\xff\xd8\xff":
        return None
    try:
        with _open_unguarded(io.BytesIO(data)) as img:
            if img.format != "JPEG" or img.mode not in ("RGB", "L") or img.info.get("progressive") \
                    or img.info.get("progression") or img.size[0] * img.size[1] > max_pixels:
                return None
            try:
                orientation = int(img.getexif().get(0x0112, 1))
            except Exception:  # a broken EXIF block: as the CPU path, upright
                orientation = 1
            width, height = _oriented_size(img, img.size)
            return JpegHeader(width, height, orientation if 1 <= orientation <= 8 else 1, _metadata(img))
    except Exception:  # the CPU path will say what is wrong with it
        return None


# LibRaw's flip: how the stored image must turn to be seen upright
_FLIP = {3: Image.Transpose.ROTATE_180, 5: Image.Transpose.ROTATE_90, 6: Image.Transpose.ROTATE_270}


def _rawpy():
    """rawpy, its OpenMP runtime (a copy of its own) started with one thread, or None if it is not installed.

    A process whose LibRaw has run its OpenMP threads deadlocks the decode workers it forks (measured: a
    demosaic in the main process, then `index_folder(workers=2)`, hung until killed). With one thread, LibRaw
    starts none, and a fork is safe; the parallelism is the workers'. The OpenMP runtime reads
    OMP_NUM_THREADS once, when loaded, so the variable is set only while rawpy is imported: torch's own
    runtime keeps its threads."""
    import sys

    with _PIL_GUARD:
        if "rawpy" in sys.modules:  # loaded already (by us, or by a caller: then with its threads)
            return sys.modules["rawpy"]
        saved = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = "1"
        try:
            import rawpy
        except ImportError:
            return None
        finally:
            if saved is None:
                del os.environ["OMP_NUM_THREADS"]
            else:
                os.environ["OMP_NUM_THREADS"] = saved
    # rawpy warns in every forked worker that OpenMP may deadlock it: with one thread it cannot, so the flag
    # that says it has already warned is set (a warning per decode worker would reach every user's terminal)
    rawpy._warned_about_multiprocessing = True
    return rawpy


def _open_raw(data: bytes, *, max_pixels: int, draft_size: int | None, transparency: str) -> Decoded | Skipped:
    """A camera RAW file: its embedded JPEG preview when both its sides are at least `draft_size` (decoding
    it costs a fraction of demosaicing), else the sensor data demosaiced by LibRaw at half size (full size
    for an exact decode), with the camera's white balance. Either way turned upright as the file says."""
    rawpy = _rawpy()
    if rawpy is None:
        return Skipped("camera RAW needs its decoder: pip install rawpy")
    try:
        with rawpy.imread(io.BytesIO(data)) as raw:
            sizes = raw.sizes
            flip = sizes.flip
            width, height = (sizes.height, sizes.width) if flip in (5, 6) else (sizes.width, sizes.height)
            preview = _raw_preview(raw, draft_size, max_pixels, transparency)
            if preview is not None:
                image, turned, metadata = preview
                if not turned and flip in _FLIP:
                    image = image.transpose(_FLIP[flip])
                return Decoded(image, width, height, metadata)
            half = draft_size is not None
            pixels = (sizes.width // 2) * (sizes.height // 2) if half else sizes.width * sizes.height
            if pixels > max_pixels:
                return Skipped(f"too large to decode safely: {width}x{height} "
                               f"({megapixels(pixels)} > {megapixels(max_pixels)} cap, --max-pixels)")
            if len(data) * 8 < sizes.raw_width * sizes.raw_height:  # under a bit a pixel: no codec packs it so
                # tightly, and LibRaw would fill the missing sensor data with whatever its buffer held
                return Skipped(f"camera RAW file cut short: {len(data):,} bytes cannot hold its {width}x{height} "
                               "sensor data")
            rgb = raw.postprocess(half_size=half, use_camera_wb=True, output_bps=8)  # turned upright by LibRaw
            if rgb.size and rgb.max() == rgb.min():
                return Skipped("camera RAW file without a picture: its sensor data is missing (cut short?)")
            return Decoded(Image.fromarray(rgb, "RGB"), width, height)
    except rawpy.LibRawFileUnsupportedError:
        return Skipped("a camera RAW format LibRaw does not read")
    except (rawpy.LibRawError, OSError, ValueError) as e:
        return Skipped(f"camera RAW file cut short or damaged (LibRaw: {type(e).__name__.removeprefix('LibRaw')})")
    except MemoryError:
        return Skipped("not enough memory to decode")


def _raw_preview(raw, draft_size: int | None, max_pixels: int,
                 transparency: str) -> tuple[Image.Image, bool, MediaInfo] | None:
    """The embedded JPEG preview, decoded, if it is large enough to stand for the photo; whether its own
    EXIF already turned it upright; and what its EXIF says."""
    import rawpy

    if draft_size is None:
        return None
    try:
        thumb = raw.extract_thumb()
    except (rawpy.LibRawNoThumbnailError, rawpy.LibRawUnsupportedThumbnailError):
        return None
    if thumb.format != rawpy.ThumbFormat.JPEG:
        return None
    decoded = open_image(bytes(thumb.data), max_pixels=max_pixels, draft_size=draft_size, transparency=transparency)
    if not isinstance(decoded, Decoded) or min(decoded.width, decoded.height) < draft_size:
        return None
    with Image.open(io.BytesIO(thumb.data)) as header:
        turned = header.getexif().get(0x0112, 1) != 1
    return decoded.image, turned, decoded.metadata
