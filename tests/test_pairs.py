"""Data layouts: every image-caption layout reads to the same pairs, bad rows are dropped and counted."""

from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path

import pytest

from clipengine.errors import BadInput
from clipengine.images import read_image_bytes
from clipengine.pairs import read_labelled, read_pairs
from clipengine.scenes import scene, write_scene_set


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
    tsv = scene_csv.with_name("captions.tsv")
    tsv.write_text("\n".join("\t".join(r) for r in csv.reader(rows)) + "\n")
    a, b = read_pairs(scene_csv), read_pairs(tsv)
    assert a.images == b.images and a.captions == b.captions


def test_sidecar_folder_and_coco_json_read_the_same_pairs(scene_csv, tmp_path):
    csv_pairs = read_pairs(scene_csv)
    images = scene_csv.parent / "images"
    coco: dict[str, list[dict]] = {"images": [], "annotations": []}
    for i, (path, captions) in enumerate(zip(csv_pairs.images, csv_pairs.captions, strict=True)):
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
    samples = [(f"sample{i:03d}", Path(p).read_bytes(), c[0]) for i, (p, c) in enumerate(zip(pairs.images, pairs.captions, strict=True))]
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




def _scene_records(scene_csv):
    pairs = read_pairs(scene_csv)
    return pairs, [(Path(p).name, c) for p, c in zip(pairs.images, pairs.captions, strict=True)]


def test_karpathy_blip_and_flickr_token_files_read_the_same_pairs(scene_csv, tmp_path):
    pairs, records = _scene_records(scene_csv)
    root = scene_csv.parent  # holds images/, as coco/ holds val2014/
    karpathy = {"dataset": "coco", "images": [
        {"filepath": "images", "filename": name, "split": "test" if i < 8 else "train", "imgid": i,
         "sentences": [{"raw": c, "tokens": c.split()} for c in captions]}
        for i, (name, captions) in enumerate(records)]}
    (tmp_path / "dataset_coco.json").write_text(json.dumps(karpathy))
    blip = [{"image": f"images/{name}", "caption": captions} for name, captions in records]
    (tmp_path / "coco_karpathy_test.json").write_text(json.dumps(blip))
    (tmp_path / "results.token").write_text(
        "".join(f"{name}#{j}\t{c}\n" for name, captions in records for j, c in enumerate(captions)))

    everything = read_pairs(tmp_path / "dataset_coco.json", image_root=root)
    assert everything.layout == "karpathy" and everything.images == pairs.images
    assert everything.captions == pairs.captions
    test = read_pairs(tmp_path / "dataset_coco.json", image_root=root, default_split="test")
    assert test.images == pairs.images[:8]
    assert read_pairs(tmp_path / "dataset_coco.json", image_root=root, split="train").images == pairs.images[8:]
    with pytest.raises(BadInput, match="no images of split 'val'.*test, train"):
        read_pairs(tmp_path / "dataset_coco.json", image_root=root, split="val")

    for image_root in (root, root / "images"):  # --images coco and --images coco/val2014 both work
        from_blip = read_pairs(tmp_path / "coco_karpathy_test.json", image_root=image_root)
        assert from_blip.layout == "blip" and from_blip.images == pairs.images
        assert from_blip.captions == pairs.captions
    token = read_pairs(tmp_path / "results.token", image_root=root / "images")
    assert token.layout == "flickr-token" and token.images == pairs.images and token.captions == pairs.captions
    with pytest.raises(BadInput, match="--split applies to Karpathy"):
        read_pairs(tmp_path / "coco_karpathy_test.json", image_root=root, split="test")
    with pytest.raises(BadInput, match="--split applies to Karpathy"):
        read_pairs(scene_csv, split="test")
    (tmp_path / "other.json").write_text(json.dumps({"foo": 1}))
    with pytest.raises(BadInput, match="none of the caption JSON layouts"):
        read_pairs(tmp_path / "other.json")


def test_class_folders_are_read_in_sorted_order_with_sidecars(tmp_path):
    write_scene_set(tmp_path / "src", 6, size=32)
    images = sorted((tmp_path / "src" / "images").glob("*.jpg"))
    for i, image in enumerate(images):
        target = tmp_path / "cls" / ("dog" if i % 2 else "cat") / image.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(image.read_bytes())
        if i < 2:
            target.with_suffix(".txt").write_text("a caption\n\n")
    labelled = read_labelled(tmp_path / "cls")
    assert labelled.classes == ["cat", "dog"] and labelled.labels == [0, 0, 0, 1, 1, 1]
    assert sum(1 for c in labelled.captions if c == ["a caption"]) == 2
    with pytest.raises(BadInput, match="class list lacks: dog"):
        read_labelled(tmp_path / "cls", classes=["cat"])
    with pytest.raises(BadInput, match="no class folders"):
        read_labelled(tmp_path / "cls" / "cat")
