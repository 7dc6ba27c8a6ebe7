"""The search structure: vectors.faiss, a view of the catalogue's vectors that can always be rebuilt.

Which faiss index fits and how deep it must search are `ann`'s decisions; this module keeps the file
in step with the catalogue (`clipengine.index.store`). The file is written to a temporary name, fsynced
and renamed into place, then tagged in meta.sqlite with the generation it reflects, so a crash between
the two leaves a file that is merely behind: it is brought up to date by id-set difference with the live
rows (file ids are never reused), in memory for a reader and on disk for a writer. An index kind that
cannot delete (HNSW, re-ranking) keeps deleted ids until it is rebuilt; searches filter them out.

What the file is (kind, training sample, measured tuning, drift since training) is recorded beside the
generation as a `FaissState`, which `info`, the index report and the advice read. How it is chosen (a
memory budget, a factory, a recall target) is the `FaissPolicy`, kept in the manifest's "faiss" section.
`reindex` rebuilds the file from the stored vectors, with no image read again.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from clipengine.durable import replacing
from clipengine.errors import BadInput
from clipengine.index import ann
from clipengine.index.location import FAISS_FILE
from clipengine.index.store import IndexStore
from clipengine.progress import StageProgress

STATE_KEY = "faiss_state"
GENERATION_KEY = "faiss_generation"
RETUNE_AFTER = 0.2  # re-tune the depth once the count has moved by this fraction since the last tuning
# the policy's settings where the index names none: half the RAM, the automatic choice, recall@10 0.95
DEFAULT_POLICY = {"memory_budget": None, "factory": None, "target_recall": ann.TARGET_RECALL}
TextQueries = Callable[[int], np.ndarray]  # count -> (count, dim) text query vectors (clipengine.index.text_queries)


def _section(policy: dict) -> dict:
    """The manifest's "faiss" section for a resolved policy (vectors are normalised: inner product is cosine)."""
    return {"faiss_metric": "inner_product", "policy": policy}


