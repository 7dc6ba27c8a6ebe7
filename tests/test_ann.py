"""Approximate indexes: the choice rules, tuning to a recall target, growing and shrinking each kind
without retraining, drift and reindex, memory-mapped serving, threads and the BLAS threshold."""

from __future__ import annotations

import json

import numpy as np
import pytest
from synthetic import clustered_unit_vectors

from clipengine.errors import BadInput
from clipengine.index import ann
from clipengine.index.faiss_view import FaissPolicy, SearchStructure
from clipengine.index.info import index_info
from clipengine.index.location import FAISS_FILE
from clipengine.index.pipeline import reindex
from clipengine.index.search import Searcher
from clipengine.index.store import FileRecord, IndexStore
from clipengine.sizes import parse_size

DIM = 32


def source():
    return {"source": "random", "arch": "tiny", "seed": 0, "identity": "random:tiny:seed0", "embed_dim": DIM,
            "preprocess": {}}


def records(vectors: np.ndarray, start: int = 0) -> list[FileRecord]:
    return [FileRecord(f"/photos/{start + i:06d}.jpg", 1, start + i, f"h{start + i}", 4, 3, v)
            for i, v in enumerate(vectors)]


def make_store(tmp_path, vectors: np.ndarray, factory: str | None = None, **policy) -> IndexStore:
    store = IndexStore.create(tmp_path / "idx", source(), FaissPolicy(factory=factory, **policy).section(DIM))
    store.commit(records(vectors))
    SearchStructure(store).save()
    return store


# ---- choosing ---------------------------------------------------------------------------------


def test_small_collections_get_exact_search_and_large_ones_an_ann_index_that_fits():
    assert ann.choose_index(10_000, 512).kind == "flat"
    assert ann.choose_index(100_000, 512).kind == "ivf-pq-refine"
    assert ann.choose_index(1_000_000, 512, 4 * 10**9).kind == "ivf-pq-refine"
    assert ann.choose_index(1_000_000, 512, 2_100_000_000).kind == "ivf-flat"
    assert ann.choose_index(1_000_000, 512, 1_500_000_000).kind == "ivf-fp16"
    assert ann.choose_index(1_000_000, 512, 10**9).kind == "ivf-sq8"
    pq = ann.choose_index(1_000_000, 512, 200 * 10**6)
    assert pq.kind == "ivf-pq" and pq.factory.endswith("PQ64") and pq.bytes <= 200 * 10**6
    with pytest.raises(BadInput, match="memory budget"):
        ann.choose_index(1_000_000, 512, 10**6)


def test_list_counts_follow_the_square_root_rule_and_an_hnsw_quantiser_comes_with_many_lists():
    for n in (60_000, 250_000, 1_000_000, 10_000_000):
        assert 4 * np.sqrt(n) / 1.5 <= ann.n_lists(n) <= 16 * np.sqrt(n)
    assert ann.choose_index(500_000, 512).factory == "IDMap2,IVF2048,PQ256x4fs,RFlat"
    assert ann.choose_index(2_000_000, 512, 4_300_000_000).factory == "IVF4096,Flat"
    assert ann.choose_index(20_000_000, 512, 50_000_000_000).factory == "IDMap2,IVF16384_HNSW32,PQ256x4fs,RFlat"


def test_a_factory_string_overrides_the_choice_and_gets_ids():
    assert ann.choose_index(100, 64, factory="HNSW16").factory == "IDMap2,HNSW16"
    assert ann.choose_index(100, 64, factory="IVF64,SQ8").factory == "IVF64,SQ8"
    refine = ann.choose_index(100, 64, factory="IVF64,PQ32x4fs,RFlat")
    assert refine.factory == "IDMap2,IVF64,PQ32x4fs,RFlat" and refine.kind == "ivf-pq-refine"
    with pytest.raises(BadInput, match="index_factory"):
        ann.choose_index(100, 64, factory="NotAnIndex")


def test_memory_sizes_parse():
    assert parse_size("4GB", "--memory-budget") == 4 * 10**9 and parse_size("512MiB", "--memory-budget") == 512 * 2**20
    for bad in ("lots", "-1GB", "4 parsecs"):
        with pytest.raises(BadInput, match="--memory-budget"):
            parse_size(bad, "--memory-budget")


def test_training_samples_are_random_not_the_first_vectors():
    ids = np.arange(100_000)
    sample = ann.sample_ids(ids, 1000, seed=0)
    assert sample.size == 1000 and sample.max() > 90_000 and sample.min() < 10_000
    held_out = ann.sample_ids(ids, 500, seed=1, exclude=sample)
    assert not np.intersect1d(held_out, sample).size


