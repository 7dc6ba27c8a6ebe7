"""Training on streamed shards: lanes, shuffle windows, and a position that resumes exactly.

The data of an epoch is cut into **lanes**, one per data worker of every process (lanes = processes x
workers). Step s's global batch is the s-th sub-batch of every lane, lane 0 first, each of
``batch / lanes`` samples; process r holds lanes ``r*W .. r*W+W-1``, which is its contiguous slice of that
batch. So the global batch of a step depends on the number of lanes, not on how they are spread over
processes: 2 processes x 2 workers train on exactly the batches of 1 process x 4 workers (tested).

A lane is a sequence of shards read front to back:
- **not resampled**: the epoch's shards in an order seeded by (seed, epoch), their samples laid end to end;
  lane g takes the g-th of `lanes` equal, contiguous ranges of that stream (cut mid-shard where it falls, so
  each lane has exactly its quota). Every sample is seen once per epoch; the fewer than `batch` samples
  left over at the end wait for another epoch, as the last incomplete batch of a map-style epoch does.
  This needs each shard's sample count (`clipengine.shards.read_sizes`).
- **resampled**: shard k of lane g is drawn, with replacement, by a hash of (seed, epoch, g, k);
  `--samples-per-epoch` sets the length of an epoch.

A lane shuffles in **windows**: its next `window` samples are read (bytes, not decoded), permuted by a seed
of (seed, epoch, lane, window number) and given out in that order. A lane's whole state is therefore
(the shard it stands in at the start of its current window, the samples of that shard read before it, the
samples it has given out): `LaneState`, three integers. Resuming re-opens that shard, skips to the offset,
refills the window, permutes it with the same seed, and skips what was given out. A sample's crop and
caption are seeded by (seed, epoch, shard file name, key), so the same shards give the same samples from
S3, over HTTP or from a disk. A reservoir buffer (webdataset's) would have to save the buffer's bytes to
resume; a window is re-read instead, at most `window` samples.

A shard that fails (404, timeout, reset, a stream that stops) is retried `retries` times with backoff
from where it stopped, then skipped; the lane reads on into the following shards to keep its quota (a
lane is never short, so processes stay in step), and the skipped shard is reported with the batch.
"""

from __future__ import annotations

import bisect
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import accumulate

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from clipengine.errors import BadInput
from clipengine.images import Decoded
from clipengine.shards import ShardFault, ShardStream, image_and_captions, shard_label, tar_samples
from clipengine.training.data import Batch, SampleMaker, collate_pairs, sample_seed

DEFAULT_WINDOW = 10_000  # samples a lane shuffles at a time (TrainConfig.shuffle_buffer)
EMPTY_SHARDS_IN_A_ROW = 20  # a lane that reads this many shards without a sample stops the run
PREFETCH = 4  # sub-batches each worker keeps ready


@dataclass(frozen=True)
class FaultPolicy:
    """How a failing shard is treated: `retries` more tries, `backoff` x 2^try seconds apart, each try
    stalled after `timeout` seconds without a byte."""

    retries: int = 3
    backoff: float = 1.0
    timeout: float = 60.0


@dataclass(frozen=True)
class LaneState:
    """Where a lane stands: at the start of its current window it was in its `shard`-th shard, `offset`
    samples into it; it has given out `given` samples this epoch."""

    shard: int
    offset: int
    given: int

    def to_list(self) -> list[int]:
        return [self.shard, self.offset, self.given]


