"""Training data: four layouts read to the same pairs, bad rows dropped, batches that shard and resume."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch

from clipengine.errors import BadInput
from clipengine.scenes import scene, write_scene_set
from clipengine.train.data import (PairDataset, StepBatches, collate_pairs, read_image_bytes, read_pairs,
                                   split_validation)


@pytest.fixture
def scene_csv(tmp_path) -> Path:
    return write_scene_set(tmp_path / "scenes", 12, size=64)


def test_csv_groups_the_captions_of_an_image(scene_csv):
    pairs = read_pairs(scene_csv)
    assert len(pairs) == 12 and not pairs.dropped
    assert all(len(c) == 3 for c in pairs.captions)
    assert pairs.captions[0] == scene(0, 0, 64)[1]
    assert all(Path(p).is_absolute() or Path(p).exists() for p in pairs.images)


def test_tsv_and_comma_csv_read_the_same(scene_csv):
    rows = scene_csv.read_text().splitlines()
    import csv

    tsv = scene_csv.with_name("captions.tsv")
    tsv.write_text("\n".join("\t".join(r) for r in csv.reader(rows)) + "\n")
    a, b = read_pairs(scene_csv), read_pairs(tsv)
    assert a.images == b.images and a.captions == b.captions


def test_sidecar_folder_and_coco_json_read_the_same_pairs(scene_csv, tmp_path):
    csv_pairs = read_pairs(scene_csv)
    images = scene_csv.parent / "images"
    coco = {"images": [], "annotations": []}
    for i, (path, captions) in enumerate(zip(csv_pairs.images, csv_pairs.captions)):
        Path(path).with_suffix(".txt").write_text("\n".join(captions) + "\n")
        coco["images"].append({"id": i, "file_name": Path(path).name})
        coco["annotations"] += [{"image_id": i, "caption": c} for c in captions]
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    sidecar = read_pairs(images)
    from_coco = read_pairs(tmp_path / "coco.json", image_root=images)
    assert sidecar.images == csv_pairs.images == from_coco.images
    assert sidecar.captions == csv_pairs.captions == from_coco.captions


def _write_shard(path: Path, samples: list[tuple[str, bytes, str]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, image, caption in samples:
            for name, data in ((f"{key}.jpg", image), (f"{key}.txt", caption.encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_webdataset_shards_by_brace_pattern(scene_csv, tmp_path):
    pairs = read_pairs(scene_csv)
    samples = [(f"sample{i:03d}", Path(p).read_bytes(), c[0]) for i, (p, c) in enumerate(zip(pairs.images, pairs.captions))]
    _write_shard(tmp_path / "shard-000.tar", samples[:5])
    _write_shard(tmp_path / "shard-001.tar", samples[5:] + [("nocaption", samples[0][1], "  ")])
    shards = read_pairs(str(tmp_path / "shard-{000..001}.tar"))
    assert len(shards) == 12 and shards.dropped == [(f"{tmp_path}/shard-001.tar:nocaption", "empty caption")]
    assert [c[0] for c in shards.captions] == [c[0] for c in pairs.captions]
    assert read_image_bytes(shards.images[7]) == Path(pairs.images[7]).read_bytes()
    with pytest.raises(BadInput, match="shard not found"):
        read_pairs(str(tmp_path / "shard-{000..002}.tar"))


def test_bad_rows_are_dropped_and_counted(scene_csv):
    with open(scene_csv, "a") as f:
        f.write("images/missing.jpg,a caption for nothing\n")
        f.write("images/scene_000000.jpg,\n")  # an empty extra caption is ignored, the image keeps its others
        f.write('images/scene_000001.jpg,""\n')
    (scene_csv.parent / "images" / "zero.jpg").write_bytes(b"")
    with open(scene_csv, "a") as f:
        f.write("images/zero.jpg,an empty file\n")
    pairs = read_pairs(scene_csv)
    assert len(pairs) == 12
    reasons = sorted(r for _, r in pairs.dropped)
    assert len(reasons) == 2 and reasons[0].startswith("empty image file") and reasons[1].startswith("image not found")


def test_mostly_bad_data_is_refused_with_the_reason(tmp_path):
    (tmp_path / "c.csv").write_text("filepath,caption\n" + "".join(f"nope{i}.jpg,a cat\n" for i in range(5)))
    with pytest.raises(BadInput, match=r"no usable image-caption pairs.*image not found"):
        read_pairs(tmp_path / "c.csv")
    write_scene_set(tmp_path, 2, size=32)
    rows = (tmp_path / "captions.csv").read_text() + "".join(f"nope{i}.jpg,a cat\n" for i in range(5))
    (tmp_path / "captions.csv").write_text(rows)
    with pytest.raises(BadInput, match="5 of 7 rows .* unusable"):
        read_pairs(tmp_path / "captions.csv")
    (tmp_path / "wrong.csv").write_text("path,text\na.jpg,a cat\n")
    with pytest.raises(BadInput, match="'filepath' and 'caption'"):
        read_pairs(tmp_path / "wrong.csv")


def test_validation_split_is_stable_and_disjoint(scene_csv):
    pairs = read_pairs(scene_csv)
    train, val = split_validation(pairs, 3)
    assert len(val) == 3 and len(train) == 9 and not set(val.images) & set(train.images)
    reversed_pairs = pairs.subset(list(range(len(pairs)))[::-1])
    assert set(split_validation(reversed_pairs, 3)[1].images) == set(val.images)


def test_ranks_split_the_global_batch_and_positions_resume():
    single = StepBatches(50, 8, seed=3)
    ranks = [StepBatches(50, 8, seed=3, rank=r, world_size=2) for r in range(2)]
    whole = list(single)
    assert len(whole) == 6 and all(len(b) == 8 for b in whole)
    for step, batch in enumerate(whole):
        assert batch == list(ranks[0])[step] + list(ranks[1])[step]
    single.set_position(epoch=0, start_step=4)
    assert list(single) == whole[4:]
    single.set_position(epoch=1, start_step=0)
    assert list(single) != whole
    with pytest.raises(BadInput, match="divisible"):
        StepBatches(50, 9, seed=0, world_size=2)


def test_undecodable_images_are_replaced_and_reported(scene_csv, tiny_model):
    pairs = read_pairs(scene_csv)
    Path(pairs.images[2]).write_bytes(Path(pairs.images[2]).read_bytes()[:100])  # truncated
    from clipengine.embed import split_transform

    pixel_transform, _ = split_transform(tiny_model.image_transform(train=True))
    dataset = PairDataset(pairs, pixel_transform, tiny_model.tokenizer, image_size=64)
    pixels, texts, owners, bad = collate_pairs([dataset[(i, i)] for i in range(4)])
    assert pixels.shape == (4, 3, 64, 64) and pixels.dtype == torch.uint8 and texts.shape == (4, 32) and owners == [0, 1, 2, 3]
    assert len(bad) == 1 and bad[0][0] == pairs.images[2] and "truncated" in bad[0][1]
    again = dataset[(1, 7)]
    torch.testing.assert_close(again[0], dataset[(1, 7)][0])  # augmentation is seeded by the sample
    assert not torch.equal(dataset[(1, 8)][0], again[0])
