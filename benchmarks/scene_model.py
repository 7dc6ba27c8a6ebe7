"""The models the recall benchmarks score with, trained here offline: the shipped tiny model on the built-in
captioned scenes (a minute or so on 2 cores; held-out scenes of another seed to score it on), and small on the
emoji development set (about five minutes; its held-out half to score it on)."""

from __future__ import annotations

import time
from pathlib import Path


def tiny_trained_on_scenes(root: Path, quick: bool, held_out: int) -> tuple[Path, Path]:
    """Train tiny under `root` (3,000 scenes, 8 epochs; 600 and 2 with `quick`); returns the run directory (a
    checkpoint) and the CSV of `held_out` scenes it never saw."""
    from clipengine.scenes import write_scene_set
    from clipengine.training import TrainConfig, train

    train_set = write_scene_set(root / "train-scenes", 600 if quick else 3000, seed=0)
    test_set = write_scene_set(root / "test-scenes", held_out, seed=1)
    started = time.perf_counter()
    train(TrainConfig(data=str(train_set), out=str(root / "run"), model="tiny", epochs=2 if quick else 8,
                      batch_size=128, lr=1e-3, val_size=0))
    print(f"trained tiny on the scenes in {time.perf_counter() - started:.0f} s", flush=True)
    return root / "run", test_set


def small_trained_on_emoji(root: Path) -> tuple[Path, Path, Path]:
    """Train small under `root` on the emoji development set's training half (bench_train's emoji regime: 4
    epochs, batch 128); returns the run directory and the set's train and held-out CSVs."""
    from clipengine.training import TrainConfig, train

    train_csv, val_csv = emoji_data()
    started = time.perf_counter()
    train(TrainConfig(data=str(train_csv), out=str(root / "emoji-run"), model="small", epochs=4,
                      batch_size=128, lr=1e-3, weight_decay=0.1, warmup_steps=50, grad_clip=0.0, precision="fp32",
                      val_size=0))
    print(f"trained small on the emoji in {time.perf_counter() - started:.0f} s", flush=True)
    return root / "emoji-run", train_csv, val_csv


def emoji_data() -> tuple[Path, Path]:
    """The emoji development set's train and held-out CSVs (benchmarks/make_emoji_set.py)."""
    folder = Path(__file__).resolve().parent.parent / "data" / "emoji"
    if not (folder / "train.csv").is_file():
        raise SystemExit("error: the emoji set is not built: run `make emoji-set`")
    return folder / "train.csv", folder / "val.csv"