@dataclass(frozen=True)
class StreamLayout:
    """What the lanes of every epoch are, from the run's settings alone (every process computes the same)."""

    shards: tuple[str, ...]
    sizes: tuple[int, ...] | None  # each shard's samples; None: unknown (resampled only)
    seed: int
    global_batch: int
    lanes: int
    resampled: bool
    samples_per_epoch: int | None
    window: int = DEFAULT_WINDOW

    def __post_init__(self) -> None:
        if self.global_batch % self.lanes:
            raise BadInput(f"--batch-size {self.global_batch} must be divisible by the {self.lanes} data lanes "
                           "(processes x workers) that stream it")
        if self.window < 1:
            raise BadInput("--shuffle-buffer must be at least 1")
        if self.resampled:
            if not self.samples_per_epoch:
                raise BadInput("--resampled draws shards with replacement: --samples-per-epoch sets how long an epoch is")
        elif self.samples_per_epoch:
            raise BadInput("without --resampled an epoch is every sample once; --samples-per-epoch sets the "
                           "length of a resampled epoch (add --resampled)")
        elif self.sizes is None:
            raise BadInput("streaming without --resampled needs each shard's sample count: sizes.json beside the "
                           "shards (open_clip's) or img2dataset's <shard>_stats.json; or add --resampled "
                           "--samples-per-epoch N")
        if self.steps_per_epoch < 1:
            raise BadInput(f"--batch-size {self.global_batch} is larger than an epoch "
                           f"({self.samples_in_epoch} samples)")

    @property
    def samples_in_epoch(self) -> int:
        if self.resampled:
            assert self.samples_per_epoch is not None
            return self.samples_per_epoch
        assert self.sizes is not None
        return sum(self.sizes)

    @property
    def steps_per_epoch(self) -> int:
        return self.samples_in_epoch // self.global_batch

    @property
    def lane_batch(self) -> int:
        return self.global_batch // self.lanes

    @property
    def quota(self) -> int:
        """Samples each lane gives out in an epoch."""
        return self.steps_per_epoch * self.lane_batch

    def order(self, epoch: int) -> list[int]:
        """The shards of an epoch in their seeded order (not resampled)."""
        order = list(range(len(self.shards)))
        random.Random(sample_seed(self.seed, epoch, "shards")).shuffle(order)
        return order

    def shard_of(self, epoch: int, lane: int, k: int, order: list[int] | None) -> tuple[int, int | None]:
        """The lane's k-th shard (an index into `shards`) and how many of its samples count (None: all)."""
        if self.resampled:
            return sample_seed(self.seed, epoch, f"draw:{lane}:{k}") % len(self.shards), None
        assert order is not None and self.sizes is not None
        index = order[k % len(order)]
        return index, self.sizes[index]

    def start(self, epoch: int, lane: int) -> LaneState:
        """Where a lane starts an epoch."""
        if self.resampled:
            return LaneState(0, 0, 0)
        assert self.sizes is not None
        ends = list(accumulate(self.sizes[i] for i in self.order(epoch)))
        begin = lane * self.quota
        k = bisect.bisect_right(ends, begin)
        return LaneState(k, begin - (ends[k - 1] if k else 0), 0)


def shard_samples(shard: str, skip: int, limit: int | None, policy: FaultPolicy,
                  faults: list[tuple[str, str]]) -> Iterator[tuple[int, str, dict[str, bytes]]]:
    """(samples read so far, key, members) for the samples of one shard after the first `skip` (at most
    `limit` in all). A fault is retried from where it stopped; after `policy.retries` retries the rest of the
    shard is given up and (shard, reason) appended to `faults`."""
    done = skip
    reason = ""
    for attempt in range(policy.retries + 1):
        if attempt:
            time.sleep(policy.backoff * 2 ** (attempt - 1))
        try:
            with ShardStream(shard, policy.timeout) as stream:
                read = 0
                for key, parts in tar_samples(stream):
                    if limit is not None and read >= limit:
                        break
                    read += 1
                    if read > done:
                        done = read
                        yield read, key, parts
            if limit is not None and read < limit:
                raise ShardFault(f"it ended after {read} of its {limit} samples")
            return
        except ShardFault as e:
            reason = str(e)
    faults.append((shard, f"{reason} (after {policy.retries + 1} tries)"))


@dataclass
class RawSample:
    name: str  # shard file name / key: seeds and reports
    parts: dict[str, bytes]
    shard: int  # the lane's shard position after this sample ...
    offset: int  # ... and its offset there


