"""Image–caption pairs for training: split off a held-out set and served in seeded batches.

The layouts they are read from live in `clipengine.pairs`. Sampling is a pure function of
(seed, epoch, step): the global batch of a step is the same whatever the number of processes, each rank
takes its contiguous slice, and a sample's caption choice and augmentation are seeded by
(seed, epoch, sample). That is what makes a 2-process run equal a 1-process run and a resumed run equal
an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import Dataset, Sampler, get_worker_info

from clipengine.errors import BadInput
from clipengine.images import (
    DEFAULT_MAX_PIXELS,
    WHITE,
    Decoded,
    ImageRef,
    Skipped,
    describe_ref,
    open_image,
    read_image_bytes,
)
from clipengine.pairs import PairSet
from clipengine.training.decode_cache import DecodedCache, TrainingShrink


def split_validation(pairs: PairSet, size: int) -> tuple[PairSet, PairSet]:
    """Hold out `size` images, chosen by a hash of their path within the data set: the same images whatever
    the row order and wherever the data set is stored (a copy, another machine), so that a resumed or re-run
    training validates on the same set and never trains on it."""
    if size <= 0:
        return pairs, PairSet()
    if size >= len(pairs):
        raise BadInput(f"--val-size {size} leaves nothing to train on ({len(pairs)} images)")
    names = _names_within(pairs.images)
    rank = sorted(range(len(pairs)), key=lambda i: hashlib.sha1(names[i].encode()).digest())
    held = set(rank[:size])
    return (pairs.subset([i for i in range(len(pairs)) if i not in held]),
            pairs.subset([i for i in range(len(pairs)) if i in held]))


def _names_within(refs: list) -> list[str]:
    """Each image's path relative to the folder all of them share (a tar member's: its shard's, and its offset)."""
    files = [ref if isinstance(ref, str) else ref[0] for ref in refs]
    root = os.path.commonpath([os.path.dirname(os.path.abspath(f)) for f in files])
    return [os.path.relpath(os.path.abspath(f), root) + describe_ref(ref)[len(f):] for f, ref in zip(files, refs, strict=True)]


def default_val_size(n: int) -> int:
    """A tenth of the images, at most 1000: enough for a stable recall@k, little taken from training."""
    return min(1000, n // 10)


# --------------------------------------------------------------------------------------------------
# Serving batches
# --------------------------------------------------------------------------------------------------


PERMUTATION = -1  # the `index` of an epoch's permutation in `sample_seed`


def sample_seed(seed: int, epoch: int, index: int | str) -> int:
    """A 32-bit seed drawn from (run seed, epoch, sample) by hashing; a streamed sample is named by a string.

    32 bits because torch's CPU generator keeps only the low 32 bits of a seed: packing the three
    numbers into one wide integer (as this once did) gave every epoch and every --seed the same
    permutation and the same crops. A hash spreads any change of any of the three over all 32 bits.
    """
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


class SampleMaker:
    """One training sample from an image's bytes and its captions: decoded, augmented and tokenized.

    `pixel_transform` is the PIL half of open_clip's transform, ending in a uint8 tensor: normalising
    happens batched on the device, and a quarter of the bytes cross from the worker (see
    `clipengine.embed.split_transform`). With `shrink`, a decoded image is first reduced to what the
    random crop needs, and kept in `cache` for later epochs and runs (`clipengine.training.decode_cache`).
    The crop and the caption choice are drawn from the sample's seed alone. Shared by the files and tar
    members of `PairDataset` and the streamed shards of `clipengine.training.stream`.
    """

    TOKEN_CACHE = 500_000  # captions whose tokens a worker keeps: each epoch after the first re-uses them

    def __init__(self, pixel_transform: Callable, tokenizer: Callable, *, image_size: int,
                 max_pixels: int = DEFAULT_MAX_PIXELS, all_captions: bool = False, transparency: str = WHITE,
                 shrink: TrainingShrink | None = None, cache: DecodedCache | None = None) -> None:
        self.pixel_transform = pixel_transform
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.max_pixels = max_pixels
        self.all_captions = all_captions
        self.transparency = transparency
        self.shrink = shrink
        self.cache = cache if shrink is not None else None  # the cache holds shrunk images only
        self._tokens: dict[str, torch.Tensor] = {}

    def decode(self, data: bytes, name: str) -> Decoded | Skipped:
        cache = self.cache
        key = cache.key(data) if cache else b""
        if cache and (image := cache.get(key)) is not None:
            return Decoded(image, image.width, image.height)
        decoded = open_image(data, max_pixels=self.max_pixels, transparency=self.transparency,
                             draft_size=self.shrink.side if self.shrink else self.image_size, name=name)
        if isinstance(decoded, Decoded) and self.shrink:
            decoded = Decoded(self.shrink(decoded.image), decoded.width, decoded.height)
            if cache:
                cache.put(key, decoded.image)
        return decoded

    def _tokenize(self, caption: str) -> torch.Tensor:
        tokens = self._tokens.get(caption)
        if tokens is None:
            tokens = self.tokenizer([caption])
            if len(self._tokens) < self.TOKEN_CACHE:
                self._tokens[caption] = tokens
        return tokens

    def make(self, decoded: Decoded, captions: list[str], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(uint8 pixels, tokens): the crop and the caption drawn from `seed`."""
        # a worker's RNG is its own; in the main process, leave the caller's RNG as it was. Only the CPU
        # generator is seeded: torch.manual_seed would also queue a CUDA seeding, with a stack trace, per call
        isolate = torch.random.fork_rng(devices=[]) if get_worker_info() is None else contextlib.nullcontext()
        with isolate:
            torch.default_generator.manual_seed(seed)
            pixels = self.pixel_transform(decoded.image)
        if self.all_captions:
            return pixels, self.tokenizer(captions)
        return pixels, self._tokenize(random.Random(seed).choice(captions))


class PairDataset(Dataset):
    """Decodes, augments and tokenizes one pair (`SampleMaker`). Keys are (index, seed) from `StepBatches`.

    A sample whose image cannot be decoded is replaced by the next decodable one, deterministically, so
    batches keep their size on every rank; the bad image is reported with the batch.
    """

    def __init__(self, pairs: PairSet, maker: SampleMaker) -> None:
        self.pairs = pairs
        self.maker = maker

    def __len__(self) -> int:
        return len(self.pairs)

    def _decode(self, ref: ImageRef) -> Decoded | Skipped:
        data = read_image_bytes(ref)
        return data if isinstance(data, Skipped) else self.maker.decode(data, describe_ref(ref))

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
        pixels, tokens = self.maker.make(decoded, self.pairs.captions[i], seed)
        return pixels, tokens, i, bad


Batch = tuple[torch.Tensor, torch.Tensor, list[int], list[tuple[str, str]], list]


def collate_pairs(items: list[tuple]) -> Batch:
    """Stack a batch: (pixels, texts, owners, bad, ids). With several captions per image the texts are
    concatenated and `owners` (one image index per text) says whose each is; `ids` names each sample
    (an index into the pairs, or a streamed sample's key)."""
    pixels = torch.stack([it[0] for it in items])
    texts = torch.cat([it[1] for it in items])
    owners = [k for k, it in enumerate(items) for _ in range(len(it[1]))]
    bad = [b for it in items for b in it[3]]
    return pixels, texts, owners, bad, [it[2] for it in items]


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
        g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, PERMUTATION))
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
