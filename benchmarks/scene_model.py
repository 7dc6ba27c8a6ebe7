"""The model the recall benchmarks score with: the shipped tiny model trained on the built-in captioned scenes
(offline, a minute or so on 2 cores), and held-out scenes of another seed to score it on."""

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
