"""Image–caption pairs for training: read from any of four layouts, checked, split, and served in batches.

Layouts (`read_pairs` detects them):
- a CSV or TSV file with a header holding ``filepath`` and ``caption`` (separator detected; paths
  relative to the file; an image on several rows has several captions);
- a folder of images with sidecar captions (``cat.jpg`` + ``cat.txt``, one caption per line);
- a COCO-style caption JSON (``images`` with ``id``/``file_name``, ``annotations`` with
  ``image_id``/``caption``; file names relative to the JSON's folder or to `image_root`);
- WebDataset tar shards, local, named by a brace pattern (``shards/{000..099}.tar``): each sample is an
  image member plus a ``.txt`` (or ``.json`` with ``caption``) member with the same key.

Every layout becomes the same `PairSet`: a list of images and their captions. Tar members are addressed
by (shard, offset, size), found by reading the tar headers once, so shards get the same random access,
global shuffling, exact resumption and rank sharding as files do.

Sampling is a pure function of (seed, epoch, step): the global batch of a step is the same whatever the
number of processes, each rank takes its contiguous slice, and a sample's caption choice and
augmentation are seeded by (seed, epoch, sample). That is what makes a 2-process run equal a 1-process
run and a resumed run equal an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import random
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence, Union

import torch
from torch.utils.data import Dataset, Sampler, get_worker_info

from clipengine.errors import BadInput
from clipengine.images import DEFAULT_MAX_PIXELS, Decoded, Skipped, open_image, read_file
from clipengine.scan import IMAGE_EXTENSIONS

TarMember = tuple[str, int, int]  # (shard path, data offset, size)
ImageRef = Union[str, TarMember]
MOSTLY_BAD = 0.5  # stop when more than this fraction of the rows (or of the decoded samples) is bad
SIDECAR_SUFFIX = ".txt"


@dataclass
class PairSet:
    """Images and their captions (one or more each), plus the rows that were dropped and why."""

    images: list[ImageRef] = field(default_factory=list)
    captions: list[list[str]] = field(default_factory=list)
    dropped: list[tuple[str, str]] = field(default_factory=list)  # (row or file, reason)

    def __len__(self) -> int:
        return len(self.images)

    def add(self, image: ImageRef, captions: Sequence[str]) -> None:
        self.images.append(image)
        self.captions.append(list(captions))

    def subset(self, indices: Sequence[int]) -> "PairSet":
        return PairSet([self.images[i] for i in indices], [self.captions[i] for i in indices], [])


def describe_ref(ref: ImageRef) -> str:
    return ref if isinstance(ref, str) else f"{ref[0]}@{ref[1]}"


def _clean(captions: Sequence[str]) -> list[str]:
    return [c.strip() for c in captions if c and c.strip()]


def _add_checked(pairs: PairSet, path: Path, captions: Sequence[str], where: str) -> None:
    """Add one image with its captions, or record why the row is dropped (cheap checks only:
    decoding happens in the loader, which skips and counts what fails there)."""
    captions = _clean(captions)
    if not captions:
        pairs.dropped.append((where, "empty caption"))
    elif not path.is_file():
        pairs.dropped.append((where, f"image not found: {path}"))
    elif path.stat().st_size == 0:
        pairs.dropped.append((where, f"empty image file: {path}"))
    else:
        pairs.add(str(path), captions)


def _read_csv(path: Path) -> PairSet:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise BadInput(f"cannot read caption file {path}: {e}") from None
    header = text.split("\n", 1)[0]
    delimiter = "\t" if header.count("\t") > header.count(",") else ","
    reader = csv.DictReader(text.splitlines(), delimiter=delimiter)
    missing = {"filepath", "caption"} - set(reader.fieldnames or [])
    if missing:
        raise BadInput(f"{path}: the header needs 'filepath' and 'caption' columns "
                       f"(found {', '.join(reader.fieldnames or []) or 'none'})")
    grouped: dict[str, tuple[int, list[str]]] = {}
    for line, row in enumerate(reader, start=2):
        image = (row.get("filepath") or "").strip()
        if not image:
            grouped.setdefault(f"<row {line}>", (line, []))
            continue
        grouped.setdefault(image, (line, []))[1].append(row.get("caption") or "")
    pairs = PairSet()
    for image, (line, captions) in grouped.items():
        _add_checked(pairs, path.parent / image, captions, f"{path.name}:{line}")
    return pairs


def _read_sidecar_folder(folder: Path) -> PairSet:
    pairs = PairSet()
    for image in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()):
        sidecar = image.with_suffix(SIDECAR_SUFFIX)
        if not sidecar.is_file():
            pairs.dropped.append((str(image), f"no caption file {sidecar.name}"))
            continue
        _add_checked(pairs, image, sidecar.read_text(encoding="utf-8", errors="replace").splitlines(), str(image))
    return pairs


def _read_coco(path: Path, image_root: Path | None) -> PairSet:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        files = {img["id"]: img["file_name"] for img in data["images"]}
        annotations = data["annotations"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BadInput(f"{path} is not a COCO caption file (images[id, file_name], "
                       f"annotations[image_id, caption]): {e}") from None
    captions: dict[int, list[str]] = {i: [] for i in files}
    for ann in annotations:
        if ann.get("image_id") in captions:
            captions[ann["image_id"]].append(str(ann.get("caption") or ""))
    root = image_root or path.parent
    pairs = PairSet()
    for image_id, name in files.items():
        _add_checked(pairs, root / name, captions[image_id], f"{path.name}:image {image_id}")
    return pairs


def expand_braces(pattern: str) -> list[str]:
    """'a/{000..002}.tar' -> ['a/000.tar', 'a/001.tar', 'a/002.tar'] (bash-style, as WebDataset names shards)."""
    from braceexpand import braceexpand

    return list(braceexpand(pattern))


def _split_key(name: str) -> tuple[str, str]:
    """WebDataset's grouping rule: the key is the path up to the first dot of the file name."""
    directory, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return os.path.join(directory, stem), ext.lower()


