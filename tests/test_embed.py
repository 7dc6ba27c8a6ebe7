"""The hot path: exact preprocessing, normalised float32 output, order, skips, reuse, workers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from synthetic import write_photo_folder

import clipengine.cores as cores_module
import clipengine.decode as decode_module
import clipengine.embed as embed_module
from clipengine.embed import ImageEmbedding, embed_images, embed_pil_images, split_transform
from clipengine.images import content_hash
from clipengine.scenes import photo_like


def reference_embedding(model, path) -> np.ndarray:
    """The naive way: PIL open -> open_clip's own preprocess -> model."""
    pixels = model.image_transform()(Image.open(path).convert("RGB")).unsqueeze(0)
    with torch.no_grad():
        return torch.nn.functional.normalize(model.model.encode_image(pixels), dim=-1)[0].numpy()


def test_split_transform_is_bit_identical_to_open_clips(tiny_model):
    transform = tiny_model.image_transform()
    pil_part, normalize = split_transform(transform)
    img = photo_like(123, 77, seed=5)
    pixels = pil_part(img)
    assert pixels.dtype == torch.uint8
    assert torch.equal(normalize(pixels.float().div(255)), transform(img))


def test_exact_decode_matches_the_naive_pipeline(tiny_model, tmp_path):
    paths = [str(p) for p in write_photo_folder(tmp_path, 5, (300, 200))]
    outcomes = [e for batch in embed_images(tiny_model, paths, batch_size=2, workers=0, exact_decode=True) for e in batch]
    for path, e in zip(paths, outcomes, strict=True):
        assert e.path == path and e.vector.dtype == np.float32
        np.testing.assert_allclose(e.vector, reference_embedding(tiny_model, path), atol=1e-5)


def test_draft_decode_stays_close_to_exact(tiny_model, tmp_path):
    paths = [str(p) for p in write_photo_folder(tmp_path, 3, (1600, 1200))]
    exact = [e.vector for b in embed_images(tiny_model, paths, workers=0, exact_decode=True) for e in b]
    fast = [e.vector for b in embed_images(tiny_model, paths, workers=0, exact_decode=False) for e in b]
    for a, b in zip(exact, fast, strict=True):
        assert float(a @ b) > 0.99 and np.abs(a - b).max() > 1e-5  # close, and not equal: draft decoded smaller


def test_outcomes_keep_input_order_with_skips_and_reuse(tiny_model, tmp_path):
    good = [str(p) for p in write_photo_folder(tmp_path, 4, (100, 80))]
    (tmp_path / "bad.jpg").write_text("nope")
    known = content_hash(open(good[1], "rb").read())
    paths = [good[0], str(tmp_path / "bad.jpg"), good[1], str(tmp_path / "gone.jpg"), good[2], good[3]]
    batches = list(embed_images(tiny_model, paths, batch_size=4, workers=0, known_hashes={known}))
    assert [len(b) for b in batches] == [4, 2]
    outcomes = [e for b in batches for e in b]
    assert [e.path for e in outcomes] == paths
    assert "not a recognised image" in outcomes[1].skip_reason
    assert outcomes[2].reused and outcomes[2].hash == known and outcomes[2].vector is None
    assert "disappeared" in outcomes[3].skip_reason
    for e in (outcomes[0], outcomes[4], outcomes[5]):
        assert e.vector.shape == (64,) and abs(float(np.linalg.norm(e.vector)) - 1) < 1e-5
        assert (e.width, e.height) == (100, 80)


def test_known_hashes_are_not_decoded(tiny_model, tmp_path, monkeypatch):
    paths = [str(p) for p in write_photo_folder(tmp_path, 3, (64, 64))]
    known = {content_hash(open(p, "rb").read()) for p in paths}

    def no_decoding(*args, **kwargs):
        raise AssertionError("a file with a known hash was decoded")

    monkeypatch.setattr(decode_module, "open_image", no_decoding)
    outcomes = [e for b in embed_images(tiny_model, paths, workers=0, known_hashes=known) for e in b]
    assert all(e.reused for e in outcomes)


