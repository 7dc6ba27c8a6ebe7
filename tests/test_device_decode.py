"""JPEGs decoded on the model's device (clipengine.device_decode), run here on the CPU through torchvision's
decoder: the same path as nvJPEG's but for the decoder itself. What takes the device path, EXIF orientation,
the fallback to the CPU, and agreement with the CPU path."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CliRunner
from PIL import Image, ImageOps
from synthetic import write_photo_folder

from clipengine import device_decode
from clipengine.cli import app
from clipengine.device_decode import DevicePreprocess, upright
from clipengine.embed import embed_images, split_transform
from clipengine.errors import BadInput
from clipengine.images import device_jpeg_header
from clipengine.index.pipeline import IndexOptions

# the tiny model on photo-like JPEGs: the device path decodes at full size and resamples
# with torch, the CPU path decodes DCT-scaled and resamples with PIL
MIN_COSINE = 0.9995  # measured: 0.99998 at least, on photo-like JPEGs of 320x240 to 1600x1200


def _jpeg(image: Image.Image, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", **save)
    return buffer.getvalue()


def _asymmetric() -> Image.Image:
    pixels = np.zeros((30, 50, 3), dtype=np.uint8)
    pixels[:10, :20] = (255, 0, 0)
    pixels[20:, 35:] = (0, 0, 255)
    return Image.fromarray(pixels)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_upright_turns_as_pil_turns_by_exif(orientation):
    image = _asymmetric()
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _jpeg(image, exif=exif, quality=100)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))))
    stored = torch.from_numpy(np.array(Image.open(io.BytesIO(data)).convert("RGB"))).permute(2, 0, 1)
    turned = upright(stored, device_jpeg_header(data).orientation).permute(1, 2, 0).numpy()
    assert turned.shape == expected.shape and np.array_equal(turned, expected)


def test_which_jpegs_the_device_takes():
    photo = _asymmetric()
    assert device_jpeg_header(_jpeg(photo)) is not None
    assert device_jpeg_header(_jpeg(photo.convert("L"))) is not None
    assert device_jpeg_header(_jpeg(photo.convert("CMYK"))) is None  # Adobe CMYK: the CPU path
    assert device_jpeg_header(_jpeg(photo, progressive=True)) is None
    assert device_jpeg_header(_jpeg(photo), max_pixels=1000) is None  # the CPU path decodes it reduced
    png = io.BytesIO()
    photo.save(png, "PNG")
    assert device_jpeg_header(png.getvalue()) is None and device_jpeg_header(b"\xff\xd8\xff garbage") is None
    exif = Image.Exif()
    exif[0x0112] = 6
    header = device_jpeg_header(_jpeg(photo, exif=exif))
    assert header is not None and (header.width, header.height, header.orientation) == (30, 50, 6)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("device")
    paths = [str(p) for p in write_photo_folder(folder, 14, size=(320, 240))]
    photo = Image.open(paths[0]).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 8
    extra = {"rotated.jpg": _jpeg(photo, exif=exif), "cmyk.jpg": _jpeg(photo.convert("CMYK")),
             "progressive.jpg": _jpeg(photo, progressive=True), "grey.jpg": _jpeg(photo.convert("L"))}
    png = io.BytesIO()
    photo.save(png, "PNG")
    extra["photo.png"] = png.getvalue()
    extra["cut.jpg"] = Path(paths[1]).read_bytes()[:3000]  # the headers and a few rows
    for name, data in extra.items():
        (folder / name).write_bytes(data)
        paths.append(str(folder / name))
    return paths


def _embedded(model, paths, decode: str) -> dict:
    return {e.path: e for batch in embed_images(model, paths, batch_size=8, workers=0, decode=decode) for e in batch}


def test_device_decoding_agrees_with_the_cpu_path(tiny_model, files, monkeypatch):
    calls: list[int] = []
    decode = DevicePreprocess.decode

    def counted(self, jpegs):
        calls.append(len(jpegs))
        return decode(self, jpegs)

    monkeypatch.setattr(DevicePreprocess, "decode", counted)
    on_device, on_cpu = _embedded(tiny_model, files, "gpu"), _embedded(tiny_model, files, "cpu")
    assert sum(calls) == 17  # 14 photos, rotated, grey, and the cut one; not the CMYK, progressive or PNG
    assert {p: e.skip_reason is not None for p, e in on_device.items()} == \
        {p: e.skip_reason is not None for p, e in on_cpu.items()}
    assert on_device[files[-1]].skip_reason and "truncated" in on_device[files[-1]].skip_reason  # device, then CPU
    kept = [p for p in files if on_cpu[p].vector is not None]
    a = np.stack([on_device[p].vector for p in kept])
    b = np.stack([on_cpu[p].vector for p in kept])
    assert (a * b).sum(1).min() >= MIN_COSINE
    assert [(on_device[p].width, on_device[p].height) for p in kept] == [(on_cpu[p].width, on_cpu[p].height) for p in kept]
    # the same ten nearest images for every image, the copies of the first photo (rotated, grey, CMYK,
    # progressive, PNG) counted as one picture: their order among themselves is a near tie
    same = {kept.index(p): 0 for p in kept if Path(p).stem in ("rotated", "grey", "cmyk", "progressive", "photo")}
    top = [[{same.get(int(j), int(j)) for j in row[:10]} for row in np.argsort(-(m @ m.T), axis=1)] for m in (a, b)]
    assert top[0] == top[1]


def test_a_jpeg_the_device_fails_on_is_decoded_on_the_cpu(tiny_model, files, monkeypatch):
    real = device_decode.decode_jpeg

    def failing(data, **kw):
        if isinstance(data, list):
            raise RuntimeError("one of them failed")
        if len(data) == Path(files[3]).stat().st_size:
            raise RuntimeError("nvjpeg could not decode it")
        return real(data, **kw)

    monkeypatch.setattr(device_decode, "decode_jpeg", failing)
    on_device = _embedded(tiny_model, files[:6], "gpu")
    monkeypatch.undo()
    on_cpu = _embedded(tiny_model, files[:6], "cpu")
    assert np.allclose(on_device[files[3]].vector, on_cpu[files[3]].vector, atol=1e-6)  # the CPU path's pixels
    assert all(on_device[p].vector is not None for p in files[:6])


def test_decode_choices_are_checked(tmp_path):
    with pytest.raises(BadInput, match="--decode is one of auto, gpu, cpu"):
        IndexOptions(decode="nvjpeg")
    write_photo_folder(tmp_path / "photos", 2, size=(64, 48))
    result = CliRunner().invoke(app, ["index", str(tmp_path / "photos"), "--index", str(tmp_path / "i"),
                                      "--model", "tiny", "--decode", "gpu", "--runtime", "torch"])
    assert result.exit_code == 1 and "--decode gpu decodes JPEGs with nvJPEG on a CUDA device" in result.output


def test_the_device_reproduces_resize_and_crop_only(tiny_model):
    pixel_transform, _ = split_transform(tiny_model.image_transform())
    preprocess = DevicePreprocess.of(pixel_transform, torch.device("cpu"))
    assert preprocess is not None and preprocess.resize == 64 and preprocess.crop == (64, 64)
    squash = split_transform(tiny_model.image_transform(train=True))[0]  # a random crop: not reproducible there
    assert DevicePreprocess.of(squash, torch.device("cpu")) is None