# ---- tuning -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clustered():
    vectors = clustered_unit_vectors(20_000, DIM, clusters=200, seed=3)
    queries = clustered_unit_vectors(400, DIM, clusters=200, seed=3, draw=1)
    no_self = np.full(200, -1)
    chunks = lambda: ann.iter_array_chunks(np.arange(len(vectors)), vectors)  # noqa: E731
    tune = ann.GroundTruth.compute(queries[:200], no_self, chunks())
    test = ann.GroundTruth.compute(queries[200:], no_self, chunks())
    return vectors, tune, test


@pytest.mark.parametrize("factory", ["IVF128,Flat", "IDMap2,HNSW16"])
@pytest.mark.parametrize("target", [0.8, 0.97])
def test_tuning_picks_the_smallest_depth_that_reaches_the_target(clustered, factory, target):
    vectors, tune_truth, test_truth = clustered
    index = ann.new_index(factory, DIM)
    ann.train_index(index, vectors[ann.sample_ids(np.arange(len(vectors)), 128 * 40, seed=0)])
    index.add_with_ids(vectors, np.arange(len(vectors)))
    tuning = ann.tune(index, tune_truth, target)
    assert tuning.reached and tuning.recall_at_10 > tuning.recall_low >= target  # the bound, not the mean, decides
    shallower = tuning.value - max(1, tuning.value // 8)  # tuning bisects to within an eighth
    assert tuning.value == 1 or ann.confident_recall(ann.recalls_at(index, tune_truth, shallower)) < target
    assert ann.recall_at(index, test_truth, None) >= target - 0.02  # the depth is stored in the index itself
    assert tuning.p50_ms > 0 and tuning.p99_ms > 0  # measured (their order is a tautology of percentiles)


def test_confident_recall_is_the_mean_less_its_uncertainty():
    assert ann.confident_recall(np.ones(500)) == 1.0  # no spread: no doubt
    recalls = np.r_[np.ones(451), np.full(49, 0.9)]  # mean 0.9902: 95% sure of 0.9895 on 500 queries
    assert ann.confident_recall(recalls) == pytest.approx(recalls.mean() - 1.645 * recalls.std(ddof=1) / np.sqrt(500))
    spread = np.r_[np.ones(400), np.full(100, 0.755)]  # mean 0.951, as a lucky sample of a 0.945 index reads
    assert spread.mean() >= 0.95 > ann.confident_recall(spread)  # tuning would go deeper
    assert ann.confident_recall(np.tile(spread, 4)) < 0.95 < ann.confident_recall(np.tile(spread, 400))  # more queries, less doubt


def test_recall_counts_ties_at_rank_k_as_hits():
    truth = ann.GroundTruth(np.zeros((1, 2), np.float32), np.array([-1]),
                            np.array([[0.9, 0.5, 0.5]], np.float32), np.array([[7, 8, 9]]))
    assert truth.recall(np.array([[7, 9]]), k=2) == 1.0  # 9 ties with 8 at rank 2
    assert truth.recall(np.array([[7, 3]]), k=2) == 0.5


# ---- growing and shrinking every kind through the store -------------------------------------

KINDS = {"flat": None, "flat-fp16": "SQfp16", "hnsw": "HNSW16", "ivf-flat": "IVF32,Flat",
         "ivf-fp16": "IVF32,SQfp16", "ivf-sq8": "IVF32,SQ8", "ivf-pq": "IVF32,PQ8", "ivf-pq-refine": "IVF32,PQ16x4fs,RFlat"}


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_grows_without_retraining_and_never_returns_a_deleted_file(tmp_path, kind):
    vectors = clustered_unit_vectors(3000, DIM, clusters=30, seed=1)
    with make_store(tmp_path, vectors[:2500], KINDS[kind]) as store:
        state = SearchStructure(store).state
        tuning = state.tuning
        assert state.kind == kind and tuning.reached == (tuning.recall_at_10 >= tuning.target)
        assert tuning.reached or kind == "ivf-pq"  # PQ8 without re-ranking cannot reach 0.95 here
        queries = clustered_unit_vectors(200, DIM, clusters=30, seed=1, draw=1)  # not in the index
        exact = np.argsort(-(queries @ vectors[:2500].T), axis=1)[:, :10] + 1  # file ids are rows + 1
        _, found = SearchStructure(store).view().search(queries, 10)
        measured = np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found, exact, strict=True)])
        if kind == "hnsw":  # a graph finds an indexed vector more easily than a new query: its tuning, measured on
            # indexed vectors, overstates what new queries get (known; tuning on the queries users send is issue 24)
            assert measured < tuning.recall_at_10 - 0.05, (measured, tuning)
        else:
            assert measured >= tuning.recall_at_10 - 0.05, (measured, tuning)  # searches get what the tuning recorded
        trained = state.trained
        doomed = store.ids_of_paths(["/photos/000005.jpg", "/photos/000006.jpg"])
        store.commit(records(vectors[2500:], start=2500), remove_ids=list(doomed.values()))
        SearchStructure(store).save()
        assert SearchStructure(store).state.trained == trained  # added and removed without retraining
        new_id = store.ids_of_paths(["/photos/002700.jpg"])["/photos/002700.jpg"]
    with Searcher(tmp_path / "idx") as searcher:
        assert searcher.faiss.ntotal == 2998
        for i in (5, 6):
            assert all(h.path != f"/photos/{i:06d}.jpg" for h in searcher.search_vector(vectors[i], 50))
        assert new_id in [h.id for h in searcher.search_vector(vectors[2700], 10)]