class Lane:
    """One lane's samples of one epoch, read from a `LaneState` on."""

    def __init__(self, layout: StreamLayout, epoch: int, lane: int, policy: FaultPolicy) -> None:
        self.layout, self.epoch, self.lane, self.policy = layout, epoch, lane, policy
        self.order = None if layout.resampled else layout.order(epoch)
        self.faults: list[tuple[str, str]] = []

    def samples(self, k: int, offset: int) -> Iterator[RawSample]:
        """The lane's raw samples from its k-th shard, `offset` samples in (endless: the shards wrap)."""
        empty = 0
        while True:
            index, limit = self.layout.shard_of(self.epoch, self.lane, k, self.order)
            shard = self.layout.shards[index]
            label = shard_label(shard)
            got = False
            for read, key, parts in shard_samples(shard, offset, limit, self.policy, self.faults):
                got = True
                yield RawSample(f"{label}/{key}", parts, k, read)
            empty = 0 if got else empty + 1
            if empty >= EMPTY_SHARDS_IN_A_ROW:
                where = f" (last: {self.faults[-1][0]}: {self.faults[-1][1]})" if self.faults else ""
                raise BadInput(f"{empty} shards in a row gave no sample{where}")
            k, offset = k + 1, 0


class StreamedPairs(IterableDataset):
    """The sub-batches of this process's lanes, one lane per DataLoader worker (or one lane in-process).

    Each item is a collated sub-batch plus what the main process needs: the lane, its `LaneState` after the
    sub-batch, and the shards skipped while reading it.
    """

    def __init__(self, layout: StreamLayout, maker: SampleMaker, *, rank: int, lanes_here: int,
                 policy: FaultPolicy) -> None:
        self.layout, self.maker, self.rank, self.lanes_here, self.policy = layout, maker, rank, lanes_here, policy
        self.epoch = 0
        self.states: dict[int, LaneState] = {}

    def set_position(self, epoch: int, states: dict[int, LaneState]) -> None:
        """Where the next iteration starts; lanes missing from `states` start the epoch."""
        self.epoch, self.states = epoch, dict(states)

    def __iter__(self) -> Iterator[tuple]:
        info = get_worker_info()
        lane = self.rank * self.lanes_here + (info.id if info is not None else 0)
        state = self.states.get(lane) or self.layout.start(self.epoch, lane)
        reader = Lane(self.layout, self.epoch, lane, self.policy)
        items: list[tuple] = []
        reported = 0
        for item, after in self._given(reader, state):
            items.append(item)
            if len(items) == self.layout.lane_batch:
                faults, reported = reader.faults[reported:], len(reader.faults)
                yield (*collate_pairs(items), {"lane": lane, "state": after.to_list(), "faults": faults})
                items = []

    def _given(self, reader: Lane, state: LaneState) -> Iterator[tuple[tuple, LaneState]]:
        """(sample, the lane's state after it) for the rest of the lane's quota this epoch."""
        layout, given = self.layout, state.given
        source = reader.samples(state.shard, state.offset)
        while given < layout.quota:
            number, begin = given // layout.window, given // layout.window * layout.window
            window = [next(source) for _ in range(min(layout.window, layout.quota - begin))]
            start = LaneState(window[0].shard, window[0].offset - 1, 0)  # re-read from its first sample
            after = LaneState(window[-1].shard, window[-1].offset, 0)
            order = list(range(len(window)))
            random.Random(sample_seed(layout.seed, self.epoch, f"window:{reader.lane}:{number}")).shuffle(order)
            for position in range(given - begin, len(window)):
                item = self._make(window, order, position)
                given += 1
                at = after if position == len(window) - 1 else start
                yield item, LaneState(at.shard, at.offset, given)

    def _make(self, window: list[RawSample], order: list[int], position: int) -> tuple:
        """The sample at `position` of the permuted window, or, when it cannot be used, the next usable one."""
        bad: list[tuple[str, str]] = []
        seed = sample_seed(self.layout.seed, self.epoch, window[order[position]].name)
        for attempt in range(len(window)):
            raw = window[order[(position + attempt) % len(window)]]
            content = image_and_captions(raw.parts)
            if isinstance(content, str):
                bad.append((raw.name, content))
                continue
            decoded = self.maker.decode(content[0], raw.name)
            if isinstance(decoded, Decoded):
                pixels, tokens = self.maker.make(decoded, content[1], seed)
                return pixels, tokens, raw.name, bad
            bad.append((raw.name, decoded.reason))
        raise BadInput(f"no sample in a window of {len(window)} can be used (first: {bad[0][0]}: {bad[0][1]})")