def _read_shards(pattern: str) -> PairSet:
    shards = expand_braces(pattern)
    pairs = PairSet()
    for shard in shards:
        if not os.path.isfile(shard):
            raise BadInput(f"shard not found: {shard} (from {pattern})")
        samples: dict[str, dict[str, tarfile.TarInfo]] = {}
        try:
            with tarfile.open(shard, "r:") as tar:  # reads headers only, seeking over the data
                for member in tar:
                    if member.isfile():
                        key, ext = _split_key(member.name)
                        samples.setdefault(key, {})[ext] = member
                caption_of: dict[str, list[str]] = {}
                for key, parts in samples.items():
                    if "txt" in parts:
                        raw = tar.extractfile(parts["txt"]).read().decode("utf-8", "replace")
                        caption_of[key] = raw.splitlines()
                    elif "json" in parts:
                        meta = json.loads(tar.extractfile(parts["json"]).read() or b"{}")
                        caption = meta.get("caption") if isinstance(meta, dict) else None
                        caption_of[key] = caption if isinstance(caption, list) else [str(caption or "")]
        except (tarfile.TarError, OSError, ValueError) as e:
            raise BadInput(f"cannot read shard {shard}: {e}") from None
        for key, parts in samples.items():
            image = next((parts[e] for e in parts if "." + e in IMAGE_EXTENSIONS), None)
            where = f"{shard}:{key}"
            captions = _clean(caption_of.get(key, []))
            if image is None:
                pairs.dropped.append((where, "no image member"))
            elif not captions:
                pairs.dropped.append((where, "empty caption"))
            else:
                pairs.add((shard, image.offset_data, image.size), captions)
    return pairs


