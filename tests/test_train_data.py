"""Training data: a stable held-out split, and batches that shard and resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from clipengine.errors import BadInput
from clipengine.pairs import read_pairs
from clipengine.scenes import write_scene_set
from clipengine.training.data import PairDataset, SampleMaker, StepBatches, collate_pairs, sample_seed, split_validation


@pytest.fixture
def scene_csv(tmp_path) -> Path:
    return write_scene_set(tmp_path / "scenes", 12, size=64)


def test_validation_split_is_stable_and_disjoint(scene_csv):
    pairs = read_pairs(scene_csv)
    train, val = split_validation(pairs, 3)
    assert len(val) == 3 and len(train) == 9 and not set(val.images) & set(train.images)
    reversed_pairs = pairs.subset(list(range(len(pairs)))[::-1])
    assert set(split_validation(reversed_pairs, 3)[1].images) == set(val.images)


def test_validation_split_does_not_depend_on_where_the_data_set_is(scene_csv, tmp_path):
    """The same images are held out in a copy elsewhere: a test's temporary folder, another machine."""
    import shutil

    def held_out(csv: Path) -> set[str]:
        return {Path(str(ref)).name for ref in split_validation(read_pairs(csv), 4)[1].images}

    copies = [shutil.copytree(scene_csv.parent, tmp_path / where / "set") for where in ("a", "b/c/d")]
    assert held_out(scene_csv) == held_out(Path(copies[0]) / "captions.csv") == held_out(Path(copies[1]) / "captions.csv")
    assert len(held_out(scene_csv)) == 4


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


def _order(seed: int, epoch: int) -> list[int]:
    sampler = StepBatches(64, 8, seed=seed)
    sampler.set_position(epoch, 0)
    return [i for batch in sampler for i, _ in batch]


def test_every_epoch_and_every_seed_has_its_own_order():
    """torch's CPU generator keeps only the low 32 bits of a seed: a seed that packed (seed, epoch) above
    them replayed epoch 0's batches in every epoch of every run. 2**32 is the seed that bug confused with 0."""
    orders = {(seed, epoch): _order(seed, epoch) for seed in (0, 1, 2**32) for epoch in range(3)}
    assert len({tuple(o) for o in orders.values()}) == len(orders)
    assert _order(1, 2) == orders[1, 2]  # and a (seed, epoch) repeats exactly, for resume
    generator_seeds = {torch.Generator().manual_seed(sample_seed(s, e, 5)).initial_seed()
                       for s in (0, 1, 2**32) for e in range(3)}
    assert len(generator_seeds) == 9  # what the generator keeps of a sample's seed differs too


def test_an_image_gets_a_new_crop_every_epoch(scene_csv, tiny_model):
    from clipengine.embed import split_transform

    pixel_transform, _ = split_transform(tiny_model.image_transform(train=True))
    dataset = PairDataset(read_pairs(scene_csv), SampleMaker(pixel_transform, tiny_model.tokenizer, image_size=64))
    crops = [dataset[(3, sample_seed(0, epoch, 3))][0] for epoch in range(3)] + [dataset[(3, sample_seed(2**32, 0, 3))][0]]
    assert all(not torch.equal(a, b) for k, a in enumerate(crops) for b in crops[k + 1:])
    torch.testing.assert_close(dataset[(3, sample_seed(0, 1, 3))][0], crops[1])


def test_undecodable_images_are_replaced_and_reported(scene_csv, tiny_model):
    pairs = read_pairs(scene_csv)
    Path(pairs.images[2]).write_bytes(Path(pairs.images[2]).read_bytes()[:100])  # truncated
    from clipengine.embed import split_transform

    pixel_transform, _ = split_transform(tiny_model.image_transform(train=True))
    dataset = PairDataset(pairs, SampleMaker(pixel_transform, tiny_model.tokenizer, image_size=64))
    pixels, texts, owners, bad, ids = collate_pairs([dataset[(i, i)] for i in range(4)])
    assert pixels.shape == (4, 3, 64, 64) and pixels.dtype == torch.uint8 and texts.shape == (4, 32) and owners == [0, 1, 2, 3]
    assert ids == [0, 1, 3, 3]  # the bad image is replaced by the next decodable one
    assert len(bad) == 1 and bad[0][0] == pairs.images[2] and "truncated" in bad[0][1]
    again = dataset[(1, 7)]
    torch.testing.assert_close(again[0], dataset[(1, 7)][0])  # augmentation is seeded by the sample
    assert not torch.equal(dataset[(1, 8)][0], again[0])