@dataclass
class StreamedBatches:
    """The steps of an epoch on this process: one sub-batch from each of its lanes, in lane order, joined.

    Keeps every lane's latest `LaneState` (for checkpoints) and the shards skipped so far.
    """

    dataset: StreamedPairs
    workers: int
    pin_memory: bool
    states: dict[int, LaneState] = field(default_factory=dict)
    state_epoch: int = -1
    faults: dict[str, str] = field(default_factory=dict)

    def restore(self, epoch: int, states: dict[int, LaneState]) -> None:
        self.state_epoch, self.states = epoch, dict(states)

    def epoch(self, epoch: int, start_step: int) -> Iterator[Batch]:
        layout = self.dataset.layout
        if self.state_epoch != epoch:
            self.state_epoch, self.states = epoch, {}
        self.dataset.set_position(epoch, self.states)
        loader = DataLoader(self.dataset, batch_size=None, num_workers=self.workers, pin_memory=self.pin_memory,
                            prefetch_factor=PREFETCH if self.workers else None)
        parts_per_step = self.dataset.lanes_here
        first = self.dataset.rank * parts_per_step
        items = iter(loader)
        for _ in range(start_step, layout.steps_per_epoch):
            parts = [next(items) for _ in range(parts_per_step)]
            for j, part in enumerate(parts):
                meta = part[5]
                if meta["lane"] != first + j:  # the DataLoader hands workers' items round-robin, in order
                    raise RuntimeError(f"lane {meta['lane']} came where lane {first + j} was due")
                self.states[meta["lane"]] = LaneState(*meta["state"])
                self.faults.update(meta["faults"])
            yield join(parts)

    def lane_states(self) -> dict[int, list[int]]:
        return {lane: state.to_list() for lane, state in self.states.items()}


def join(parts: list[tuple]) -> Batch:
    """Sub-batches (each a collated batch and its metadata) as one batch, in order."""
    pixels = torch.cat([p[0] for p in parts])
    texts = torch.cat([p[1] for p in parts])
    owners: list[int] = []
    bad: list[tuple[str, str]] = []
    ids: list = []
    offset = 0
    for p in parts:
        owners.extend(o + offset for o in p[2])
        offset += len(p[0])
        bad.extend(p[3])
        ids.extend(p[4])
    return pixels, texts, owners, bad, ids


def lanes_from_checkpoint(saved: dict, layout: StreamLayout, steps_into_epoch: int) -> dict[int, LaneState]:
    """The lanes' states saved with a checkpoint, checked against this run's lanes.

    Mid-epoch, the lanes (processes x workers) must be as many as when the run was saved; how they are
    spread over processes may change (2 x 2 resumes as 1 x 4). At an epoch's end nothing is carried over."""
    if steps_into_epoch == 0:
        return {}
    if saved.get("lanes_total") != layout.lanes:
        raise BadInput(f"this run streams its data in {saved.get('lanes_total')} lanes (processes x workers) and "
                       f"stopped mid-epoch: resume it with processes x workers = {saved.get('lanes_total')} "
                       f"(now {layout.lanes}), or from a checkpoint at an epoch's end")
    return {int(lane): LaneState(*state) for lane, state in saved["lanes"].items()}

