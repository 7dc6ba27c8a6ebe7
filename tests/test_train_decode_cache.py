"""Decode once: the training shrink, the decoded-image cache, and quiet decoding of awkward images."""

from __future__ import annotations

import io
import multiprocessing
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import spy
from PIL import Image

from clipengine.embed import split_transform
from clipengine.errors import BadInput
from clipengine.images import DROP, WHITE, open_image
from clipengine.pairs import read_pairs
from clipengine.scenes import write_scene_set
from clipengine.sizes import parse_size
from clipengine.training import data as train_data
from clipengine.training.data import PairDataset, SampleMaker
from clipengine.training.decode_cache import DecodedCache, TrainingShrink, crop_headroom


def test_the_shrink_keeps_what_the_random_crop_needs(tiny_model):
    transform = tiny_model.image_transform(train=True)
    assert crop_headroom(transform) == pytest.approx(1 / (0.9 / (4 / 3)) ** 0.5)  # scale 0.9, ratio 3/4..4/3
    assert crop_headroom(tiny_model.image_transform()) == 1.0  # resize-then-crop needs no more than the input
    shrink = TrainingShrink(64, crop_headroom(transform))
    assert shrink.side == 78
    assert shrink(Image.new("RGB", (4000, 3000))).size == (104, 78)
    assert shrink(Image.new("RGB", (300, 2000))).size == (78, 520)
    small = Image.new("RGB", (70, 90))
    assert shrink(small) is small  # never enlarged


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def test_the_cache_is_keyed_by_content_and_variant_and_bounded(tmp_path):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)) for _ in range(4)]
    cache = DecodedCache(tmp_path / "c.sqlite", "side78:white", max_bytes=3 * 20 * 30 * 3)
    keys = [DecodedCache.key(_png(im)) for im in images]
    assert len(set(keys)) == 4 and cache.get(keys[0]) is None
    assert [cache.put(k, im) for k, im in zip(keys, images, strict=True)] == [True, True, True, False]  # the 4th does not fit
    assert np.array_equal(np.asarray(cache.get(keys[1])), np.asarray(images[1]))
    assert cache.get(keys[3]) is None
    other = DecodedCache(tmp_path / "c.sqlite", "side78:drop")
    assert other.get(keys[1]) is None  # another transparency (or size) never reads these pixels
    assert cache.stats()["entries"] == 3 and cache.stats()["file_bytes"] == 3 * 20 * 30 * 3
    reopened = DecodedCache(tmp_path / "c.sqlite", "side78:white", max_bytes=3 * 20 * 30 * 3)
    assert np.array_equal(np.asarray(reopened.get(keys[2])), np.asarray(images[2]))  # kept across runs
    assert parse_size("4GiB", "--decode-cache-size") == 4 << 30 and parse_size(123, "--decode-cache-size") == 123
    assert parse_size("500MiB", "--decode-cache-size") == 500 << 20 and parse_size("4G", "--decode-cache-size") == 4 * 10**9
    with pytest.raises(BadInput, match="--decode-cache-size 'lots'"):
        parse_size("lots", "--decode-cache-size")


def _fill(path: str, start: int) -> None:
    cache = DecodedCache(path, "v")
    rng = np.random.default_rng(start)
    for i in range(start, start + 40):
        cache.put(i.to_bytes(16, "little"), Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)))


def test_workers_write_the_cache_at_once(tmp_path):
    path = str(tmp_path / "c.sqlite")
    DecodedCache(path, "v")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_fill, args=(path, s)) for s in (0, 40, 80)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    stats = DecodedCache(path, "v").stats()
    assert stats["entries"] == 120 and stats["file_bytes"] == 120 * 8 * 8 * 3


def test_a_second_epoch_decodes_nothing_and_crops_the_same(tmp_path, tiny_model, monkeypatch):
    pairs = read_pairs(write_scene_set(tmp_path / "scenes", 6, size=200))
    pixel_transform, _ = split_transform(tiny_model.image_transform(train=True))
    shrink = TrainingShrink(64, crop_headroom(tiny_model.image_transform(train=True)))

    def dataset(cache):
        return PairDataset(pairs, SampleMaker(pixel_transform, tiny_model.tokenizer, image_size=64, shrink=shrink, cache=cache))

    decodes = spy(monkeypatch, train_data, "open_image")
    cache = DecodedCache(tmp_path / "c.sqlite", "side78:white")
    first = [dataset(cache)[(i, 7)][0] for i in range(6)]
    assert len(decodes) == 6
    again = [dataset(cache)[(i, 7)][0] for i in range(6)]  # a new dataset: the next run, or a new worker
    assert len(decodes) == 6  # nothing decoded again
    uncached = [dataset(None)[(i, 7)][0] for i in range(6)]
    for a, b, c in zip(first, again, uncached, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)  # the cache changes the time, never the pixels
    Path(pairs.images[0]).write_bytes(_jpeg_of_another_scene())
    dataset(cache)[(0, 7)]
    assert len(decodes) == 6 + 6 + 1  # a changed file is decoded anew (and the uncached pass decoded 6)


def _jpeg_of_another_scene() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (200, 200), (200, 10, 10)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.mark.slow
def test_awkward_images_decode_and_crop_without_warnings(tmp_path, tiny_model):
    """A 156 MP image warned about decompression bombs on every random crop, and one over 179 MP raised."""
    folder = tmp_path / "odd"
    folder.mkdir()
    Image.new("L", (13000, 12000), 90).save(folder / "huge.png", compress_level=1)
    palette = Image.fromarray(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64).astype(np.uint8) % 16, "L").convert("P")
    palette.save(folder / "palette.png", transparency=bytes([0] * 4 + [255] * 252))  # transparency as bytes
    Image.new("LA", (64, 64), (10, 0)).save(folder / "la.png")
    (folder / "captions.csv").write_text("filepath,caption\n" + "".join(f"{n},{n}\n" for n in ("huge.png", "palette.png", "la.png")))
    transform = tiny_model.image_transform(train=True)
    pixel_transform, _ = split_transform(transform)
    for transparency in (WHITE, DROP):
        dataset = PairDataset(read_pairs(folder / "captions.csv"), SampleMaker(
            pixel_transform, tiny_model.tokenizer, image_size=64, transparency=transparency,
            shrink=TrainingShrink(64, crop_headroom(transform))))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            items = [dataset[(i, seed)] for i in range(3) for seed in range(4)]
        assert all(item[0].shape == (3, 64, 64) and not item[3] for item in items)


def test_transparency_is_white_or_what_open_clip_sees(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (30, 60, 90, 0))
    rgba.putpixel((0, 0), (200, 100, 50, 255))
    data = _png(rgba)
    white = np.asarray(open_image(data, transparency=WHITE).image)
    dropped = open_image(data, transparency=DROP).image
    assert tuple(white[1, 1]) == (255, 255, 255) and tuple(white[0, 0]) == (200, 100, 50)
    assert dropped.mode == "RGBA"  # open_clip's transform resizes with alpha, then drops it (tests/test_evaluation.py)
    assert np.array_equal(np.asarray(dropped), np.asarray(Image.open(io.BytesIO(data))))