def test_worker_processes_give_the_same_vectors(tiny_model, tmp_path):
    paths = [str(p) for p in write_photo_folder(tmp_path, 10, (200, 150))]
    (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
    paths.insert(3, str(tmp_path / "bad.png"))
    inline = [e for b in embed_images(tiny_model, paths, batch_size=4, workers=0) for e in b]
    parallel = [e for b in embed_images(tiny_model, paths, batch_size=4, workers=2) for e in b]
    assert [e.path for e in parallel] == paths
    assert parallel[3].skip_reason == inline[3].skip_reason
    for a, b in zip(inline, parallel, strict=True):
        if a.vector is not None:
            np.testing.assert_array_equal(a.vector, b.vector)


def test_query_images_embed_exactly_like_indexed_ones(tiny_model, tmp_path):
    path = str(write_photo_folder(tmp_path, 1, (90, 70))[0])
    (indexed,) = next(embed_images(tiny_model, [path], workers=0))
    np.testing.assert_allclose(embed_pil_images(tiny_model, [Image.open(path).convert("RGB")])[0],
                               indexed.vector, atol=1e-6)


def test_empty_input_yields_nothing(tiny_model):
    assert list(embed_images(tiny_model, [])) == []


def test_reused_property():
    assert ImageEmbedding("p", hash="h").reused
    assert not ImageEmbedding("p", hash="h", skip_reason="bad").reused
    assert not ImageEmbedding("p", hash="h", vector=np.zeros(2, np.float32)).reused


@pytest.mark.parametrize("cores,device_type,workers,batch", [
    (2, "cpu", 2, 32), (2, "cuda", 1, 256), (16, "cpu", 4, 32), (16, "cuda", 15, 256), (1, "cpu", 1, 32)])
def test_defaults_by_device_and_cores(cores, device_type, workers, batch, monkeypatch):
    monkeypatch.setattr(cores_module.os, "sched_getaffinity", lambda _: set(range(cores)))
    assert embed_module.default_workers(torch.device(device_type)) == workers
    assert embed_module.default_batch_size(torch.device(device_type)) == batch


class DyingReader:
    """A reader whose third file takes its worker down, as the kernel's OOM killer would."""

    def __len__(self) -> int:
        return 6

    def __getitem__(self, i: int):
        if i == 2:
            import os

            os._exit(9)
        return ImageEmbedding(str(i), hash=str(i)), None


def test_the_torch_free_decode_pool_keeps_order_skips_and_bounds_and_reports_a_dead_worker(tmp_path, monkeypatch):
    from concurrent.futures.process import BrokenProcessPool

    from clipengine.decode import FileReader, decoded_batches

    paths = [str(p) for p in write_photo_folder(tmp_path, 9, (120, 90))]
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 broken")
    paths.insert(4, str(tmp_path / "bad.jpg"))
    known = content_hash(open(paths[0], "rb").read())

    def reader():
        return FileReader(paths, lambda im: np.asarray(im.resize((32, 32))).transpose(2, 0, 1), np.stack,
                          known_hashes={known})

    inline = list(decoded_batches(reader(), 4, workers=0))
    pooled = list(decoded_batches(reader(), 4, workers=2))
    assert [len(metas) for metas, _ in pooled] == [4, 4, 2]
    for (a, pa), (b, pb) in zip(inline, pooled, strict=True):
        assert a == b
        np.testing.assert_array_equal(pa, pb)
    metas = [m for batch, _ in pooled for m in batch]
    assert [m.path for m in metas] == paths and metas[0].reused and "not a recognised image" in metas[4].skip_reason
    assert pooled[0][1].shape == (3, 3, 32, 32) and pooled[0][1].dtype == np.uint8  # the reused file: no pixels
    asked: list[tuple] = []
    original = decode_module.ProcessPoolExecutor.submit

    def submit(self, fn, *args):
        asked.append(args)
        return original(self, fn, *args)

    monkeypatch.setattr(decode_module.ProcessPoolExecutor, "submit", submit)
    batches = decoded_batches(FileReader(paths * 20, reader().pixel_transform, np.stack), 4, workers=2)
    next(batches)
    assert len(asked) <= 2 * 2 * 2 + 2  # two batches ahead per worker, each split over both: never the whole folder
    del batches  # closes the generator, and its pool
    with pytest.raises(BrokenProcessPool):
        list(decoded_batches(DyingReader(), 2, workers=2))
