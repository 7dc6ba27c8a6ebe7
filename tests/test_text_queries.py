"""Text queries get the recall the index reports: the cross-modal test bed is as hard as real CLIP data, and an
approximate index tuned on text queries as well as images searches each kind at its own depth."""

from __future__ import annotations

import numpy as np
import pytest
from synthetic import cross_modal_set, cross_modal_stream, nearest_in, query_hardness

from clipengine.index import ann
from clipengine.index.faiss_view import FaissPolicy, FaissState, SearchStructure
from clipengine.index.search import Searcher
from clipengine.index.store import FileRecord, IndexStore
from clipengine.index.terms import Term
from clipengine.index.text_queries import for_store, tuning_prompts

DIM = 128


def test_hardness_reads_the_dimension_of_the_data_and_the_contrast_of_a_far_query():
    rng = np.random.default_rng(0)

    def cloud(rank: int, n: int) -> np.ndarray:  # a small blob of unit vectors, locally `rank`-dimensional
        x = np.zeros((n, DIM))
        x[:, 0] = 1
        x[:, 1:rank + 1] = 0.1 * rng.standard_normal((n, rank))
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    low, high = (query_hardness(cloud(r, 200), cloud(r, 20_000)) for r in (4, 16))
    assert 3 < low["lid"] < 5.5 and 10 < high["lid"] < 19, (low, high)  # LID estimates the local dimension
    assert low["rc"] > high["rc"] > 1  # and contrast falls as it rises
    far = np.zeros((1, DIM), np.float32)
    far[0, DIM - 1] = 1  # orthogonal to the whole blob: every point is as far as the nearest
    assert query_hardness(far, cloud(4, 5000))["rc"] == pytest.approx(1.0, abs=1e-3)


def test_a_streamed_gallery_gives_the_exact_neighbours_and_the_set_in_memory():
    stream = cross_modal_stream(5000, DIM, queries=50, seed=3, chunk=700)  # chunks smaller than k's merges
    images = cross_modal_set(5000, DIM, queries=50, seed=3, chunk=700).images
    assert np.array_equal(np.concatenate(list(stream.image_chunks())), images)  # each pass draws the same gallery
    found = nearest_in(stream.text_queries, stream.image_chunks(), 20, keep_vectors=True)
    scores = stream.text_queries @ images.T
    best = np.argsort(-scores, axis=1)[:, :20]
    assert found.vectors is not None and np.allclose(found.vectors, images[best])
    assert np.allclose(found.distances, np.sqrt(np.maximum(2 - 2 * np.take_along_axis(scores, best, 1), 1e-12)),
                       atol=1e-5)
    assert np.allclose(found.mean_distance, np.sqrt(np.maximum(2 - 2 * scores, 1e-12)).mean(axis=1), atol=1e-5)


@pytest.fixture(scope="module")
def bed():
    return cross_modal_set(20_000, DIM, queries=1500, seed=0)


def test_the_cross_modal_bed_is_as_hard_as_real_clip_data(bed):
    images = query_hardness(bed.image_queries[:300], bed.images)
    texts = query_hardness(bed.text_queries[:300], bed.images)
    assert texts["lid"] > 2.5 * images["lid"] and texts["rc"] < 0.7 * images["rc"], (images, texts)
    assert 1.1 < texts["rc"] < 1.6 and images["lid"] < 25  # LAION ViT-B/32: 1.27 and 14.7 (at 1M; see bench)
    index = ann.new_index("IVF128,Flat", DIM)
    ann.train_index(index, bed.images)
    index.add_with_ids(bed.images, np.arange(len(bed.images)))
    chunks = lambda: ann.iter_array_chunks(np.arange(len(bed.images)), bed.images)  # noqa: E731
    image_truth = ann.GroundTruth.compute(bed.image_queries[:500], np.full(500, -1), chunks())
    text_truth = ann.GroundTruth.compute(bed.text_queries[:500], np.full(500, -1), chunks())
    image_depth = ann.tune(index, image_truth).value
    assert ann.recall_at(index, text_truth, image_depth) < 0.85  # the modality gap: image tuning fails texts
    assert ann.tune(index, text_truth).value >= 2 * image_depth


def records(vectors: np.ndarray) -> list[FileRecord]:
    return [FileRecord(f"/photos/{i:06d}.jpg", 1, i, f"h{i}", 4, 3, v) for i, v in enumerate(vectors)]