def read_pairs(source: str | os.PathLike, image_root: str | os.PathLike | None = None) -> PairSet:
    """Read image–caption pairs from a CSV/TSV, a sidecar-caption folder, a COCO JSON or tar shards.

    Rows with an empty caption or a missing image are dropped and listed in ``dropped``; when most
    rows are bad the data is refused, since that is a wrong path or column rather than a few bad rows.
    """
    text = str(source)
    path = Path(text).expanduser()
    if "{" in text or text.endswith(".tar"):
        pairs = _read_shards(str(path))
    elif path.is_dir():
        pairs = _read_sidecar_folder(path)
    elif not path.is_file():
        raise BadInput(f"training data not found: {text}")
    elif path.suffix.lower() == ".json":
        pairs = _read_coco(path, Path(image_root) if image_root else None)
    else:
        pairs = _read_csv(path)
    total = len(pairs) + len(pairs.dropped)
    if not pairs:
        first = f" (first: {pairs.dropped[0][0]}: {pairs.dropped[0][1]})" if pairs.dropped else ""
        raise BadInput(f"no usable image-caption pairs in {text}{first}")
    if len(pairs.dropped) > MOSTLY_BAD * total:
        where, reason = pairs.dropped[0]
        raise BadInput(f"{len(pairs.dropped)} of {total} rows in {text} are unusable (first: {where}: {reason}); "
                       "check the paths (they are relative to the caption file) and the caption column")
    return pairs


def split_validation(pairs: PairSet, size: int) -> tuple[PairSet, PairSet]:
    """Hold out `size` images, chosen by a hash of their path: the same images whatever the row order,
    so that a resumed or re-run training validates on the same set and never trains on it."""
    if size <= 0:
        return pairs, PairSet()
    if size >= len(pairs):
        raise BadInput(f"--val-size {size} leaves nothing to train on ({len(pairs)} images)")
    rank = sorted(range(len(pairs)), key=lambda i: hashlib.sha1(describe_ref(pairs.images[i]).encode()).digest())
    held = set(rank[:size])
    return (pairs.subset([i for i in range(len(pairs)) if i not in held]),
            pairs.subset([i for i in range(len(pairs)) if i in held]))


def default_val_size(n: int) -> int:
    """A tenth of the images, at most 1000: enough for a stable recall@k, little taken from training."""
    return min(1000, n // 10)


# --------------------------------------------------------------------------------------------------
# Serving batches
# --------------------------------------------------------------------------------------------------


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return ((seed * 1_000_003 + epoch) * 2**32 + index) % 2**63


def read_image_bytes(ref: ImageRef) -> bytes | Skipped:
    if isinstance(ref, str):
        return read_file(ref)
    shard, offset, size = ref
    try:
        with open(shard, "rb") as f:
            f.seek(offset)
            return f.read(size)
    except OSError as e:
        return Skipped(f"cannot read shard: {e.strerror or e}")


class PairDataset(Dataset):
    """Decodes, augments and tokenizes one pair. Keys are (index, seed) from `StepBatches`.

    `pixel_transform` is the PIL half of open_clip's transform, ending in a uint8 tensor: normalising
    happens batched on the device, and a quarter of the bytes cross from the worker (see
    `clipengine.embed.split_transform`). A sample whose image cannot be decoded is replaced by the next
    decodable one, deterministically, so batches keep their size on every rank; the bad image is
    reported with the batch.
    """

    TOKEN_CACHE = 500_000  # captions whose tokens a worker keeps: each epoch after the first re-uses them

    def __init__(self, pairs: PairSet, pixel_transform: Callable, tokenizer: Callable, *,
                 image_size: int, max_pixels: int = DEFAULT_MAX_PIXELS, all_captions: bool = False) -> None:
        self.pairs = pairs
        self.pixel_transform = pixel_transform
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.max_pixels = max_pixels
        self.all_captions = all_captions
        self._tokens: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.pairs)

    def _decode(self, ref: ImageRef) -> Decoded | Skipped:
        data = read_image_bytes(ref)
        if isinstance(data, Skipped):
            return data
        return open_image(data, max_pixels=self.max_pixels, draft_size=self.image_size)

    def _tokenize(self, caption: str) -> torch.Tensor:
        tokens = self._tokens.get(caption)
        if tokens is None:
            tokens = self.tokenizer([caption])
            if len(self._tokens) < self.TOKEN_CACHE:
                self._tokens[caption] = tokens
        return tokens

    def __getitem__(self, key: tuple[int, int]) -> tuple:
        index, seed = key
        bad: list[tuple[str, str]] = []
        for attempt in range(len(self.pairs)):
            i = (index + attempt) % len(self.pairs)
            decoded = self._decode(self.pairs.images[i])
            if isinstance(decoded, Decoded):
                break
            bad.append((describe_ref(self.pairs.images[i]), decoded.reason))
        else:
            raise BadInput("no image in the training data can be decoded")
        # a worker's RNG is its own; in the main process, leave the caller's RNG as it was. Only the CPU
        # generator is seeded: torch.manual_seed would also queue a CUDA seeding, with a stack trace, per call
        isolate = torch.random.fork_rng(devices=[]) if get_worker_info() is None else contextlib.nullcontext()
        with isolate:
            torch.default_generator.manual_seed(seed)
            pixels = self.pixel_transform(decoded.image)
        captions = self.pairs.captions[i]
        if self.all_captions:
            tokens = self.tokenizer(captions)
        else:
            tokens = self._tokenize(random.Random(seed).choice(captions))
        return pixels, tokens, i, bad


