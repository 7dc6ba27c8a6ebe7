"""Near-duplicates: planted near-copies and byte-identical copies are grouped, and nothing else is."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import CliRunner
from synthetic import clustered_unit_vectors

from clipengine.cli import app
from clipengine.errors import BadInput
from clipengine.index.duplicates import find_duplicates, similar_pairs
from clipengine.index.store import FileRecord, IndexStore

DIM = 32


def near_copy(v: np.ndarray, cosine: float, seed: int) -> np.ndarray:
    noise = np.random.default_rng(seed).standard_normal(len(v)).astype(np.float32)
    noise -= (noise @ v) * v
    return (cosine * v + np.sqrt(1 - cosine**2) * noise / np.linalg.norm(noise)).astype(np.float32)


@pytest.fixture
def collection(tmp_path):
    """2,000 clustered vectors, plus: b/near.jpg at cosine 0.97 to a/000010.jpg, and two byte-identical copies
    of a/000020.jpg (the same content hash, as indexing stores them)."""
    vectors = clustered_unit_vectors(2000, DIM, seed=3)
    source = {"source": "random", "arch": "tiny", "seed": 0, "identity": "random:tiny:seed0", "embed_dim": DIM,
              "preprocess": {}}
    with IndexStore.create(tmp_path / "idx", source) as store:
        store.commit([FileRecord(f"/p/a/{i:06d}.jpg", 1, i, f"h{i}", 4, 3, v) for i, v in enumerate(vectors)])
        store.commit([FileRecord("/p/b/near.jpg", 1, 0, "near", 4, 3, near_copy(vectors[10], 0.97, 1)),
                      FileRecord("/p/b/copy1.jpg", 1, 0, "h20", 4, 3, None),  # reuses the stored vector
                      FileRecord("/p/c/copy2.jpg", 1, 0, "h20", 4, 3, None)])
    return tmp_path / "idx", vectors


def test_planted_duplicates_are_grouped_and_nothing_else(collection):
    index, vectors = collection
    sample = vectors[::40] @ vectors.T
    sample[np.arange(len(sample)), np.arange(0, 2000, 40)] = -1  # not each with itself
    top = float(sample.max())
    threshold = 0.95
    assert top < threshold  # the collection itself has no pair this close (checked on a sample)
    groups = find_duplicates(index, threshold)
    assert [(g.size, g.exact) for g in groups] == [(3, True), (2, False)]  # largest first
    copies, near = groups
    assert [f.path for f in copies.files] == ["/p/a/000020.jpg", "/p/b/copy1.jpg", "/p/c/copy2.jpg"]
    assert all(f.exact and f.similarity == pytest.approx(1.0) for f in copies.files)
    assert [f.path for f in near.files] == ["/p/a/000010.jpg", "/p/b/near.jpg"]
    assert near.files[1].similarity == pytest.approx(0.97, abs=1e-4) and not near.files[1].exact
    assert [g.size for g in find_duplicates(index, 0.98)] == [3]  # the near copy is under 0.98
    assert [g.size for g in find_duplicates(index, 0.95, prefix="/p/")] == [3, 2]
    assert find_duplicates(index, 0.95, prefix="/p/b/") == []  # only files under the prefix count: each is alone
    assert [(g.size, g.exact) for g in find_duplicates(index, 0.95, exact=False)] == [(3, True), (2, False)]


def test_the_approximate_search_finds_the_exact_scans_pairs():
    vectors = clustered_unit_vectors(3000, DIM, seed=5, spread=0.3)  # tight clusters: many close pairs
    exact = {tuple(p) for p in similar_pairs(vectors, 0.97, exact=True).tolist()}
    approximate = {tuple(p) for p in similar_pairs(vectors, 0.97, exact=False).tolist()}
    assert len(exact) > 100 and approximate <= exact and len(approximate) >= 0.95 * len(exact)
    assert all(i < j for i, j in exact)


def test_the_command(collection):
    index, _ = collection
    runner = CliRunner()
    result = runner.invoke(app, ["duplicates", "--index", str(index), "--json"])
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert [g["size"] for g in data] == [3, 2] and set(data[0]["files"][0]) == {"id", "path", "similarity", "exact"}
    lines = runner.invoke(app, ["duplicates", "--index", str(index), "--paths-only"]).stdout.splitlines()
    assert lines == ["/p/a/000020.jpg\t/p/b/copy1.jpg\t/p/c/copy2.jpg", "/p/a/000010.jpg\t/p/b/near.jpg"]
    text = runner.invoke(app, ["duplicates", "--index", str(index)]).stdout
    assert "2 groups of near-duplicates (5 files)" in text and "identical bytes" in text
    for threshold in ("1.5", "-2"):
        result = runner.invoke(app, ["duplicates", "--index", str(index), "--threshold", threshold])
        assert result.exit_code == 1 and "outside [-1, 1]" in result.output
    with pytest.raises(BadInput):
        find_duplicates(index, float("nan"))
