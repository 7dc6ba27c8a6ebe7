"""Recall@k and classification metrics: hand-computed cases, ties, chunking, and CLIP_benchmark's own code."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch

from clipengine.metrics import classification_metrics, hits_at_k, recall_table, retrieval_hits, retrieval_recall


def _clip_benchmark():
    """CLIP_benchmark's retrieval metrics, for the cross-checks only: the hand-computed cases run without it."""
    return pytest.importorskip("clip_benchmark.metrics.zeroshot_retrieval",
                               reason="installed by `make test` (pip install --no-deps clip-benchmark)")


def unit(rows) -> np.ndarray:
    x = np.asarray(rows, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def clip_benchmark_hits(image_emb, text_emb, owners, k):
    """CLIP_benchmark's per-query recall (its `recall_at_k` through `batchify`) turned into hits, as it does."""
    clip_benchmark = _clip_benchmark()
    scores = torch.from_numpy(text_emb) @ torch.from_numpy(image_emb).T
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(scores)), torch.as_tensor(owners)] = True
    t2i = clip_benchmark.batchify(clip_benchmark.recall_at_k, scores, positive, 7, "cpu", k=k) > 0
    i2t = clip_benchmark.batchify(clip_benchmark.recall_at_k, scores.T, positive.T, 7, "cpu", k=k) > 0
    return t2i.numpy(), i2t.numpy()


def test_hand_computed_recall_with_a_tie_counted_against():
    images = np.array([[1, 0], [0, 1], [1, 0]], np.float32)  # image 2 duplicates image 0
    texts = np.array([[1, 0], [0, 1], [0.6, 0.8], [-1, 0]], np.float32)
    owners = [0, 1, 1, 2]
    # text 0 -> image 0 ties with image 2 (a non-target): rank 1, a miss at k=1, a hit at k=2
    # text 1 -> image 1 is strictly best; text 2 -> image 1 (0.8) beats images 0 and 2 (0.6)
    # text 3 -> image 2 scores -1, below image 1 (0) and tied with image 0: rank 2
    hits = retrieval_hits(images, texts, owners, ks=(1, 2, 3))
    assert hits["text_to_image_R@1"].tolist() == [False, True, True, False]
    assert hits["text_to_image_R@2"].tolist() == [True, True, True, False]
    assert hits["text_to_image_R@3"].tolist() == [True, True, True, True]
    # image 0: its caption (text 0) scores 1, tied with nothing better -> hit at 1
    # image 1: best caption text 1 (1.0) -> hit; image 2: its caption text 3 scores -1, every other text is above
    assert hits["image_to_text_R@1"].tolist() == [True, True, False]
    assert hits["image_to_text_R@3"].tolist() == [True, True, False]
    recall = retrieval_recall(images, texts, owners, ks=(1, 2))
    assert recall == {"text_to_image_R@1": 0.5, "text_to_image_R@2": 0.75,
                      "image_to_text_R@1": 2 / 3, "image_to_text_R@2": 2 / 3}


def test_images_without_captions_are_gallery_but_not_queries():
    images = unit([[1, 0], [0, 1], [1, 1]])
    texts = unit([[1, 0.1]])
    hits = retrieval_hits(images, texts, [0], ks=(1,))
    assert hits["image_to_text_R@1"].tolist() == [True]  # one query: image 0
    assert hits["text_to_image_R@1"].tolist() == [True]


def test_k_beyond_the_gallery_is_always_a_hit():
    rng = np.random.default_rng(1)
    recall = retrieval_recall(unit(rng.standard_normal((4, 8))), unit(rng.standard_normal((6, 8))),
                              [0, 1, 2, 3, 3, 0], ks=(4, 50))
    assert recall["text_to_image_R@4"] == 1.0 and recall["text_to_image_R@50"] == 1.0
    assert recall["image_to_text_R@50"] == 1.0


def _random_set(seed: int, n_images: int, dim: int = 16):
    rng = np.random.default_rng(seed)
    per_image = rng.integers(1, 6, n_images)  # unequal captions per image
    owners = np.repeat(np.arange(n_images), per_image)
    images = unit(rng.standard_normal((n_images, dim)))
    texts = unit(images[owners] + 1.3 * rng.standard_normal((len(owners), dim)))
    return images, texts, owners


@pytest.mark.parametrize("block_bytes", [4 * 120 * 1, 4 * 120 * 7, 1 << 28])
def test_equals_clip_benchmark_with_unequal_captions_per_image(block_bytes):
    images, texts, owners = _random_set(0, 120)
    ks = (1, 2, 5, 10, 50)
    ours = retrieval_hits(images, texts, owners, ks, block_bytes=block_bytes)
    recall = retrieval_recall(images, texts, owners, ks, block_bytes=block_bytes)
    for k in ks:
        t2i, i2t = clip_benchmark_hits(images, texts, owners, k)
        assert np.array_equal(ours[f"text_to_image_R@{k}"], t2i), k
        assert np.array_equal(ours[f"image_to_text_R@{k}"], i2t), k
        assert recall[f"text_to_image_R@{k}"] == pytest.approx(float(t2i.mean()), abs=1e-12)
        assert 0 < recall[f"text_to_image_R@{k}"] < 1 or k == 50


