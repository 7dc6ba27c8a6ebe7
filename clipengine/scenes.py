"""A built-in captioned image set that a small model can learn in minutes on a CPU.

Each scene shows one group of identical shapes (a count of 1–3, a colour, a shape, a size, a place in
the picture) and, in half of the scenes, a second single shape elsewhere. Its captions describe what
is there in three phrasings, so the set exercises several captions per image. Everything is a pure
function of (seed, index): the same command writes byte-identical files on every machine, which is
what lets the README's offline demo and the tests train, index and search without any download.

About 960 distinct main groups (x the optional second shape) means captions are specific without
being unique: recall@k on held-out scenes measures whether a model has learnt colour, shape, count,
size and place, and chance is far below what a learnt model reaches.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from clipengine.durable import replacing

COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40),
    "purple": (140, 60, 190), "orange": (245, 140, 30), "black": (20, 20, 20), "white": (250, 250, 250),
}
SHAPES = ("circle", "square", "triangle", "cross")
PLACES = {  # name -> (x0, y0, x1, y1) as fractions of the canvas
    "on the left": (0.0, 0.15, 0.5, 0.85), "on the right": (0.5, 0.15, 1.0, 0.85),
    "at the top": (0.15, 0.0, 0.85, 0.5), "at the bottom": (0.15, 0.5, 0.85, 1.0),
    "in the middle": (0.25, 0.25, 0.75, 0.75),
}
SIZES = {"small": 0.12, "large": 0.22}  # shape width as a fraction of the canvas
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
OPPOSITE = {"on the left": "on the right", "on the right": "on the left", "at the top": "at the bottom",
            "at the bottom": "at the top", "in the middle": "at the top"}


@dataclass(frozen=True)
class Group:
    count: int
    colour: str
    shape: str
    size: str
    place: str

    def noun(self) -> str:
        return self.shape + ("es" if self.count > 1 and self.shape == "cross" else "s" if self.count > 1 else "")

    def phrase(self, numeric: bool = False) -> str:
        count = str(self.count) if numeric else ("a" if self.count == 1 else COUNT_WORDS[self.count])
        return f"{count} {self.size} {self.colour} {self.noun()}"


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    else:  # cross
        w = r / 2.5
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)


def _place_group(draw: ImageDraw.ImageDraw, group: Group, size: int, rng: np.random.Generator) -> None:
    x0, y0, x1, y1 = (v * size for v in PLACES[group.place])
    r = SIZES[group.size] * size / 2
    centres: list[tuple[float, float]] = []
    for _ in range(group.count):
        for _attempt in range(50):  # keep shapes of a group apart, so they can be counted
            cx, cy = rng.uniform(x0 + r, x1 - r), rng.uniform(y0 + r, y1 - r)
            if all((cx - a) ** 2 + (cy - b) ** 2 > (2.1 * r) ** 2 for a, b in centres):
                break
        centres.append((cx, cy))
        _draw_shape(draw, group.shape, cx, cy, r, COLOURS[group.colour])


def scene(index: int, seed: int = 0, size: int = 128) -> tuple[Image.Image, list[str]]:
    """Scene number `index` of set `seed`: the image and its captions."""
    rng = np.random.default_rng([seed, index])
    colours = list(COLOURS)
    main = Group(int(rng.integers(1, 4)), colours[rng.integers(len(colours))], SHAPES[rng.integers(len(SHAPES))],
                 list(SIZES)[rng.integers(len(SIZES))], list(PLACES)[rng.integers(len(PLACES))])
    extra = None
    if rng.random() < 0.5:
        others = [c for c in colours if c != main.colour]
        extra = Group(1, others[rng.integers(len(others))], SHAPES[rng.integers(len(SHAPES))], "small",
                      OPPOSITE[main.place])
    background = rng.integers(90, 170, 3)
    pixels = np.clip(background + rng.normal(0, 12, (size, size, 1)), 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(img)
    _place_group(draw, main, size, rng)
    if extra:
        _place_group(draw, extra, size, rng)
    tail = f" and {extra.phrase()} {extra.place}" if extra else ""
    captions = [
        f"{main.phrase()} {main.place}{tail}",
        f"a picture with {main.phrase(numeric=True)} {main.place}" + (f", and a {extra.colour} {extra.shape}" if extra else ""),
        f"{main.place}: {main.phrase()}" + (f"; {extra.place}: a {extra.colour} {extra.shape}" if extra else ""),
    ]
    return img, captions


def write_scene_set(folder: str | os.PathLike, count: int, *, seed: int = 0, size: int = 128,
                    quality: int = 92) -> Path:
    """Write `count` scenes as JPEGs under FOLDER/images and their captions to FOLDER/captions.csv
    (three rows per image, the layout `clipengine train --data` reads). Returns the CSV's path."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    csv_path = folder / "captions.csv"
    with replacing(csv_path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["filepath", "caption"])
        for i in range(count):
            img, captions = scene(i, seed, size)
            name = f"images/scene_{i:06d}.jpg"
            img.save(folder / name, "JPEG", quality=quality)
            writer.writerows([name, c] for c in captions)
    return csv_path


def photo_like(width: int, height: int, seed: int, noise: int = 12) -> Image.Image:
    """A photo-like picture, distinct per seed: smooth colour regions with edges and per-pixel grain, so
    that its JPEG has a camera photo's size and decoding cost. Export verifies image towers on these;
    tests and benchmarks build folders of them (tests/synthetic.py)."""
    rng = np.random.default_rng(seed)
    grid = rng.integers(0, 256, (max(2, height // 256 + 2), max(2, width // 256 + 2), 3), dtype=np.uint8)
    img = Image.fromarray(grid).resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 8))):
        x0, x1 = sorted(rng.integers(0, width, 2))
        y0, y1 = sorted(rng.integers(0, height, 2))
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1 + 1, y1 + 1], fill=fill)
    if noise:
        pixels = np.asarray(img, dtype=np.int16)
        pixels += rng.integers(-noise, noise + 1, (height, width, 1), dtype=np.int16)  # luminance grain
        img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    return img
