"""The formats of a phone or camera library, each made by its decoder's own encoder: HEIC (pillow-heif),
AVIF (Pillow), JPEG XL (pillow-jxl-plugin) and DNG camera RAW (PiDNG, read back by LibRaw). Each decodes
upright and in the right colours, is recognised by its content whatever its name, and a damaged, oversized
or undecodable one is skipped with a reason, never a traceback or a hang."""

from __future__ import annotations

import io
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from synthetic import write_dng, write_video

from clipengine import images
from clipengine.formats import RAW_EXTENSIONS
from clipengine.images import Decoded, Skipped, open_image


def two_colours(width: int = 40, height: int = 60) -> Image.Image:
    """Top half red, bottom half blue: which way up it is can be read from two pixels."""
    a = np.zeros((height, width, 3), np.uint8)
    a[: height // 2, :, 0] = 255
    a[height // 2:, :, 2] = 255
    return Image.fromarray(a)


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    if fmt == "HEIF":
        import pillow_heif

        pillow_heif.register_heif_opener()
    if fmt == "JXL":
        import pillow_jxl  # noqa: F401  (registers the encoder)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def colour_at(decoded: Decoded, x: float, y: float) -> tuple[int, ...]:
    image = decoded.image
    pixel = image.getpixel((int(x * (image.width - 1)), int(y * (image.height - 1))))
    assert isinstance(pixel, tuple)
    return pixel


@pytest.mark.parametrize("fmt,name", [("HEIF", "IMG_0001.HEIC"), ("AVIF", "green.avif"), ("JXL", "photo.jxl")])
def test_each_format_decodes_in_its_colours_and_by_its_content(tmp_path, fmt, name):
    data = encoded(two_colours(), fmt, quality=90)
    (tmp_path / name).write_bytes(data)
    (tmp_path / "renamed.jpg").write_bytes(data)  # a phone photo with the wrong extension
    for path in (tmp_path / name, tmp_path / "renamed.jpg"):
        decoded = open_image(path, draft_size=None)
        assert isinstance(decoded, Decoded), decoded
        assert (decoded.width, decoded.height) == (40, 60) and decoded.image.mode == "RGB"
        top, bottom = colour_at(decoded, 0.5, 0.1), colour_at(decoded, 0.5, 0.9)
        assert top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0], (fmt, top, bottom)
    assert images.sniff(data[:64]) == fmt


def test_a_rotated_heic_is_upright_and_reports_its_upright_size(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: turn 90 degrees clockwise to view
    (tmp_path / "turned.heic").write_bytes(encoded(two_colours(), "HEIF", quality=90, exif=exif.tobytes()))
    decoded = open_image(tmp_path / "turned.heic", draft_size=None)
    assert (decoded.width, decoded.height) == decoded.image.size == (60, 40)
    left, right = colour_at(decoded, 0.1, 0.5), colour_at(decoded, 0.9, 0.5)
    assert left[2] > 200 and right[0] > 200  # the red top is now on the right, as a viewer shows it


def test_a_10_bit_heic_is_brought_to_8_bits_not_clipped(tmp_path):
    import pillow_heif

    grey = np.full((48, 64, 3), 512 << 6, np.uint16)  # mid-grey in 10 bits, stored in the high bits of 16
    heif = pillow_heif.from_bytes(mode="RGB;16", size=(64, 48), data=grey.tobytes())
    buffer = io.BytesIO()
    heif.save(buffer, quality=95)
    assert pillow_heif.open_heif(io.BytesIO(buffer.getvalue())).info["bit_depth"] == 10
    decoded = open_image(buffer.getvalue(), draft_size=None)
    assert decoded.image.mode == "RGB" and all(115 < c < 140 for c in colour_at(decoded, 0.5, 0.5))


def test_a_heic_with_several_images_gives_its_primary_one(tmp_path):
    import pillow_heif

    heif = pillow_heif.HeifFile()
    heif.add_from_pillow(Image.new("RGB", (32, 32), (255, 0, 0)))
    heif.add_from_pillow(Image.new("RGB", (48, 24), (0, 0, 255)))
    buffer = io.BytesIO()
    heif.save(buffer, quality=90, primary_index=1)
    decoded = open_image(buffer.getvalue(), draft_size=None)
    assert (decoded.width, decoded.height) == (48, 24) and colour_at(decoded, 0.5, 0.5)[2] > 200


def test_damaged_and_oversized_heic_are_skipped_with_a_reason_at_once(tmp_path):
    data = encoded(Image.fromarray((np.random.default_rng(0).random((300, 400, 3)) * 255).astype(np.uint8)),
                   "HEIF", quality=80)
    assert "corrupt or truncated" in open_image(data[: len(data) // 2]).reason
    at = data.index(b"ispe") + 8  # the header's image size: width and height, 4 bytes each
    huge = data[:at] + (60_000).to_bytes(4, "big") * 2 + data[at + 8:]
    started = time.monotonic()
    result = open_image(huge)
    assert isinstance(result, Skipped) and "too large to decode safely: 60000x60000" in result.reason
    assert time.monotonic() - started < 5  # refused from the header, nothing decoded


def test_a_missing_decoder_is_a_skip_that_names_the_fix(tmp_path, monkeypatch):
    data = encoded(two_colours(), "HEIF", quality=90)
    monkeypatch.setitem(sys.modules, "pillow_heif", None)  # as on a machine without it
    monkeypatch.setattr(images, "_ready", set())
    monkeypatch.setattr(Image, "OPEN", {k: v for k, v in Image.OPEN.items() if k != "HEIF"})
    result = open_image(data)
    assert result == Skipped("HEIC/HEIF needs its decoder: pip install pillow-heif")


# ---- camera RAW ----------------------------------------------------------------------------------


def test_a_raw_file_without_a_preview_is_demosaiced_upright(tmp_path):
    write_dng(tmp_path / "DSC_0001.dng")
    decoded = open_image(tmp_path / "DSC_0001.dng", draft_size=64)
    assert isinstance(decoded, Decoded), decoded
    assert (decoded.width, decoded.height) == (256, 192) and decoded.image.size == (128, 96)  # half size
    top, bottom = colour_at(decoded, 0.5, 0.2), colour_at(decoded, 0.5, 0.8)
    assert top[0] > top[2] + 50 and bottom[2] > bottom[0] + 50, (top, bottom)
    write_dng(tmp_path / "turned.dng", orientation=6)  # shot holding the camera on its side
    decoded = open_image(tmp_path / "turned.dng", draft_size=64)
    assert (decoded.width, decoded.height) == (192, 256) and decoded.image.size == (96, 128)
    assert open_image(tmp_path / "DSC_0001.dng", max_pixels=1000).reason.startswith("too large to decode safely")


class _WithPreview:
    """A LibRaw file whose embedded preview is `jpeg` (rawpy's own class cannot be patched)."""

    def __init__(self, raw, jpeg: bytes):
        self._raw, self._jpeg = raw, jpeg

    def __getattr__(self, name):
        return getattr(self._raw, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._raw.close()

    def extract_thumb(self):
        import rawpy

        return type("Thumb", (), {"format": rawpy.ThumbFormat.JPEG, "data": self._jpeg})()


def with_preview(monkeypatch, jpeg: bytes) -> None:
    import rawpy

    real = rawpy.imread
    monkeypatch.setattr(rawpy, "imread", lambda source: _WithPreview(real(source), jpeg))


def test_a_raw_files_embedded_preview_is_used_when_it_is_large_enough(tmp_path, monkeypatch):
    """LibRaw extracts the preview; what is ours is the choice: the preview when both its sides reach the model's
    input size (turned as the RAW file says unless its own EXIF turned it), else demosaicing."""
    write_dng(tmp_path / "turned.dng", orientation=6)
    green = encoded(Image.new("RGB", (320, 240), (0, 200, 0)), "JPEG")
    with_preview(monkeypatch, green)
    decoded = open_image(tmp_path / "turned.dng", draft_size=224)
    assert decoded.image.size == (240, 320) and colour_at(decoded, 0.5, 0.5)[1] > 150  # the preview, upright
    assert (decoded.width, decoded.height) == (192, 256)  # the photo's own size
    small = open_image(tmp_path / "turned.dng", draft_size=512)  # a preview smaller than the model wants
    assert small.image.size == (96, 128) and colour_at(small, 0.5, 0.5)[1] < 150  # demosaiced instead
    exif = Image.Exif()
    exif[0x0112] = 6
    turned_jpeg = encoded(Image.new("RGB", (320, 240), (0, 200, 0)), "JPEG", exif=exif.tobytes())
    monkeypatch.undo()
    with_preview(monkeypatch, turned_jpeg)
    assert open_image(tmp_path / "turned.dng", draft_size=224).image.size == (240, 320)  # turned once, not twice


def test_a_damaged_raw_file_is_skipped_with_a_reason(tmp_path):
    write_dng(tmp_path / "DSC_0002.nef")
    data = (tmp_path / "DSC_0002.nef").read_bytes()
    (tmp_path / "cut.nef").write_bytes(data[:200])
    (tmp_path / "noise.cr2").write_bytes(np.random.default_rng(1).bytes(5000))
    for name in ("cut.nef", "noise.cr2"):
        result = open_image(tmp_path / name)
        assert isinstance(result, Skipped) and "RAW" in result.reason, (name, result)


CAMERA_RAW = Path(__file__).resolve().parent.parent / "data" / "camera-raw"


def test_real_camera_files_cut_short_are_read_by_their_headers_and_never_crash():
    """ExifTool's test images (Debian's source package of ExifTool, fetched by `make test`, scripts/camera_raw.py):
    one real file per camera maker, with its pixel data cut away. Each is skipped with a reason, the ones LibRaw
    reads naming their camera's size from the header; none is indexed as a picture of garbage, none raises."""
    if not (CAMERA_RAW / "Nikon.nef").is_file():
        pytest.fail(f"{CAMERA_RAW} is missing: `make test` fetches it (python scripts/camera_raw.py)")
    results = {p.name: open_image(p) for p in sorted(CAMERA_RAW.iterdir()) if p.suffix.lower() in RAW_EXTENSIONS}
    assert len(results) == 11
    assert not [name for name, r in results.items() if isinstance(r, Decoded)]
    skipped = {name: r.reason for name, r in results.items() if isinstance(r, Skipped)}
    assert skipped.pop("CanonRaw.cr2") == "a camera RAW format LibRaw does not read"  # an early EOS's
    sensors = {"CanonRaw.cr3": "6024x4020", "CanonRaw.crw": "3088x2056", "DNG.dng": "3474x2314",
               "FujiFilm.raf": "3552x3551", "Minolta.mrw": "3272x2456", "Nikon.nef": "3039x2014",
               "Panasonic.rw2": "3664x2754", "PhaseOne.iiq": "7320x5484", "Sigma.x3f": "1510x2266",
               "SigmaDP2.x3f": "2651x1767"}  # each camera's sensor, as LibRaw reads it from the real header
    for name, reason in skipped.items():
        size = (CAMERA_RAW / name).stat().st_size
        assert reason == f"camera RAW file cut short: {size:,} bytes cannot hold its {sensors[name]} sensor data"


# ---- the same everywhere: indexing, searching, thumbnails, uploads ----------------------------------------


@pytest.mark.slow
def test_a_phone_and_camera_folder_indexes_completely_and_searches(tmp_path, tiny_model):
    from fastapi.testclient import TestClient

    from clipengine.index.info import index_info
    from clipengine.index.pipeline import index_folder
    from clipengine.index.search import Searcher
    from clipengine.scenes import photo_like
    from clipengine.serve.app import create_app
    from clipengine.serve.state import ServiceConfig

    folder = tmp_path / "Phone"
    folder.mkdir()
    for i, (fmt, name) in enumerate([("JPEG", "IMG_0001.JPG"), ("HEIF", "IMG_0002.HEIC"), ("AVIF", "PXL_0003.avif"),
                                     ("JXL", "photo_0004.jxl"), ("HEIF", "IMG_0005.jpg")]):  # the last one misnamed
        (folder / name).write_bytes(encoded(photo_like(320, 240, seed=i), fmt, quality=90))
    write_dng(folder / "DSC_0006.NEF")
    write_video(folder / "VID_0007.MOV", [(2, None), (3, (200, 30, 30))])
    (folder / "IMG_0002.AAE").write_text("<plist/>")
    (folder / "broken.heic").write_bytes(encoded(photo_like(320, 240, seed=9), "HEIF", quality=90)[:300])
    report = index_folder(folder, tmp_path / "idx", model=tiny_model, workers=0)
    assert report.count == 7 and report.embedded == 7 and report.videos == 1, report.skips
    assert report.formats == {"HEIC": 1, "JPG": 2, "AVIF": 1, "JXL": 1, "MOV": 1, "NEF": 1}
    assert [s["path"] for s in report.skips] == [str(folder / "broken.heic")]
    assert report.not_indexed == {".aae": 1} and index_info(tmp_path / "idx").not_indexed == {".aae": 1}
    with Searcher(tmp_path / "idx") as searcher:
        for name in ("IMG_0002.HEIC", "PXL_0003.avif", "photo_0004.jxl", "DSC_0006.NEF", "IMG_0005.jpg"):
            assert searcher.search_image(folder / name, 1)[0].path == str(folder / name)  # its own stored vector
        heic = searcher.search_image(folder / "IMG_0002.HEIC", 1)[0]
    with TestClient(create_app(ServiceConfig({"phone": tmp_path / "idx"}))) as client:
        thumbnail = client.get(f"/api/thumbnail/{heic.id}", params={"size": 128})
        assert thumbnail.status_code == 200 and Image.open(io.BytesIO(thumbnail.content)).format == "JPEG"
        ids = {Path(h["path"]).name: h["id"] for h in client.get("/api/search", params={"q": "a photo", "k": 10}).json()}
        view = client.get(f"/api/view/{ids['IMG_0002.HEIC']}")  # browsers cannot show HEIC: a JPEG rendering
        assert view.status_code == 200 and Image.open(io.BytesIO(view.content)).format == "JPEG"
        assert Image.open(io.BytesIO(view.content)).size == (320, 240)
        original = client.get(f"/api/file/{ids['IMG_0002.HEIC']}")
        assert original.content == (folder / "IMG_0002.HEIC").read_bytes()  # the original stays downloadable
        as_is = client.get(f"/api/view/{ids['IMG_0001.JPG']}")
        assert as_is.content == (folder / "IMG_0001.JPG").read_bytes()  # a JPEG is shown as it is
        raw = (folder / "DSC_0006.NEF").read_bytes()
        changed = raw[:-1] + bytes([raw[-1] ^ 1])  # not the indexed bytes: decoded, as a RAW file by its name
        hits = client.post("/api/search/image", files={"file": ("DSC_0006.NEF", changed, "image/x-nikon-nef")}).json()
        assert hits[0]["path"] == str(folder / "DSC_0006.NEF") and hits[0]["score"] > 0.99


def test_an_image_a_search_sends_to_a_running_service_carries_its_name(tmp_path, monkeypatch):
    """The service tells a camera RAW upload by its name: `clipengine search --image DSC_0006.NEF` through a
    running service sends the file's own name (quoted for the header), not a placeholder."""
    from clipengine.index import service

    sent: list[bytes] = []

    def request(url, path, token, data=None, content_type=None) -> list:
        sent.append(data)
        return []

    monkeypatch.setattr(service, "_request", request)
    (tmp_path / "DSC 0006.NEF").write_bytes(b"raw bytes")
    assert service.search(service.Service("http://127.0.0.1:1", None, "phone"), image=tmp_path / "DSC 0006.NEF") == []
    assert b'filename="DSC%200006.NEF"' in sent[0] and b"raw bytes" in sent[0]


FORKED_AFTER_A_DEMOSAIC = """
import sys
from pathlib import Path
from clipengine.images import Decoded, open_image
from clipengine.index.pipeline import index_folder
from clipengine.models import ModelSpec
assert isinstance(open_image(Path(sys.argv[1]) / "0.dng", draft_size=None), Decoded)  # LibRaw runs in this process
report = index_folder(sys.argv[1], sys.argv[2], ModelSpec(arch="tiny"), workers=2, exact_decode=True, export=False)
assert report.embedded == 6, report.skips
import torch
print(torch.get_num_threads())
"""


def test_decode_workers_forked_after_a_raw_decode_do_not_deadlock(tmp_path):
    """LibRaw's OpenMP threads, once started in a process, deadlock the workers it forks (this run hung until
    killed before rawpy was loaded with one thread): the parent decodes a DNG, then indexes with 2 workers."""
    import os
    import subprocess
    import sys

    from synthetic import write_dng_of

    from clipengine.scenes import photo_like

    folder = tmp_path / "raw"
    folder.mkdir()
    for i in range(6):
        write_dng_of(photo_like(256, 192, seed=i), folder / f"{i}.dng")
    done = subprocess.run([sys.executable, "-c", FORKED_AFTER_A_DEMOSAIC, str(folder), str(tmp_path / "idx")],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout.split()[-1]) == len(os.sched_getaffinity(0))  # torch keeps its threads
    assert "rawpy is being used in a process created by multiprocessing" not in done.stderr
