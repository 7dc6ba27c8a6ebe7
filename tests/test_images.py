"""Safe decoding: every awkward file either decodes to a correct RGB image or is skipped with a reason."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import jpeg_bytes, png_16bit_rgb, png_claiming_size, write_bad_inputs
from PIL import Image

from clipengine.errors import BadInput
from clipengine.images import Decoded, Skipped, open_image, to_rgb
from clipengine.scenes import photo_like
from clipengine.sizes import parse_size


def pixel(result, xy):
    assert isinstance(result, Decoded), result
    assert result.image.mode == "RGB"
    return result.image.getpixel(xy)


def test_every_bad_input_is_decoded_or_skipped_without_raising(tmp_path):
    expected = write_bad_inputs(tmp_path / "bad")
    for name, outcome in expected.items():
        if "link" in outcome or "loop" in outcome:
            continue  # links are the scanner's business; see test_scan
        result = open_image(tmp_path / "bad" / name)
        if outcome == "ok":
            assert isinstance(result, Decoded), (name, result)
        else:
            assert isinstance(result, Skipped) and outcome in result.reason, (name, result)


def test_huge_header_is_refused_before_decoding(tmp_path, monkeypatch):
    from PIL import ImageFile

    path = tmp_path / "bomb.png"
    path.write_bytes(png_claiming_size(100_000, 100_000))
    loads: list[object] = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self))
    result = open_image(path)
    assert isinstance(result, Skipped)
    assert "100000x100000" in result.reason and "cap" in result.reason
    assert loads == []  # refused from the header: no pixel was decoded


def test_pixel_cap_is_configurable():
    data = jpeg_bytes(photo_like(300, 200, seed=1))
    assert isinstance(open_image(data, max_pixels=50_000, draft_size=None), Skipped)
    assert isinstance(open_image(data, max_pixels=60_000, draft_size=None), Decoded)


def test_draft_decodes_large_jpegs_at_reduced_size_but_never_below_the_model_input():
    data = jpeg_bytes(photo_like(2000, 1500, seed=2))
    reduced = open_image(data, draft_size=224)
    full = open_image(data, draft_size=None)
    assert full.image.size == (2000, 1500)
    assert reduced.image.size == (500, 375)  # 1/4: the smallest scale keeping both sides >= 224
    assert (reduced.width, reduced.height) == (2000, 1500)  # the recorded size is the real one
    # the cap counts decoded pixels, so a JPEG too large at full size is still fine through draft
    assert isinstance(open_image(data, max_pixels=200_000, draft_size=224), Decoded)
    assert isinstance(open_image(data, max_pixels=200_000, draft_size=None), Skipped)


def test_cmyk_jpeg_becomes_rgb_with_the_right_colour():
    img = Image.new("CMYK", (32, 32), (0, 255, 255, 0))  # pure red in CMYK
    r, g, b = pixel(open_image(jpeg_bytes(img), draft_size=None), (16, 16))
    assert r > 200 and g < 50 and b < 50


def test_16bit_grey_png_is_scaled_not_clipped_to_white(tmp_path):
    Image.fromarray(np.full((20, 20), 32768, np.uint16)).save(tmp_path / "g.png")
    assert pixel(open_image(tmp_path / "g.png"), (5, 5)) == (127, 127, 127)


def test_16bit_rgb_png(tmp_path):
    (tmp_path / "c.png").write_bytes(png_16bit_rgb(8, 8, 40000))
    assert pixel(open_image(tmp_path / "c.png"), (1, 1)) == (156, 156, 156)


def test_transparency_becomes_white(tmp_path):
    write_bad_inputs(tmp_path)
    result = open_image(tmp_path / "palette_transparent.png")
    assert pixel(result, (5, 5)) == (255, 255, 255)  # transparent (black underneath) -> white
    assert pixel(result, (40, 5)) == (255, 0, 0)
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)


def test_animated_gif_uses_the_first_frame(tmp_path):
    write_bad_inputs(tmp_path)
    r, g, b = pixel(open_image(tmp_path / "animated.gif"), (10, 10))
    assert r > 200 and g < 50 and b < 50


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (60, 40), "blue")
    img.paste((255, 0, 0), (0, 0, 30, 40))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise: the red half ends up on top
    img.save(tmp_path / "r.jpg", exif=exif.tobytes(), quality=95)
    result = open_image(tmp_path / "r.jpg", draft_size=None)
    assert result.image.size == (40, 60) and (result.width, result.height) == (40, 60)
    assert pixel(result, (20, 10))[0] > 200  # top is red
    assert pixel(result, (20, 50))[2] > 200  # bottom is blue


def test_truncated_and_vanished_files(tmp_path):
    data = jpeg_bytes(photo_like(300, 200, seed=3))
    assert "truncated" in open_image(data[:2000]).reason
    assert "disappeared" in open_image(tmp_path / "never-existed.jpg").reason
    (tmp_path / "d.jpg").mkdir()
    assert "directory" in open_image(tmp_path / "d.jpg").reason


@pytest.mark.parametrize("text,expected", [("200M", 200_000_000), ("1.5G", 1_500_000_000),
                                           ("50000", 50_000), ("12MP", 12_000_000)])
def test_parse_pixels(text, expected):
    assert parse_size(text, "--max-pixels", pixels=True) == expected


def test_parse_pixels_rejects_nonsense():
    with pytest.raises(BadInput, match="--max-pixels 'lots': give a pixel count"):
        parse_size("lots", "--max-pixels", pixels=True)