@dataclass(frozen=True)
class FaissPolicy:
    """How the search structure is chosen; None leaves an existing index's setting as it is."""

    memory_budget: int | None = None  # bytes the faiss index may take (default: half the RAM)
    factory: str | None = None  # a faiss index_factory string, overriding the choice
    target_recall: float | None = None  # recall@10 vs exact that tuning must reach (default 0.95)

    def __post_init__(self) -> None:
        if self.target_recall is not None and not 0 < self.target_recall <= 1:
            raise BadInput("--target-recall must be in (0, 1], e.g. 0.95")
        if self.memory_budget is not None and self.memory_budget <= 0:
            raise BadInput("--memory-budget must be positive")

    def changes(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def check(self, dim: int) -> None:
        """Refuse a factory string faiss cannot build for `dim` now, not in the middle of a build."""
        if self.factory:
            ann.normalise_factory(self.factory, dim)

    def section(self, dim: int) -> dict:
        """The manifest's "faiss" section for a new index under this policy (defaults where it says None)."""
        self.check(dim)
        return _section({**DEFAULT_POLICY, **self.changes()})


@dataclass(frozen=True)
class Training:
    """The sample an index was trained on: what drift is measured against."""

    n_train: int  # 0 for kinds that need no training
    at_count: int  # live vectors at the time
    max_id: int  # the largest file id then: ids above it arrived since
    quantisation_error: float | None = None  # the sample's (IVF kinds): the baseline of `Drift.error_ratio`


@dataclass(frozen=True)
class Drift:
    """How far the data has moved from the trained structure, measured at each incremental save."""

    added_since_training: int
    stale_in_index: int  # deleted vectors still held by a kind that cannot delete
    error_ratio: float | None = None  # new vectors' quantisation error over the training sample's


@dataclass(frozen=True)
class FaissState:
    """What vectors.faiss is. An index never saved is an exact flat index."""

    kind: str = "flat"
    factory: str = "IDMap2,Flat"
    reason: str | None = None  # why this kind was chosen (ann.choose_index)
    estimated_bytes: int | None = None
    lists: int | None = None  # inverted lists, for IVF kinds
    trained: Training | None = None
    tuning: ann.Tuning | None = None  # on held-out images: the depth stored in the index, for image and id queries
    drift: Drift | None = None
    text_tuning: ann.Tuning | None = None  # on text queries (text_queries.py): the depth of text and terms queries

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FaissState:
        def part(kind: Any, value: dict | None) -> Any:
            if not value:
                return None
            names = {f.name for f in dataclasses.fields(kind)}
            return kind(**{k: v for k, v in value.items() if k in names})

        return cls(kind=data["kind"], factory=data["factory"], reason=data.get("reason"),
                   estimated_bytes=data.get("estimated_bytes"), lists=data.get("lists"),
                   trained=part(Training, data.get("trained")), tuning=part(ann.Tuning, data.get("tuning")),
                   drift=part(Drift, data.get("drift")), text_tuning=part(ann.Tuning, data.get("text_tuning")))

    def tunings(self) -> dict[str, ann.Tuning]:
        """Each query kind's measured tuning ("image", "text"), for those measured."""
        return {kind: t for kind, t in (("image", self.tuning), ("text", self.text_tuning)) if t is not None}

    def describe(self) -> str:
        """One line: the kind, and for each kind of query its tuned depth and the recall and latency measured."""
        text = f"{self.kind} ({self.factory})"
        tunings = self.tunings()
        for kind, tuning in tunings.items():
            depth = f"{tuning.param} {tuning.value}: " if tuning.param else ""
            if tuning.k_factor:
                depth = f"{tuning.param} {tuning.value}, re-ranking {tuning.k_factor}x: "
            text += (f"{';' if kind == 'text' else ','} {kind + ' queries ' if len(tunings) > 1 else ''}{depth}"
                     f"recall@10 {tuning.recall_at_10:.3f} vs exact, {tuning.p50_ms:.2f} ms/query p50 "
                     f"({tuning.p99_ms:.2f} p99)")
            if not tuning.reached:
                text += f", target {tuning.target} not reached"
        if self.tuning:
            text += f"; at {self.tuning.at_count:,} vectors"
        return text

    def advice(self, count: int, named_factory: bool, fix: str) -> list[str]:
        """What the measurements say should be done about the structure: drifted, outgrown, full of deleted
        vectors, or off its recall target. `fix` is the command that does it."""
        advice = []
        drift = self.drift or Drift(0, 0)
        if drift.error_ratio and drift.error_ratio > ann.DRIFT_RATIO:
            advice.append(f"new vectors sit {drift.error_ratio:.1f}x further from the trained lists than the training "
                          f"sample did (data has drifted): {fix} to retrain")
        if self.lists and not named_factory and ann.n_lists(count) >= 4 * self.lists:  # a named factory stays
            advice.append(f"{count:,} vectors have outgrown {self.lists} inverted lists (searches slow down): {fix}")
        if drift.stale_in_index and drift.stale_in_index > 0.2 * max(count, 1):
            advice.append(f"{drift.stale_in_index:,} deleted vectors still take space in the index: {fix} to drop them")
        for kind, tuning in self.tunings().items():
            if not tuning.reached:
                advice.append(f"measured recall@10 of {kind} queries is {tuning.recall_at_10:.3f}, under the target "
                              f"{tuning.target}: {fix} with a larger --memory-budget or another --faiss")
        return advice


class SearchStructure:
    """vectors.faiss of one open index: read it for searching, or bring it up to date after commits."""

    def __init__(self, store: IndexStore):
        self.store = store
        self.file = store.path / FAISS_FILE

    @property
    def policy(self) -> dict:
        """How the structure is chosen: a memory budget (bytes; None: half the RAM), a factory string that
        overrides the choice, and the recall@10 that tuning must reach."""
        recorded = self.store.manifest.get("faiss", {}).get("policy", {})
        return {key: recorded.get(key, default) for key, default in DEFAULT_POLICY.items()}

    def set_policy(self, policy: FaissPolicy) -> bool:
        """Lay `policy` over the index's (its None fields leave a setting alone). Returns whether it changed;
        the file follows at the next `save(rebuild=True)`."""
        policy.check(self.store.dim)
        new = {**self.policy, **policy.changes()}
        if new == self.policy:
            return False
        self.store.set_manifest_section("faiss", {**self.store.manifest.get("faiss", {}), **_section(new)})
        return True

    @property
    def state(self) -> FaissState:
        recorded = self.store.read_meta(STATE_KEY)
        return FaissState.from_dict(json.loads(recorded)) if recorded else FaissState()

    @property
    def current(self) -> bool:
        """Whether the file on disk reflects the catalogue's last commit."""
        return self.file.is_file() and int(self.store.read_meta(GENERATION_KEY) or -1) == self.store.generation

    def view(self, *, mmap: bool = False) -> ann.SearchableIndex:
        """The faiss index of every searchable file, current with the catalogue, ready to search.

        Normally just read (with `mmap`, mapped rather than loaded: an index bigger than memory is served
        from the page cache); rebuilt in memory, never written, if the file is behind, so that a read-only
        command never modifies the index.
        """
        dim = self.store.dim
        ann.configure_threads(dim)
        index = self._read(mmap) if self.current else None
        if index is None:
            index = self._read() or ann.new_index("IDMap2,Flat", dim)
            return ann.SearchableIndex(index, self._synced(index, self.store.live_ids()), self.store.gather)
        excluded = None  # the live ids are read only when needed: a million of them cost a third of a second
        if not ann.can_remove(index):
            excluded = np.setdiff1d(ann.index_ids(index), self.store.live_ids(), assume_unique=True)
        text = self.state.text_tuning
        return ann.SearchableIndex(index, excluded, self.store.gather, text.depth if text and text.value else None)

    def save(self, *, rebuild: bool = False, progress: StageProgress | None = None,
             text_queries: TextQueries | None = None) -> bool:
        """Bring the file up to date with the catalogue, atomically. Returns False when it already was.

        The structure follows the policy: while the chosen kind stays the same, new vectors are added to
        the trained index and deleted ones removed (no retraining), and the search depth is re-tuned once
        the count has moved by a fifth. When the count or the policy calls for another kind (or `rebuild`),
        the index is trained afresh on a random sample and tuned on held-out vectors. An approximate index
        is also tuned on `text_queries(count)`, text vectors from the index's own text tower (without them,
        text queries keep the depth they had, or search at the image queries' depth).
        """
        import faiss

        store = self.store
        if not store.writable:
            raise RuntimeError("index opened read-only")
        ann.configure_threads(store.dim)
        on_disk = None if rebuild else self._read()
        if on_disk is not None and self.current:
            return False
        generation, live, state = store.generation, store.live_ids(), self.state
        policy = self.policy
        plan = ann.choose_index(live.size, store.dim, policy["memory_budget"], policy["factory"])
        same_kind = plan.kind == state.kind and (not policy["factory"] or plan.factory == state.factory)
        if on_disk is None or not same_kind:
            index, state = self._build(plan, live, generation, progress, text_queries)
        else:
            index = on_disk
            stale = self._synced(index, live)
            state = self._refreshed(index, state, live, stale, generation, text_queries)
        with replacing(self.file) as tmp:
            faiss.write_index(index, str(tmp))
        store.write_meta(**{STATE_KEY: json.dumps(state.to_dict()), GENERATION_KEY: str(generation)})
        return True

    # ---- reading and syncing -------------------------------------------------------------------

    def _read(self, mmap: bool = False):
        """The file as it is on disk, or None if it is missing, damaged or of another dimension."""
        try:
            index = ann.read_index(str(self.file), mmap_factory=self.state.factory if mmap else None)
        except RuntimeError:
            return None
        return index if index.d == self.store.dim else None

    def _synced(self, index, live: np.ndarray) -> np.ndarray:
        """Bring a faiss index up to date with the live rows, by id-set difference, in place. Returns the
        stale ids it still holds: indexes that cannot delete keep them, to be filtered out of results."""
        import faiss

        have = ann.index_ids(index)
        stale = np.setdiff1d(have, live, assume_unique=True)
        if stale.size and ann.can_remove(index):
            index.remove_ids(faiss.IDSelectorBatch(stale))
            stale = stale[:0]
        ann.add_chunks(index, self.store.vectors_of(np.setdiff1d(live, have, assume_unique=True)))
        return stale

    # ---- building, tuning, drift ---------------------------------------------------------------

    def _build(self, plan: ann.IndexPlan, live: np.ndarray, seed: int, progress: StageProgress | None,
               text_queries: TextQueries | None) -> tuple[Any, FaissState]:
        store = self.store
        index = ann.new_index(plan.factory, store.dim)
        train_ids = ann.sample_ids(live, ann.training_size(plan.factory, live.size), seed)
        if progress:
            progress("training", 0, 1)
        sample = ann.train_index(index, store.gather(train_ids)[1]) if train_ids.size else {"n_train": 0}
        ann.add_chunks(index, store.vectors_of(live),
                       on_added=(lambda added: progress("adding", added, live.size)) if progress else None)
        trained = Training(n_train=sample["n_train"], at_count=int(live.size), max_id=int(live.max()) if live.size else 0,
                           quantisation_error=sample.get("quantisation_error"))
        if progress:
            progress("tuning", 0, 1)
        text_tuning = self._tune_text(index, live, text_queries)  # first: the image tuning's depth stays in the index
        return index, FaissState(kind=plan.kind, factory=plan.factory, reason=plan.reason, estimated_bytes=plan.bytes,
                                 lists=ann.list_count(index), trained=trained,
                                 tuning=self._tune(index, live, train_ids, seed), text_tuning=text_tuning)

    def _tune_text(self, index, live: np.ndarray, text_queries: TextQueries | None) -> ann.Tuning | None:
        """Tune an approximate index on text queries (None for an exact one: every query is exact there)."""
        if text_queries is None or ann.depth_name(index) is None or live.size < 2:
            return None
        vectors = np.ascontiguousarray(text_queries(ann.TUNING_QUERIES), dtype=np.float32)
        truth = ann.GroundTruth.compute(vectors, np.full(len(vectors), -1), self.store.vectors_of(live))
        return ann.tune(index, truth, self.policy["target_recall"])

    def _tune(self, index, live: np.ndarray, train_ids: np.ndarray, seed: int) -> ann.Tuning | None:
        """Tune the depth on vectors held out from training (all vectors, when training took them all)."""
        if live.size < 2:
            return None
        query_ids = ann.sample_ids(live, ann.TUNING_QUERIES, seed + 1, exclude=train_ids)
        if query_ids.size < min(ann.TUNING_QUERIES, live.size) // 2:
            query_ids = ann.sample_ids(live, ann.TUNING_QUERIES, seed + 1)
        truth = ann.GroundTruth.compute(self.store.gather(query_ids)[1], query_ids, self.store.vectors_of(live))
        return ann.tune(index, truth, self.policy["target_recall"])

    def _refreshed(self, index, state: FaissState, live: np.ndarray, stale: np.ndarray, seed: int,
                   text_queries: TextQueries | None) -> FaissState:
        """After an incremental sync: re-tune if the count has moved enough, and measure drift."""
        tuning, text_tuning = state.tuning, state.text_tuning
        tuned_at = tuning.at_count if tuning else 0
        if abs(live.size - tuned_at) > RETUNE_AFTER * max(tuned_at, 1):
            text_tuning = self._tune_text(index, live, text_queries) or text_tuning
            tuning = self._tune(index, live, np.empty(0, np.int64), seed)
        new = live[live > (state.trained.max_id if state.trained else 0)]
        drift = Drift(added_since_training=int(new.size), stale_in_index=int(stale.size))
        baseline = state.trained.quantisation_error if state.trained else None
        if baseline and new.size:
            sample = ann.sample_ids(new, 2000, seed)
            error = ann.quantisation_error(index, self.store.gather(sample)[1])
            drift = dataclasses.replace(drift, error_ratio=round(error / baseline, 3) if error is not None else None)
        return dataclasses.replace(state, tuning=tuning, drift=drift, text_tuning=text_tuning)
