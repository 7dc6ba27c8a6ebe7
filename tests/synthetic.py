"""Folders of photo-like images, embedding-like vectors and camera RAW files, so that tests and benchmarks need
no dataset.

The pictures are `clipengine.scenes.photo_like` (which export also verifies towers on): distinct per
seed, with realistic JPEG sizes (a 12-megapixel one is a few megabytes) and decoding cost. Benchmarks
import this file too (they put tests/ on sys.path).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clipengine.scenes import photo_like


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


@dataclass
class CrossModalSet:
    """An image gallery and two kinds of held-out query: images of the same mixture, and their captions."""

    images: np.ndarray  # (n, dim) unit vectors: what an index holds
    image_queries: np.ndarray  # other draws of the gallery's mixture: image->image search
    text_queries: np.ndarray  # one caption of each image query: text->image search, across the modality gap


@dataclass
class CrossModalStream:
    """A cross-modal set whose gallery is drawn chunk by chunk, each time it is read: 10M x 512 is 20 GB."""

    n: int
    image_queries: np.ndarray
    text_queries: np.ndarray
    image_chunks: Callable[[], Iterator[np.ndarray]]  # a fresh pass over the same gallery each call


def cross_modal_set(n: int, dim: int = 512, **shape) -> CrossModalSet:
    """`cross_modal_stream`'s set with its gallery in memory."""
    stream = cross_modal_stream(n, dim, **shape)
    images = np.empty((n, dim), dtype=np.float32)
    start = 0
    for chunk in stream.image_chunks():
        images[start:start + len(chunk)] = chunk
        start += len(chunk)
    return CrossModalSet(images, stream.image_queries, stream.text_queries)


