"""Deterministic photo-like images and embedding-like vectors, so that tests, the offline demo and the
benchmarks need no dataset.

`photo_like` makes what matters for the machinery: distinct content per seed, smooth colour regions
with edges and per-pixel noise, so that JPEG files have realistic sizes (a 12-megapixel one is a few
megabytes, as from a camera) and realistic decoding cost.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def photo_like(width: int, height: int, seed: int, noise: int = 12) -> Image.Image:
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


def write_photo_folder(folder: str | os.PathLike, n: int, size: tuple[int, int] = (640, 480), *,
                       seed: int = 0, fmt: str = "JPEG", quality: int = 90) -> list[Path]:
    """Write `n` distinct photo-like images to `folder` (created if needed); returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    suffix = {"JPEG": ".jpg", "PNG": ".png"}[fmt]
    paths = []
    for i in range(n):
        path = folder / f"img_{seed + i:06d}{suffix}"
        options = {"quality": quality} if fmt == "JPEG" else {"compress_level": 1}
        photo_like(*size, seed=seed + i).save(path, fmt, **options)
        paths.append(path)
    return paths


def clustered_unit_vectors(n: int, dim: int = 512, *, clusters: int | None = None, spread: float = 1.0,
                           seed: int = 0, draw: int = 0, chunk: int = 65536) -> np.ndarray:
    """`n` unit vectors drawn from a mixture of Gaussians shaped like CLIP image embeddings.

    Why not uniform noise: in high dimension uniform vectors are all nearly orthogonal, so no index
    can beat a full scan and every ANN method looks broken. Real embeddings share a common direction
    (the modality offset) and cluster by content. Here cluster centres share one mean direction
    (cosine between centres about 0.5), cluster sizes vary (Dirichlet weights), and `spread` is the
    noise-to-centre ratio (1.0: cosine to the own centre about 0.7). `seed` fixes the mixture and
    `draw` the points drawn from it: held-out queries are another `draw` of the same mixture.
    """
    clusters = clusters or max(1, n // 100)
    mixture = np.random.default_rng(seed)
    mean = mixture.standard_normal(dim)
    mean /= np.linalg.norm(mean)
    centres = mean + mixture.standard_normal((clusters, dim)) / np.sqrt(dim)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    weights = mixture.dirichlet(np.full(clusters, 2.0))
    rng = np.random.default_rng([seed, draw])
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        which = rng.choice(clusters, size=m, p=weights)
        block = centres[which] + rng.standard_normal((m, dim)) * (spread / np.sqrt(dim))
        out[start:start + m] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


if __name__ == "__main__":  # python -m clipengine.synthetic FOLDER [N] : the demo's built-in images
    import sys

    if len(sys.argv) < 2:
        raise SystemExit("usage: python -m clipengine.synthetic FOLDER [N]")
    written = write_photo_folder(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 200)
    print(f"wrote {len(written)} images to {sys.argv[1]}")