def test_a_kind_change_as_the_collection_grows_retrains(tmp_path, monkeypatch):
    monkeypatch.setattr(ann, "FLAT_MAX", 1000)
    vectors = clustered_unit_vectors(3000, DIM, clusters=30, seed=2)
    with make_store(tmp_path, vectors[:800]) as store:
        assert SearchStructure(store).state.kind == "flat"
        store.commit(records(vectors[800:], start=800))
        SearchStructure(store).save()
        state = SearchStructure(store).state
        assert state.kind == "ivf-pq-refine" and state.trained.n_train > 0 and state.tuning.reached


def text_like(count: int) -> np.ndarray:
    """Text queries for stores of made-up vectors (the tiny model's own text tower has another dimension)."""
    return clustered_unit_vectors(count, DIM, clusters=30, seed=4, draw=2)


def test_drift_is_measured_and_reindex_retrains(tmp_path):
    here = clustered_unit_vectors(3000, DIM, clusters=30, seed=4)
    elsewhere = -clustered_unit_vectors(2000, DIM, clusters=30, seed=5)  # a part of the space training never saw
    with make_store(tmp_path, here, "IVF32,Flat") as store:
        store.commit(records(elsewhere, start=3000))
        SearchStructure(store).save()
        drift = SearchStructure(store).state.drift
    assert drift.added_since_training == 2000 and drift.error_ratio > ann.DRIFT_RATIO
    assert any("drifted" in a and "clipengine reindex" in a for a in index_info(tmp_path / "idx").advice)
    reindex(tmp_path / "idx", FaissPolicy(target_recall=0.9), text_queries=text_like)
    info = index_info(tmp_path / "idx")
    assert info.faiss.trained.at_count == 5000 and not [a for a in info.advice if "reindex" in a]
    assert info.faiss_policy["target_recall"] == 0.9 and info.faiss.tuning.target == 0.9
    assert info.faiss.text_tuning.target == 0.9 and info.faiss.text_tuning.queries == ann.TUNING_QUERIES


def test_hnsw_deletions_are_reported_until_a_reindex_drops_them(tmp_path):
    vectors = clustered_unit_vectors(500, DIM, clusters=10, seed=6)
    with make_store(tmp_path, vectors, "HNSW16") as store:
        store.commit(remove_ids=list(store.ids_of_paths(f"/photos/{i:06d}.jpg" for i in range(200)).values()))
        SearchStructure(store).save()
    assert any("deleted vectors" in a for a in index_info(tmp_path / "idx").advice)
    assert reindex(tmp_path / "idx", text_queries=text_like).trained.at_count == 300
    assert not [a for a in index_info(tmp_path / "idx").advice if "reindex" in a]


# ---- serving ----------------------------------------------------------------------------------


@pytest.mark.parametrize("factory", [None, "IVF32,SQ8", "HNSW16", "IVF32,PQ16x4fs,RFlat"])
def test_a_searcher_maps_the_index_file_instead_of_loading_it(tmp_path, factory):
    vectors = clustered_unit_vectors(2000, DIM, clusters=20, seed=7)
    make_store(tmp_path, vectors, factory).close()
    faiss_file = str((tmp_path / "idx" / FAISS_FILE).resolve())
    with IndexStore.open(tmp_path / "idx") as store:
        loaded = SearchStructure(store).view().search(vectors[:20], 5)
    with Searcher(tmp_path / "idx") as searcher:
        mapped = searcher.faiss.search(vectors[:20], 5)
        maps = open("/proc/self/maps").read()
        assert faiss_file in maps
    np.testing.assert_array_equal(loaded[1], mapped[1])


def test_threads_and_the_blas_threshold_are_set_explicitly():
    import faiss

    assert ann.configure_threads(512, threads=1) == 1
    assert faiss.omp_get_max_threads() == 1
    assert faiss.cvar.distance_compute_blas_threshold == ann.BLAS_MIN_QUERIES * 512
    ann.configure_threads(512)


