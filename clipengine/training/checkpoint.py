"""Training checkpoints: the model as a loadable checkpoint directory, plus everything `--resume` needs.

Layout of a run directory ``OUT``::

    OUT/open_clip_config.json        the newest checkpoint, hard-linked: `--checkpoint OUT` loads it
    OUT/open_clip_model.safetensors
    OUT/checkpoints/step-00001200/   open_clip_config.json, open_clip_model.safetensors, train_state.pt,
                                     train_config.json
    OUT/log.jsonl                    one JSON object per logged step and per validation

A step directory is written under a temporary name and renamed when complete, so a crash (or a NaN
stop) always leaves the last good one. The training state holds no pickled code: it is loaded with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from clipengine.durable import remove_abandoned, replacing
from clipengine.errors import BadInput
from clipengine.models import CHECKPOINT_CONFIG, CHECKPOINT_WEIGHTS, save_checkpoint

STATE_FILE = "train_state.pt"
RUN_CONFIG_FILE = "train_config.json"  # the run's settings, readable without loading the optimizer state
STEP_PREFIX = "step-"


def step_directories(out: Path) -> list[Path]:
    """Complete step directories of a run, oldest first."""
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith(STEP_PREFIX) and (p / STATE_FILE).is_file())


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_checkpoint(out: Path, step: int, model: Any, model_cfg: dict, preprocess_cfg: dict, arch: str,
                     state: dict[str, Any], run_config: dict, keep: int = 1) -> Path:
    """Write step `step` atomically, point OUT's top-level files at it, and drop all but `keep` older ones."""
    root = out / "checkpoints"
    final = root / f"{STEP_PREFIX}{step:08d}"
    root.mkdir(parents=True, exist_ok=True)
    remove_abandoned(root)  # a step being written when an earlier run was killed
    with replacing(final) as tmp:
        save_checkpoint(tmp, model, model_cfg, preprocess_cfg, arch)
        torch.save(state, tmp / STATE_FILE)
        (tmp / RUN_CONFIG_FILE).write_text(json.dumps(run_config, indent=2))
    for name in (CHECKPOINT_CONFIG, CHECKPOINT_WEIGHTS):
        with replacing(out / name) as link:
            try:
                os.link(final / name, link)
            except OSError:  # a file system without hard links
                shutil.copy2(final / name, link)
    for old in step_directories(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_checkpoint_state(directory: Path) -> dict[str, Any]:
    try:
        return torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged state file: say which, and how to get going again
        raise BadInput(f"cannot read training state {directory / STATE_FILE} ({type(e).__name__}: {e}); "
                       f"delete {directory} to resume from an earlier checkpoint") from None


def read_run_config(directory: Path) -> dict:
    try:
        return json.loads((directory / RUN_CONFIG_FILE).read_text())
    except (OSError, ValueError) as e:
        raise BadInput(f"cannot read {directory / RUN_CONFIG_FILE} ({e}); delete {directory} to resume "
                       "from an earlier checkpoint") from None
