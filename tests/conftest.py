"""Shared fixtures: a tiny random model, generated image folders, and an isolated index directory."""

from __future__ import annotations

import io
import signal
import sqlite3
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from synthetic import write_photo_folder
from typer.testing import CliRunner as TyperRunner

from clipengine.index.location import DATABASE
from clipengine.scenes import photo_like


@pytest.fixture(scope="session")
def tiny_model():
    from clipengine.models import ModelSpec, load_model

    return load_model(ModelSpec(arch="tiny"), device="cpu")


class CliRunner(TyperRunner):
    """typer's CliRunner, failing the test when the command crashes. CliRunner keeps an exception in
    `result.exception`, never in the output, and a crash exits with code 1 as a user's mistake does: without
    this a test of a one-line error passes on a traceback. A command's exit (its errors included) is a SystemExit."""

    def invoke(self, *args, **kwargs):
        result = super().invoke(*args, **kwargs)
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise AssertionError(f"the command crashed: {result.exception!r}") from result.exception
        return result


def same_weights(model, state: dict) -> bool:
    """Whether a torch module holds exactly these weights."""
    import torch

    return all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def committed_count(index: Path) -> int:
    """Files committed to the index at `index` so far, read while another process may be writing it."""
    try:
        with sqlite3.connect(f"file:{index / DATABASE}?mode=ro", uri=True, timeout=5) as conn:
            return conn.execute("SELECT COUNT(*) FROM files").fetchone()[0]
    except sqlite3.Error:
        return 0


def interrupted_run(script: str, folder: Path, index: Path, after: int, sig: int) -> int:
    """Run `script` (python -c, given FOLDER INDEX) in a child and interrupt it with `sig` once `after` files are
    committed; returns how many were committed when it stopped."""
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-c", script, str(folder), str(index)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=interruptible)
    deadline = time.monotonic() + 120
    while committed_count(index) < after and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(sig)
    proc.wait(timeout=60)
    return committed_count(index)


def spy(monkeypatch, owner: object, name: str) -> list[tuple]:
    """Replace `owner.name` by a wrapper that records each call's arguments and calls through."""
    calls: list[tuple] = []
    real = getattr(owner, name)

    def recorded(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, recorded)
    return calls


def interruptible() -> None:
    """preexec_fn for a child that a test stops with SIGINT: a test run launched as a background job ignores
    SIGINT, the child would inherit that, and Python then never raises KeyboardInterrupt in it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture(scope="session")
def _export_cache(tmp_path_factory) -> Path:
    """One export cache for the session: each model is exported to ONNX once, and verified at every use."""
    return tmp_path_factory.mktemp("export-cache")


@pytest.fixture(autouse=True)
def _isolated_index_dir(tmp_path, monkeypatch, _export_cache):
    """Named indexes go to a temporary directory, never the checkout's indexes/; exports are cached per session."""
    monkeypatch.setenv("CLIPENGINE_INDEX_DIR", str(tmp_path / "indexes"))
    monkeypatch.setenv("CLIPENGINE_CACHE_DIR", str(_export_cache))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


def write_photos(folder: Path) -> Path:
    """12 distinct photo-like JPEGs in two sub-folders of `folder`."""
    write_photo_folder(folder / "a", 6, (200, 150), seed=0)
    write_photo_folder(folder / "b", 6, (150, 200), seed=100)
    return folder


@pytest.fixture
def photos(tmp_path) -> Path:
    """A folder of 12 distinct photo-like JPEGs in two sub-folders."""
    return write_photos(tmp_path / "photos")