def test_faiss_state_round_trips_and_reads_older_records():
    from clipengine.index.faiss_view import Drift, FaissState, Training

    tuning = ann.Tuning("nprobe", 8, 0.97, True, 0.95, 0.1, 0.3, 500, 5000)
    state = FaissState("ivf-flat", "IVF256,Flat", "fits", 1000, 256, Training(5000, 5000, 5000, 0.25), tuning,
                       Drift(10, 0, 1.1))
    assert FaissState.from_dict(json.loads(json.dumps(state.to_dict()))) == state
    older = {"kind": "flat", "factory": "IDMap2,Flat", "trained": {"n_train": 0, "at_count": 3, "max_id": 3},
             "retired_key": 1}
    assert FaissState.from_dict(older) == FaissState(trained=Training(0, 3, 3))
    assert "nprobe 8: recall@10 0.970" in state.describe()
    assert not state.advice(5000, False, "fix") and FaissState().advice(0, False, "fix") == []
    drifted = FaissState(drift=Drift(10, 0, ann.DRIFT_RATIO + 1))
    assert ["drifted" in a and a.endswith("fix to retrain") for a in drifted.advice(10, False, "fix")] == [True]


# ---- filtered search: the planner ---------------------------------------------------------------


def filtered_truth(queries: np.ndarray, vectors: np.ndarray, kept: np.ndarray, k: int = 10):
    return ann.exact_top(queries, [(kept, vectors[kept])], k)


def filtered_recall(found: np.ndarray, truth_ids: np.ndarray) -> float:
    return float(np.mean([len(set(f.tolist()) & set(t.tolist())) / len(t) for f, t in zip(found, truth_ids, strict=True)]))


@pytest.mark.parametrize("factory", ["IVF128,PQ8", "IDMap2,IVF128,PQ16x4fs,RFlat", "IDMap2,HNSW16"])
def test_few_kept_vectors_are_scanned_exactly_from_the_index_or_the_catalogue(clustered, factory):
    vectors, tune_truth, _ = clustered
    index = ann.new_index(factory, DIM)
    ann.train_index(index, vectors[ann.sample_ids(np.arange(len(vectors)), 128 * 40, seed=0)])
    index.add_with_ids(vectors, np.arange(len(vectors)))
    ann.tune(index, tune_truth)
    read = []

    def from_catalogue(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        read.append(ids.size)
        return ids, vectors[ids]

    searchable = ann.SearchableIndex(index, vectors_of=from_catalogue)
    kept = ann.sample_ids(np.arange(len(vectors)), 300, seed=5)
    scores, found = searchable.search(tune_truth.queries[:20], 10, kept)
    assert searchable.last_plan == ann.FilterPlan("exact", 300, len(vectors))
    truth_scores, truth_ids = filtered_truth(tune_truth.queries[:20], vectors, kept)
    assert (found == truth_ids).all() and np.allclose(scores, truth_scores, atol=1e-5)  # exact, PQ codes or not
    assert read == ([300] if factory == "IVF128,PQ8" else [])  # only codes: full vectors from the catalogue
    assert "exact scan: 300 of" in searchable.last_plan.describe()


def test_many_kept_vectors_search_the_index_at_a_depth_raised_for_the_fraction(clustered, monkeypatch):
    vectors, tune_truth, test_truth = clustered
    index = ann.new_index("IVF128,Flat", DIM)
    ann.train_index(index, vectors[ann.sample_ids(np.arange(len(vectors)), 128 * 40, seed=0)])
    index.add_with_ids(vectors, np.arange(len(vectors)))
    tuning = ann.tune(index, tune_truth, 0.9)
    monkeypatch.setattr(ann, "EXACT_MAX_KEPT", 0)  # this small index would be scanned exactly: ask the index
    monkeypatch.setattr(ann, "EXACT_MAX_FRACTION", 0.0)
    searchable = ann.SearchableIndex(index)
    kept = ann.sample_ids(np.arange(len(vectors)), len(vectors) // 20, seed=6)  # 5%
    queries = test_truth.queries
    _, truth_ids = filtered_truth(queries, vectors, kept)
    _, raised = searchable.search(queries, 10, kept)
    plan = searchable.last_plan
    assert plan.plan == "ann" and plan.depth == min(128, 20 * tuning.value)  # nprobe / 0.05
    assert filtered_recall(raised, truth_ids) >= 0.9
    _, tuned_only = searchable._search(queries, 10, kept)  # the filter at the unfiltered depth: the old way
    assert filtered_recall(tuned_only, truth_ids) < filtered_recall(raised, truth_ids) - 0.1
    _, everything = searchable.search(queries, 10, np.arange(len(vectors)))  # keeps all: as unfiltered
    assert searchable.last_plan.depth == tuning.value and (everything == searchable.search(queries, 10)[1]).all()
    assert searchable.plan(None) is None
