"""Every knob of a training run, in one place: `TrainConfig`.

Each field carries its help text, so `clipengine train`'s options, their help and their defaults are
generated from this class (see `clipengine/cli/train.py`) instead of being written out a second time. A resumed run
takes its saved config and lays the options given again over it (`config_for_run`).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipengine.errors import BadInput
from clipengine.sizes import DEFAULT_MAX_PIXELS

# settings a resumed run must share with the run it continues (others, like --epochs, may change)
RUN_IDENTITY = ("data", "model", "pretrained", "checkpoint", "batch_size", "seed", "loss", "val_size",
                "val_data", "lock_image", "lock_text", "stream", "resampled", "samples_per_epoch", "shuffle_buffer")


def knob(default: Any, help: str, *, flag: bool = False, short: str | None = None, cli: bool = True) -> Any:
    """A TrainConfig field with the help text its command-line option shows. `flag`: a switch that only
    turns the setting on; `short`: a one-letter alias; `cli`: False for settings only the library takes."""
    return field(default=default, metadata={"help": help, "flag": flag, "short": short, "cli": cli})


@dataclass
class TrainConfig:
    """Every knob of a run. `batch_size` is global: split over processes, then over `accum_steps`."""

    data: str = field(metadata=knob(None, "Captions: CSV/TSV (filepath,caption), a folder with .txt sidecars, "
                                          "COCO JSON, or shards: 'shards/{000..009}.tar', "
                                          "'s3://bucket/{00000..41455}.tar', 'https://...', 'pipe:CMD'.").metadata)
    out: str = knob("runs/clip", "Run directory; it becomes a checkpoint for --checkpoint.")
    model: str = knob("tiny", "Architecture: a shipped config such as tiny, or an open_clip name.", short="-m")
    pretrained: str | None = knob(None, "Pretrained tag of the architecture, or a local weights file; "
                                        "none: random weights.")
    checkpoint: str | None = knob(None, "Fine-tune from a checkpoint directory instead of --model/--pretrained.")
    epochs: int = knob(10, "Passes over the training data.")
    batch_size: int = knob(64, "Global batch: all processes and micro-batches.")
    accum_steps: int = knob(1, "Micro-batches per step; the loss still sees the whole batch.")
    lr: float = knob(5e-4, "Peak learning rate.")
    weight_decay: float = knob(0.2, "AdamW weight decay on weight matrices.")
    warmup_steps: int | None = knob(None, "Linear warmup steps (default: 5% of all steps).")
    beta1: float = knob(0.9, "AdamW beta1.")
    beta2: float | None = knob(None, "AdamW beta2 (default: 0.98 for a model named ViT-*, else 0.999, "
                                     "as open_clip_train).")
    eps: float | None = knob(None, "AdamW epsilon (default: 1e-6 for ViT-*, else 1e-8).")
    grad_clip: float | None = knob(1.0, "Clip the gradient norm to this; 0 disables.")
    loss: str = knob("clip", "clip (InfoNCE) or siglip (sigmoid).")
    lock_image: bool = knob(False, "Freeze the image tower (LiT).", flag=True)
    lock_text: bool = knob(False, "Freeze the text tower.", flag=True)
    grad_checkpointing: bool = knob(False, "Trade compute for activation memory.", flag=True)
    precision: str = knob("auto", "auto, fp32, bf16 or fp16 (auto: bf16/fp16 on GPU, fp32 on CPU).")
    device: str | None = knob(None, "cpu, cuda, cuda:N or mps (default: auto).")
    workers: int | None = knob(None, "Data-loading processes (default: measured over the first steps on a CPU).")
    threads: int | None = knob(None, "torch threads on the CPU (default: the cores the workers leave free).")
    seed: int = knob(0, "Seed of the data order, the augmentation and (from scratch) the initial weights.")
    val_size: int | None = knob(None, "Images held out for validation (default: 10%, at most 1000; 0: none).")
    val_data: str | None = knob(None, "A separate validation set instead of holding out.")
    image_root: str | None = knob(None, "Folder that COCO file names are relative to.")
    save_every: int = knob(0, "Checkpoint every N steps; 0: at the end of each epoch only.")
    log_every: int = knob(10, "Write a log.jsonl record every N steps.")
    max_steps: int | None = knob(None, "Stop after N steps in all (the schedule still spans all epochs).")
    max_pixels: int = knob(DEFAULT_MAX_PIXELS, "Skip images needing more decoded pixels than this.", cli=False)
    decode_cache: str = knob("auto", "Decoded images kept across epochs and runs: auto (the cache directory), "
                                     "off, or a file.")
    decode_cache_size: str = knob("4GiB", "Largest size of the decode cache.")
    resume: bool = knob(False, "Continue the run in --out where it stopped.", flag=True)
    stream: bool = knob(False, "Stream the shards front to back (always for s3://, gs://, https:// and pipe: data), "
                               "instead of indexing their members.", flag=True)
    resampled: bool = knob(False, "Streamed shards drawn with replacement; --samples-per-epoch sets an epoch.",
                           flag=True)
    samples_per_epoch: int | None = knob(None, "Samples in a resampled epoch.")
    shuffle_buffer: int = knob(10_000, "Streamed samples each data worker shuffles at a time (their bytes: about "
                                       "200 MB for 256-px JPEGs).")
    shard_retries: int = knob(3, "Retries of a streamed shard that fails (with backoff), before it is skipped.")
    shard_timeout: float = knob(60.0, "Seconds without data before a streamed shard counts as failed.")
    shard_backoff: float = knob(1.0, "Seconds before a failed shard's first retry, doubling each retry.", cli=False)
    log_samples: bool = knob(False, "Write the samples of every step to OUT/samples-rankN.jsonl.", flag=True)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Option:
    """A TrainConfig field as a command-line option: everything a CLI needs to offer it."""

    name: str
    type: type  # int, float, str or bool
    default: Any  # TrainConfig's default, shown in the help
    help: str
    flag: bool
    short: str | None


def command_line_options() -> list[Option]:
    """The fields `clipengine train` offers, in order, with the type, default and help each option shows."""
    hints = typing.get_type_hints(TrainConfig)
    options = []
    for f in dataclasses.fields(TrainConfig):
        if not f.metadata.get("cli"):
            continue
        kind = hints[f.name]
        if isinstance(kind, types.UnionType):  # X | None
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        default = None if f.default is dataclasses.MISSING else f.default
        options.append(Option(f.name, kind, default, f.metadata["help"], f.metadata["flag"], f.metadata["short"]))
    return options


def adam_defaults(arch: str) -> tuple[float, float]:
    """AdamW (beta2, eps) when not given: open_clip_train's rule, so that the same run trains the same.

    CLIP used beta2 0.98 and eps 1e-6 for its ViTs (steadier over long, large-batch runs) and 0.999 and
    1e-8 for the rest; open_clip_train tells them apart by "vit" in the model's name. On short runs of our
    small named models 0.999 learns faster: the built-in scenes with `tiny` for 620 steps reached held-out
    R@10 2.3 points higher in each of 3 seeds (benchmarks/results/train-*.json, README "Training").
    """
    return (0.98, 1e-6) if "vit" in arch.lower() else (0.999, 1e-8)


def resume_config(out: str | Path, **given: Any) -> TrainConfig:
    """The config of the run in `out`, with the settings given here (not None) laid over it."""
    from clipengine.training import checkpoint as ckpt  # torch: imported only when a run resumes

    steps = ckpt.step_directories(Path(out))
    if not steps:
        raise BadInput(f"nothing to resume in {out}: it holds no checkpoint")
    saved = ckpt.read_run_config(steps[-1])
    saved["max_steps"] = None  # a stop-early limit belongs to the invocation that set it, not to the run
    saved.update({k: v for k, v in given.items() if v is not None}, out=str(out), resume=True)
    return TrainConfig(**saved)


def config_for_run(**given: Any) -> TrainConfig:
    """The config a command line asks for: the settings given (None: not given) over TrainConfig's defaults,
    or, with resume=True, over the config of the run being resumed."""
    given = {k: v for k, v in given.items() if v is not None}
    if given.pop("resume", False):
        return resume_config(given.pop("out", TrainConfig.out), **given)
    if not given.get("data"):
        raise BadInput("name the training data: --data captions.csv (see `clipengine train --help`)")
    return TrainConfig(**given)
