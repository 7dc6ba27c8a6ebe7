"""Terminal previews: the bytes each protocol emits for a known image, detection, and `search --preview`."""

from __future__ import annotations

import base64
import io
import re

import pytest
from conftest import CliRunner
from PIL import Image
from rich.console import Console

from clipengine.cli import _bare_preview, app
from clipengine.preview import detect, iterm_sequence, show


@pytest.fixture
def half_and_half() -> Image.Image:
    """Red on the left, blue on the right."""
    image = Image.new("RGB", (64, 32), (255, 0, 0))
    image.paste((0, 0, 255), (32, 0, 64, 32))
    return image


def console() -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, force_terminal=True, color_system="truecolor", width=80), buffer


def left_and_right(png: bytes) -> tuple:
    image = Image.open(io.BytesIO(png)).convert("RGB")
    return image.getpixel((1, image.height // 2)), image.getpixel((image.width - 2, image.height // 2))


def test_blocks_are_half_blocks_in_the_images_colours(half_and_half):
    out, buffer = console()
    show(out, half_and_half, "blocks", 8)
    text = buffer.getvalue()
    rows = text.rstrip("\n").split("\n")
    assert len(rows) == 2 and all(row.count("▀") == 8 for row in rows)  # 8 cells wide, 2 rows of 2 pixels each
    red, blue = "\x1b[38;2;255;0;0;48;2;255;0;0m▀", "\x1b[38;2;0;0;255;48;2;0;0;255m▀"
    for row in rows:  # left cells red, right cells blue (the two in the middle are resampled between them)
        assert row.startswith(red) and row.rstrip().endswith(blue + "\x1b[0m") and row.count(red) >= 3 <= row.count(blue)


def test_iterm_is_one_osc_1337_sequence_with_the_png(half_and_half):
    sequence = iterm_sequence(half_and_half, 12)
    match = re.fullmatch(r"\x1b\]1337;File=inline=1;size=(\d+);width=12;preserveAspectRatio=1:([A-Za-z0-9+/=]+)\x07\n",
                         sequence)
    assert match
    png = base64.b64decode(match.group(2))
    assert int(match.group(1)) == len(png) and png[:8] == b"\x89PNG\r\n\x1a\n"
    assert left_and_right(png) == ((255, 0, 0), (0, 0, 255))
    out, buffer = console()
    show(out, half_and_half, "iterm", 12)
    assert buffer.getvalue() == sequence  # written as is, never wrapped or measured


def test_kitty_sends_the_png_by_the_graphics_protocol(half_and_half, capfd):
    out, buffer = console()
    show(out, half_and_half, "kitty", 8)
    sent = capfd.readouterr().out + buffer.getvalue()  # textual-image writes the transmission to the terminal itself
    chunks = re.findall(r"\x1b_G([^;]*);([A-Za-z0-9+/=]+)\x1b\\", sent)
    assert chunks and "f=100" in chunks[0][0]  # f=100: the payload is a PNG
    assert [c[0].split("m=")[-1][:1] for c in chunks if "m=" in c[0]][-1] == "0"  # the last chunk closes it
    png = base64.b64decode("".join(payload for _, payload in chunks))
    assert left_and_right(png) == ((255, 0, 0), (0, 0, 255))


def test_sixel_is_a_dcs_sequence_with_red_and_blue_registers(half_and_half):
    out, buffer = console()
    show(out, half_and_half, "sixel", 8)
    sixel = buffer.getvalue()
    body = sixel[sixel.index("\x1bP"):sixel.index("\x1b\\")]
    assert "q" in body[:12]  # DCS ... q: sixel data follows
    registers = dict(re.findall(r"#(\d+);2;(\d+;\d+;\d+)", body))
    assert {"100;0;0", "0;0;100"} <= set(registers.values())  # red and blue, in percent (and resampled edges)
    assert all(g == "0" for g in (v.split(";")[1] for v in registers.values()))  # no green anywhere


def test_detection_and_the_bare_flag(monkeypatch):
    assert detect({"KITTY_WINDOW_ID": "1"}) == "kitty"
    assert detect({"TERM": "xterm-ghostty"}) == "kitty"
    assert detect({"TERM_PROGRAM": "iTerm.app"}) == "iterm"
    assert detect({"LC_TERMINAL": "iTerm2"}) == "iterm"
    assert detect({}) in ("kitty", "sixel", "blocks")  # asked of the terminal: under pytest, no terminal answers
    assert _bare_preview(["ce", "search", "x", "--preview"]) == ["ce", "search", "x", "--preview=auto"]
    assert _bare_preview(["ce", "search", "--preview", "x"]) == ["ce", "search", "--preview=auto", "x"]
    assert _bare_preview(["ce", "search", "--preview", "sixel", "x"]) == ["ce", "search", "--preview", "sixel", "x"]


def test_search_with_previews(tmp_path, tiny_model):
    from conftest import write_photos

    from clipengine.index.pipeline import index_folder

    index_folder(write_photos(tmp_path / "photos"), tmp_path / "idx", model=tiny_model, workers=0, export=False)
    runner = CliRunner()
    shown = runner.invoke(app, ["search", "a photo", "--index", str(tmp_path / "idx"), "-k", "3", "--preview=blocks"])
    assert shown.exit_code == 0 and shown.stdout.count("▀") >= 3 * 8 and "\x1b[38;2;" in shown.stdout
    assert len(re.findall(r"^\s+\d\s+[+-]\d\.\d{4}\s+\d{4}-\d\d-\d\d\s+/", shown.stdout, re.M)) == 3  # each hit's line follows its picture
    plain = runner.invoke(app, ["search", "a photo", "--index", str(tmp_path / "idx"), "-k", "3", "--preview=auto"])
    assert "\x1b" not in plain.stdout and len(plain.stdout.splitlines()) == 3  # detected only on a terminal
    bad = runner.invoke(app, ["search", "a photo", "--index", str(tmp_path / "idx"), "--preview=png"])
    assert bad.exit_code == 2 and "'png': choose one of" in bad.output