def cross_modal_stream(n: int, dim: int = 512, *, queries: int = 1000, seed: int = 0, rank: int = 20,
                       spread: float = 0.5, cluster_spread: float = 0.4, gap: float = 2.0, offset: float = 10.0,
                       text_noise: float = 0.5, text_detail: float = 0.5, noise: float = 0.05,
                       chunk: int = 65536) -> CrossModalStream:
    """Vectors shaped like a CLIP model's images and captions, as hard to search as real ones.

    Why: the queries users type are texts, and CLIP's text embeddings sit away from its image embeddings
    (the modality gap), so an index tuned on image queries under-serves them. `clustered_unit_vectors` is
    far easier than real data (nprobe 2 at 100k); this reproduces the published hardness of LAION's CLIP
    ViT-B/32 embeddings (VIBE, Jääsaari et al. 2025; `query_hardness` measures it): image queries LID10
    14.7 and RC10 2.97, caption queries LID10 81.7 and RC10 1.27.

    How: content lives in a `rank`-dimensional latent space, embedded into `dim` by orthonormal rows that
    all vectors share with one mean direction. Images are clusters there (n/100 of them, Dirichlet(2)
    sizes, each with its own spread: `spread` times a log-normal of `cluster_spread`) plus a little
    isotropic `noise`, which gives them the low intrinsic dimension of real images. A caption keeps its
    image's cluster and `text_detail` of its offset from the centre, adds `text_noise`, and is moved by a
    fixed `offset` within the latent space and `gap` along a direction images never use: near its image's
    neighbours, but not where their partition's centroids point, and with little contrast between them.
    """
    mixture = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(mixture.standard_normal((dim, rank + 2)))
    mean_dir, gap_dir, embed = basis[:, 0], basis[:, 1], basis[:, 2:].T  # (dim,), (dim,), (rank, dim)
    clusters = max(1, n // 100)
    centres = mixture.standard_normal((clusters, rank))
    weights = mixture.dirichlet(np.full(clusters, 2.0))
    scales = spread * np.exp(cluster_spread * mixture.standard_normal(clusters))
    shift = mixture.standard_normal(rank)
    shift *= offset / np.linalg.norm(shift)

    def draw(m: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        which = rng.choice(clusters, size=m, p=weights)
        return which, rng.standard_normal((m, rank)) * scales[which, None]

    def embedded(latent: np.ndarray, rng: np.random.Generator, along_gap: float = 0.0) -> np.ndarray:
        x = 1.2 * mean_dir + (latent / np.sqrt(rank)) @ embed + along_gap * gap_dir
        x += rng.standard_normal(x.shape) * (noise / np.sqrt(dim))
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    def image_chunks() -> Iterator[np.ndarray]:
        rng = np.random.default_rng([seed, 1])
        for start in range(0, n, chunk):
            which, detail = draw(min(chunk, n - start), rng)
            yield embedded(centres[which] + detail, rng)

    rng = np.random.default_rng([seed, 2])
    which, detail = draw(queries, rng)
    image_queries = embedded(centres[which] + detail, rng)
    caption = centres[which] + text_detail * detail + text_noise * rng.standard_normal((queries, rank)) + shift
    return CrossModalStream(n, image_queries, embedded(caption, rng, gap), image_chunks)


@dataclass
class Neighbours:
    """Each query's k nearest in a gallery, and its mean distance to the whole gallery."""

    distances: np.ndarray  # (queries, k) Euclidean distances between unit vectors, nearest first
    vectors: np.ndarray | None  # (queries, k, dim) the neighbours themselves, when asked for
    mean_distance: np.ndarray  # (queries,)

    def rows(self, which: slice) -> Neighbours:
        return Neighbours(self.distances[which], None if self.vectors is None else self.vectors[which],
                          self.mean_distance[which])

    def hardness(self, k: int = 10) -> dict[str, float]:
        """Median local intrinsic dimensionality (LID_k) and relative contrast (RC_k), as VIBE measures them:
        LID_k is the maximum-likelihood estimate -1 / mean(log(d_i / d_k)) over the k nearest, RC_k the mean
        distance to the gallery over the k-th nearest's. A high LID and an RC near 1 make a query hard for
        any ANN index."""
        nearest = self.distances[:, :k]
        with np.errstate(divide="ignore"):  # k equidistant neighbours: an infinite dimension, as it should read
            lids = -1 / np.mean(np.log(nearest / nearest[:, -1:]), axis=1)
        return {"lid": float(np.median(lids)), "rc": float(np.median(self.mean_distance / nearest[:, -1]))}


def nearest_in(queries: np.ndarray, chunks: Iterable[np.ndarray], k: int, keep_vectors: bool = False) -> Neighbours:
    """Exact k nearest of `queries` in a gallery read chunk by chunk (a 10M gallery never held whole)."""
    distances = np.full((len(queries), k), np.inf, dtype=np.float32)
    vectors = np.zeros((len(queries), k, queries.shape[1]), dtype=np.float32) if keep_vectors else None
    total, count = np.zeros(len(queries)), 0
    for chunk in chunks:
        dist = np.sqrt(np.maximum(2 - 2 * (queries @ chunk.T), 1e-12))
        total += dist.sum(axis=1)
        count += len(chunk)
        top = np.argpartition(dist, min(k, dist.shape[1]) - 1, axis=1)[:, :k]
        merged = np.concatenate([distances, np.take_along_axis(dist, top, axis=1)], axis=1)
        order = np.argsort(merged, axis=1)[:, :k]
        distances = np.take_along_axis(merged, order, axis=1)
        if vectors is not None:
            both = np.concatenate([vectors, chunk[top]], axis=1)
            vectors = np.take_along_axis(both, order[:, :, None], axis=1)
    return Neighbours(distances, vectors, total / count)


def query_hardness(queries: np.ndarray, gallery: np.ndarray, k: int = 10) -> dict[str, float]:
    """`Neighbours.hardness` of `queries` against an in-memory `gallery`."""
    return nearest_in(queries, (gallery[i:i + 65536] for i in range(0, len(gallery), 65536)), k).hardness(k)


def write_dng(path, width: int = 256, height: int = 192, orientation: int = 1) -> np.ndarray:
    """A DNG as a camera writes one (an RGGB Bayer mosaic, 12 bits), through PiDNG: top half red, bottom blue."""
    mosaic = np.full((height, width), 64, np.uint16)
    mosaic[: height // 2, 0::2][0::2] = 4000  # R sites (even row, even column) in the top half
    mosaic[height // 2:, 1::2][1::2] = 4000  # B sites (odd row, odd column) in the bottom half
    identity = [[1, 1], [0, 1], [0, 1], [0, 1], [1, 1], [0, 1], [0, 1], [0, 1], [1, 1]]
    _write_mosaic(path, mosaic, orientation, identity)
    return mosaic


# XYZ -> linear sRGB (IEC 61966-2-1), in ten-thousandths: as a DNG's ColorMatrix1 it says the camera's sensor
# sees linear sRGB, so that LibRaw's output is the picture the mosaic was sampled from
_XYZ_TO_SRGB = [[32406, 10000], [-15372, 10000], [-4986, 10000], [-9689, 10000], [18758, 10000], [415, 10000],
                [557, 10000], [-2040, 10000], [10570, 10000]]


def write_dng_of(image, path) -> None:
    """A DNG (RGGB, 12 bits, no preview) whose sensor saw `image`: each site keeps its colour's channel of
    the picture, linearised, so that demosaicing gives the picture back as a camera's RAW would."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    linear = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    height, width = (d - d % 2 for d in linear.shape[:2])
    mosaic = np.empty((height, width), np.float64)
    mosaic[0::2, 0::2] = linear[0:height:2, 0:width:2, 0]  # R
    mosaic[0::2, 1::2] = linear[0:height:2, 1:width:2, 1]  # G
    mosaic[1::2, 0::2] = linear[1:height:2, 0:width:2, 1]  # G
    mosaic[1::2, 1::2] = linear[1:height:2, 1:width:2, 2]  # B
    _write_mosaic(Path(path), np.round(mosaic * 4095).astype(np.uint16), 1, _XYZ_TO_SRGB)


def _write_mosaic(path: Path, mosaic: np.ndarray, orientation: int, color_matrix: list) -> None:
    from pidng.core import RAW2DNG, DNGTags, Tag
    from pidng.defs import CalibrationIlluminant, CFAPattern, DNGVersion, PhotometricInterpretation

    height, width = mosaic.shape
    tags = DNGTags()
    for tag, value in ((Tag.ImageWidth, width), (Tag.ImageLength, height), (Tag.TileWidth, width),
                       (Tag.TileLength, height), (Tag.Orientation, orientation),
                       (Tag.PhotometricInterpretation, PhotometricInterpretation.Color_Filter_Array),
                       (Tag.SamplesPerPixel, 1), (Tag.BitsPerSample, 16), (Tag.CFARepeatPatternDim, [2, 2]),
                       (Tag.CFAPattern, CFAPattern.RGGB), (Tag.BlackLevel, 0), (Tag.WhiteLevel, 4095),
                       (Tag.ColorMatrix1, color_matrix),
                       (Tag.CalibrationIlluminant1, CalibrationIlluminant.D65), (Tag.AsShotNeutral, [[1, 1]] * 3),
                       (Tag.DNGVersion, DNGVersion.V1_4), (Tag.DNGBackwardVersion, DNGVersion.V1_2),
                       (Tag.Make, "clipengine"), (Tag.Model, "test")):
        tags.set(tag, value)
    writer = RAW2DNG()
    writer.options(tags, path=str(path.parent), compress=False)
    writer.convert(mosaic, filename=path.stem)
    path.parent.joinpath(path.stem + ".dng").rename(path)  # PiDNG names it .dng; a camera's own extension may differ


def write_video(path, segments, *, fps: int = 10, size: tuple[int, int] = (160, 120), codec: str | None = None,
                gop: int | None = None, rotation: int | None = None, truncate: int | None = None,
                pan: int | None = None, options: dict | None = None) -> list[float]:
    """A video whose content is known per second, through PyAV's own encoder: `segments` is a list of
    (seconds, picture), a picture being an RGB colour, a PIL image (stretched to `size`) or None (black).
    Each picture moves a little every frame, as a camera does (`pan`: by this many pixels a frame, sideways;
    by default it shakes within 8 pixels). `gop`: frames between keyframes (default one second); `rotation`:
    the display matrix a phone writes (counter-clockwise degrees); `truncate`: keep only this many bytes (a
    copy cut short); `options`: the encoder's (e.g. {"preset": "veryfast"}). Returns each segment's start in
    seconds."""
    import av
    from PIL import Image

    codec = codec or ("libvpx-vp9" if str(path).endswith(".webm") else "libx264")
    starts, t = [], 0.0
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps, options=options or {})
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.codec_context.gop_size = gop or fps
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for seconds, picture in segments:
            starts.append(t)
            t += seconds
            if picture is None:
                base = np.zeros((size[1], size[0], 3), np.uint8)
            elif isinstance(picture, tuple):
                base = np.empty((size[1], size[0], 3), np.uint8)
                base[...] = picture
                base[size[1] // 3: 2 * size[1] // 3, size[0] // 3: 2 * size[0] // 3] = [255 - c for c in picture]
            else:
                base = np.asarray(picture.convert("RGB").resize(size, Image.Resampling.BILINEAR))
            for i in range(int(round(seconds * fps))):
                shifted = np.roll(base, i * pan if pan else i % 8, axis=1) if picture is not None else base
                for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(shifted), format="rgb24")):
                    container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    if truncate is not None:
        os.truncate(path, truncate)
    return starts


def write_shards(pairs_csv, folder, per_shard: int, *, sizes: str = "sizes.json") -> list[Path]:
    """The images of a caption CSV (each with all its captions) as img2dataset writes them: ``00000.tar`` ... holding ``000000000.jpg`` +
    ``.txt`` + ``.json``, and the sample counts as open_clip's ``sizes.json`` (`sizes` "sizes.json"),
    img2dataset's ``00000_stats.json`` ("stats") or not at all ("")."""
    import csv
    import io
    import json
    import tarfile

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    grouped: dict[str, list[str]] = {}
    with open(pairs_csv, newline="") as f:
        for row in csv.DictReader(f):
            grouped.setdefault(row["filepath"], []).append(row["caption"])
    rows = [{"filepath": path, "captions": captions} for path, captions in grouped.items()]
    base = Path(pairs_csv).parent
    shards, counts = [], {}
    for number, start in enumerate(range(0, len(rows), per_shard)):
        shard = folder / f"{number:05d}.tar"
        chunk = rows[start:start + per_shard]
        with tarfile.open(shard, "w") as tar:
            for i, row in enumerate(chunk):
                key = f"{number:05d}{i:04d}"
                image = (base / row["filepath"]).read_bytes()
                for ext, data in (("jpg", image), ("txt", "\n".join(row["captions"]).encode()),
                                  ("json", json.dumps({"caption": row["captions"][0], "key": key}).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        counts[shard.name] = len(chunk)
        if sizes == "stats":
            (folder / f"{number:05d}_stats.json").write_text(json.dumps({"successes": len(chunk), "count": len(chunk)}))
        shards.append(shard)
    if sizes == "sizes.json":
        (folder / "sizes.json").write_text(json.dumps(counts))
    return shards