def recall_of(searcher: Searcher, queries: np.ndarray, truth_ids: np.ndarray, kind: str | None) -> float:
    found = [[h.id - 1 for h in searcher.search_vector(q, 10, kind=kind)] for q in queries]  # ids are rows + 1
    return float(np.mean([len(set(f) & set(t.tolist())) / 10 for f, t in zip(found, truth_ids, strict=True)]))


@pytest.mark.parametrize("factory", ["IVF128,Flat", "IVF128,PQ32x4fs,RFlat"])
def test_text_queries_search_at_their_own_depth_and_get_the_recall_reported(tmp_path, bed, factory, monkeypatch):
    source = {"source": "random", "arch": "tiny", "seed": 0, "identity": "random:tiny:seed0", "embed_dim": DIM,
              "preprocess": {}}
    asked = []

    def text_queries(count: int) -> np.ndarray:
        asked.append(count)
        return bed.text_queries[:count]  # the tuning sample; the test queries below are others

    with IndexStore.create(tmp_path / "idx", source, FaissPolicy(factory=factory).section(DIM)) as store:
        store.commit(records(bed.images))
        SearchStructure(store).save(text_queries=text_queries)
        state = SearchStructure(store).state
    assert asked == [ann.TUNING_QUERIES]
    image, text = state.tuning, state.text_tuning
    assert image.reached and text.reached and text.recall_low >= 0.95 and text.value > image.value
    assert "image queries nprobe" in state.describe() and "text queries nprobe" in state.describe()
    assert FaissState.from_dict(state.to_dict()) == state

    held_out = bed.text_queries[1000:1200]
    _, truth = ann.exact_top(held_out, [(np.arange(len(bed.images)), bed.images)], 10)
    with Searcher(tmp_path / "idx") as searcher:
        assert searcher.faiss.depth("text") == text.depth and searcher.faiss.depth("image").value == image.value
        at_text, at_image = recall_of(searcher, held_out, truth, "text"), recall_of(searcher, held_out, truth, "image")
        at_unknown = recall_of(searcher, held_out, truth, None)  # a raw vector: the deeper of both
        monkeypatch.setattr(searcher, "text_vector", lambda text: held_out[int(text)])  # a tower giving the captions
        kinds, search = [], searcher.faiss.search

        def spy(*args):  # which kind of query each search said it was
            kinds.append(args[3])
            return search(*args)
        monkeypatch.setattr(searcher.faiss, "search", spy)
        searcher.search_text("0", 10)
        searcher.search_terms([Term(text="1")], 10)
        searcher.search_terms([Term(id=1)], 10)
        searcher.search_id(2, 10)
    assert at_text >= 0.94 and at_image < at_text - 0.08 and at_unknown >= at_text, (at_text, at_image, at_unknown)
    assert kinds == ["text", "text", "image", "image"]  # text and terms with a text at the text depth, others not


def test_the_prompt_set_and_stored_captions_make_the_text_sample(tmp_path):
    prompts = tuning_prompts(500)
    assert len(set(prompts)) == 500 and "a receipt" in prompts
    assert sum(p.startswith("a photo of a ") for p in prompts) > 30  # class names under CLIP's templates
    assert tuning_prompts(500, seed=1) != prompts and tuning_prompts(500) == prompts
    source = {"source": "random", "arch": "tiny", "seed": 0, "identity": "random:tiny:seed0", "embed_dim": DIM,
              "preprocess": {}}
    rng = np.random.default_rng(0)
    captions = rng.standard_normal((300, DIM)).astype(np.float32)
    captions /= np.linalg.norm(captions, axis=1, keepdims=True)
    embedded: list[str] = []

    class Model:  # what embed_texts needs of a model: a fixed vector per text
        embed_dim = DIM
        onnx = None

    def fake_embed(model, texts):
        embedded.extend(texts)
        return np.ones((len(texts), DIM), np.float32)

    with IndexStore.create(tmp_path / "idx", source, FaissPolicy().section(DIM)) as store:
        store.add_texts([f"caption {i}" for i in range(300)], captions)
        with pytest.MonkeyPatch.context() as m:
            m.setattr("clipengine.embed.embed_texts", fake_embed)
            vectors = for_store(store, Model())(500)
    assert vectors.shape == (500, DIM) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    assert int(((vectors @ captions.T).max(axis=1) > 0.9999).sum()) == 250  # half the sample: stored captions
    assert embedded == tuning_prompts(250)  # the rest: prompts through the model