def raw_png(width: int, height: int, bit_depth: int, pixel_data: bytes) -> bytes:
    """An RGB PNG written by hand, for what Pillow will not write: lying headers, 16 bits per channel."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(pixel_data))
            + chunk(b"IEND", b""))


def png_claiming_size(width: int, height: int) -> bytes:
    """A tiny, valid-looking PNG whose header claims an enormous size (a decompression bomb)."""
    return raw_png(width, height, 8, b"\0" * 64)


def png_16bit_rgb(width: int, height: int, value: int) -> bytes:
    """A 48-bit RGB PNG filled with `value` in 0..65535."""
    row = b"\x00" + np.full((width, 3), value, ">u2").tobytes()
    return raw_png(width, height, 16, row * height)


def jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


def write_bad_inputs(folder: Path) -> dict[str, str]:
    """Every awkward file real collections hold (truncated, zero-byte, CMYK, 16-bit, huge...), written into
    `folder`. Returns {file name: expected outcome}, where the outcome is 'ok' or a fragment of the skip reason."""
    folder.mkdir(parents=True, exist_ok=True)
    good = photo_like(160, 120, seed=7)
    full = jpeg_bytes(photo_like(400, 300, seed=8))
    (folder / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_text("this is not an image\n")
    (folder / "bomb.png").write_bytes(png_claiming_size(100_000, 100_000))
    photo_like(120, 90, seed=9).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(np.full((40, 60), 30000, np.uint16)).save(folder / "grey16.png")
    (folder / "rgb16.png").write_bytes(png_16bit_rgb(50, 40, 40000))
    pal = Image.new("P", (50, 50), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.paste(1, (25, 0, 50, 50))
    pal.save(folder / "palette_transparent.png", transparency=0)
    frames = [Image.new("RGB", (40, 30), c) for c in ("red", "green", "blue")]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    good.save(folder / "rotated.jpg", exif=exif.tobytes())
    good.save(folder / "ünïcode name with spaces.jpg")
    (folder / "broken_link.jpg").symlink_to(folder / "does-not-exist.jpg")
    (folder / "loop_a.jpg").symlink_to(folder / "loop_b.jpg")
    (folder / "loop_b.jpg").symlink_to(folder / "loop_a.jpg")
    (folder / "directory.jpg").mkdir()
    good.save(folder / "directory.jpg" / "inside.jpg")
    (folder / "sub").mkdir()
    (folder / "sub" / "up").symlink_to(folder, target_is_directory=True)  # a directory loop
    return {
        "truncated.jpg": "truncated",
        "empty.jpg": "empty file",
        "notes.jpg": "not a recognised image",
        "bomb.png": "too large",
        "cmyk.jpg": "ok",
        "grey16.png": "ok",
        "rgb16.png": "ok",
        "palette_transparent.png": "ok",
        "animated.gif": "ok",
        "rotated.jpg": "ok",
        "ünïcode name with spaces.jpg": "ok",
        "broken_link.jpg": "broken symbolic link",
        "loop_a.jpg": "symbolic link loop",
        "loop_b.jpg": "symbolic link loop",
        "directory.jpg/inside.jpg": "ok",
    }


@pytest.fixture(scope="session")
def trained_scenes(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """The tiny model trained on 3,000 built-in scenes, and an index of 300 scenes it never saw, with each
    indexed image's first caption: a model that has learnt colours, for tests of what results mean.

    About 50 s on 2 cores: one loading process beside the training thread halves the 10 epochs at 5e-4 that
    this took before (105 s), and 7 epochs at 1e-3 learn more (zero-shot colour 36 of 40, own caption in the
    top 10 for 18 of 20, where the tests ask 24 and 10)."""
    import csv
    import os
    import shutil

    from filelock import FileLock

    # `make test` runs 2 pytest-xdist workers, each with its own session: the first to ask builds the model in the
    # run's shared temporary folder, the other waits for it (xdist's documented way to build a session fixture once)
    shared = os.environ.get("PYTEST_XDIST_WORKER") is not None
    root = (tmp_path_factory.getbasetemp().parent if shared else tmp_path_factory.getbasetemp()) / "trained-scenes"
    with FileLock(f"{root}.lock"):
        if not (root / "built").is_file():
            shutil.rmtree(root, ignore_errors=True)  # what a failed build in the other worker left
            _train_scenes(root)
            (root / "built").touch()
    test = root / "test" / "captions.csv"
    captions: dict[str, str] = {}
    with open(test, newline="") as f:
        for row in csv.DictReader(f):
            captions.setdefault(Path(row["filepath"]).name, row["caption"])
    return root / "idx", captions


def _train_scenes(root: Path) -> None:
    from clipengine.index.pipeline import index_folder
    from clipengine.models import ModelSpec
    from clipengine.scenes import write_scene_set
    from clipengine.training import TrainConfig, train

    data = write_scene_set(root / "train", 3000, seed=0, size=64)
    test = write_scene_set(root / "test", 300, seed=1, size=64)
    train(TrainConfig(data=str(data), out=str(root / "run"), epochs=7, lr=1e-3, batch_size=64, val_size=0, workers=1,
                      decode_cache=str(root / "decoded.db")))
    index_folder(test.parent / "images", root / "idx", ModelSpec(checkpoint=str(root / "run")), workers=0, export=False)