def collate_pairs(items: list[tuple]) -> tuple[torch.Tensor, torch.Tensor, list[int], list[tuple[str, str]]]:
    """Stack a batch; with several captions per image the texts are concatenated and `owners`
    (one image index per text) says whose each is."""
    pixels = torch.stack([it[0] for it in items])
    texts = torch.cat([it[1] for it in items])
    owners = [k for k, it in enumerate(items) for _ in range(len(it[1]))]
    bad = [b for it in items for b in it[3]]
    return pixels, texts, owners, bad


class StepBatches(Sampler):
    """The batches of one epoch for one rank, from a given step on.

    Step s of epoch e takes positions [s·B, (s+1)·B) of a permutation seeded by (seed, e); rank r of W
    takes the r-th contiguous slice of it. The last incomplete batch is dropped so that every rank
    runs the same number of steps, which DDP requires.
    """

    def __init__(self, n: int, global_batch: int, *, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if global_batch % world_size:
            raise BadInput(f"--batch-size {global_batch} must be divisible by the {world_size} processes")
        if n < global_batch:
            raise BadInput(f"--batch-size {global_batch} is larger than the {n} training images")
        self.n, self.global_batch, self.seed = n, global_batch, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start = 0, 0

    @property
    def steps_per_epoch(self) -> int:
        return self.n // self.global_batch

    def set_position(self, epoch: int, start_step: int) -> None:
        self.epoch, self.start = epoch, start_step

    def __len__(self) -> int:
        return self.steps_per_epoch - self.start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, 2**31))
        order = torch.randperm(self.n, generator=g).tolist()
        local = self.global_batch // self.world_size
        for step in range(self.start, self.steps_per_epoch):
            begin = step * self.global_batch + self.rank * local
            yield [(i, sample_seed(self.seed, self.epoch, i)) for i in order[begin:begin + local]]


class Sequential(Sampler):
    """Every item once, in order, for evaluation."""

    def __init__(self, n: int, batch: int) -> None:
        self.n, self.batch = n, batch

    def __len__(self) -> int:
        return -(-self.n // self.batch)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for begin in range(0, self.n, self.batch):
            yield [(i, 0) for i in range(begin, min(begin + self.batch, self.n))]