def _brute_force_ranks(image_emb, text_emb, owners):
    """Per query: (#non-targets strictly above the best target, #non-targets tied with it)."""
    scores = text_emb @ image_emb.T
    target = np.zeros(scores.shape, bool)
    target[np.arange(len(owners)), owners] = True
    out = []
    for s, t in ((scores, target), (scores.T, target.T)):
        rows = [r for r in range(len(s)) if t[r].any()]
        best = np.array([s[r][t[r]].max() for r in rows])
        above = np.array([(s[r][~t[r]] > b).sum() for r, b in zip(rows, best, strict=True)])
        tied = np.array([(s[r][~t[r]] == b).sum() for r, b in zip(rows, best, strict=True)])
        out.append((above, tied))
    return out


def test_ties_match_clip_benchmark_wherever_its_answer_is_defined():
    # vectors with entries in {0, ±1/2} and four non-zeros (unit norm, every dot product exact): many ties
    rng = np.random.default_rng(3)
    lattice = np.array([[a, b, c, d] for a in (-.5, .5) for b in (-.5, .5) for c in (-.5, .5) for d in (-.5, .5)],
                       np.float32)
    images = lattice[rng.integers(0, 16, 40)]
    owners = np.repeat(np.arange(40), rng.integers(1, 4, 40))
    texts = lattice[rng.integers(0, 16, len(owners))]
    ours = retrieval_hits(images, texts, owners, ks=(1, 5, 10), block_bytes=4 * 40 * 9)
    (t_above, t_tied), (i_above, i_tied) = _brute_force_ranks(images, texts, owners)
    ambiguous_seen = defined_ties_seen = 0
    for k in (1, 5, 10):
        theirs = clip_benchmark_hits(images, texts, owners, k)
        for mine, their, above, tied, name in ((ours[f"text_to_image_R@{k}"], theirs[0], t_above, t_tied, "t2i"),
                                              (ours[f"image_to_text_R@{k}"], theirs[1], i_above, i_tied, "i2t")):
            assert np.array_equal(mine, above + tied < k), (name, k)  # ours: ties count against
            ambiguous = (above < k) & (above + tied >= k)  # torch.topk may or may not keep the target
            assert np.array_equal(mine[~ambiguous], their[~ambiguous]), (name, k)
            assert not mine[ambiguous].any()
            ambiguous_seen += int(ambiguous.sum())
            defined_ties_seen += int(((tied > 0) & ~ambiguous).sum())
    assert ambiguous_seen and defined_ties_seen  # the data did exercise both kinds of tie


def test_recall_at_scale_needs_no_dense_matrix():
    images, texts, owners = _random_set(5, 300, dim=8)
    whole = retrieval_recall(images, texts, owners, ks=(1, 5, 10))
    one_row = retrieval_recall(images, texts, owners, ks=(1, 5, 10), block_bytes=1)
    assert whole == one_row
    images, texts, owners = _random_set(6, 3000, dim=8)  # ~9,000 captions: a dense score matrix is ~108 MB
    assert len(images) * len(texts) * 4 > 100e6
    tracemalloc.start()
    try:
        retrieval_recall(images, texts, owners, ks=(1, 5, 10), block_bytes=1 << 20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16e6, peak


def test_bad_embeddings_are_refused():
    images, texts, owners = _random_set(0, 5)
    with pytest.raises(ValueError, match="owners"):
        retrieval_recall(images, texts, owners[:-1])
    with pytest.raises(ValueError, match="NaN"):
        retrieval_recall(images * np.nan, texts, owners)
    with pytest.raises(ValueError, match="k >= 1"):
        retrieval_recall(images, texts, owners, ks=(0,))


def test_hits_at_k_from_ranked_ids():
    ranked = np.array([[7, 3, 9], [1, 2, 3], [5, 6, 8]])
    assert hits_at_k(ranked, np.array([3, 1, 4]), (1, 2, 3)) == {1: 1 / 3, 2: 2 / 3, 3: 2 / 3}


def test_classification_metrics_by_hand_and_against_scikit_learn():
    # CLIP_benchmark takes mean per-class recall from scikit-learn; its own accuracy() fails on numpy 2
    # (float() of a 1-element array), so top-k accuracy is checked against scikit-learn's too
    from sklearn.metrics import balanced_accuracy_score, top_k_accuracy_score

    logits = np.array([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.1, 0.2, 0.7], [0.5, 0.1, 0.4]], np.float32)
    labels = np.array([0, 1, 1, 2, 2])
    m = classification_metrics(logits, labels, ks=(1, 2))
    assert m["acc@1"] == pytest.approx(3 / 5)
    assert m["acc@2"] == pytest.approx(5 / 5)
    assert m["mean_per_class_recall"] == pytest.approx((1 + 0.5 + 0.5) / 3)
    rng = np.random.default_rng(0)
    logits, labels = rng.standard_normal((200, 12)).astype(np.float32), rng.integers(0, 12, 200)
    m = classification_metrics(logits, labels, ks=(1, 5))
    for k in (1, 5):
        assert m[f"acc@{k}"] == pytest.approx(top_k_accuracy_score(labels, logits, k=k, labels=range(12)))
    assert m["mean_per_class_recall"] == pytest.approx(balanced_accuracy_score(labels, logits.argmax(1)))


def test_recall_table_splits_metric_names_by_direction_and_k():
    metrics = {"text_to_image_R@1": 0.1, "text_to_image_R@10": 0.5, "image_to_text_R@5": 0.3,
               "index_text_to_image_R@1": 0.09, "acc@1": 0.7, "odd_R@x": 0.2}
    by_direction, other = recall_table(metrics)
    assert by_direction == {"text_to_image": {1: 0.1, 10: 0.5}, "image_to_text": {5: 0.3},
                            "index_text_to_image": {1: 0.09}}
    assert other == {"acc@1": 0.7, "odd_R@x": 0.2}
