"""The training loop, readable top to bottom: `train(config)`.

    data -> batches (seeded by step) -> forward -> contrastive loss over the global batch -> backward
    -> clip -> AdamW with cosine/warmup lr -> clamp temperature -> log, validate, checkpoint

Gradient accumulation keeps the loss of the *whole* effective batch (every negative of every
micro-batch), by gradient caching: features of all micro-batches are computed without gradients, the
loss is computed once over all of them and differentiated with respect to the features, and each
micro-batch is then re-run with gradients and back-propagated from its slice of those feature
gradients. The result equals the full-batch gradient exactly, the temperature's included (open_clip's
feature cache adds the temperature's gradient once per micro-batch). Memory is that of one micro-batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from clipengine.causal_text import TrainingForward
from clipengine.cores import available_cores
from clipengine.embed import PixelNormalizer, split_transform
from clipengine.errors import BadInput, ClipEngineError
from clipengine.images import DEFAULT_MAX_PIXELS, WHITE, describe_ref
from clipengine.metrics import chance_recall, retrieval_recall
from clipengine.models import LoadedModel, ModelSpec, load_model, model_config, pick_device, resolve_source
from clipengine.pairs import MOSTLY_BAD, PairSet, read_pairs
from clipengine.shards import check_readable, is_streamed, read_sizes, shard_names
from clipengine.sizes import parse_size
from clipengine.training import checkpoint as ckpt
from clipengine.training.config import RUN_IDENTITY, TrainConfig, adam_defaults
from clipengine.training.cpu_plan import CpuPlanner, Plan
from clipengine.training.data import (
    PairDataset,
    SampleMaker,
    Sequential,
    StepBatches,
    collate_pairs,
    default_val_size,
    split_validation,
)
from clipengine.training.decode_cache import DecodedCache, TrainingShrink, crop_headroom
from clipengine.training.distributed import (
    World,
    barrier,
    gathered,
    mean_over_world,
    on_main,
    setup_world,
    teardown_world,
)
from clipengine.training.loss import LOSSES, MAX_LOGIT_SCALE, SIGLIP_INIT_LOGIT_BIAS, SIGLIP_INIT_LOGIT_SCALE
from clipengine.training.stream import (
    FaultPolicy,
    StreamedBatches,
    StreamedPairs,
    StreamLayout,
    lanes_from_checkpoint,
)

LOG_FILE = "log.jsonl"


class TrainingDiverged(ClipEngineError):
    """The loss became NaN or infinite."""


@dataclass
class TrainReport:
    out: str
    step: int
    epoch: int
    samples: int
    seconds: float
    samples_per_second: float
    loss: float | None
    logit_scale: float
    val: dict[str, float] = field(default_factory=dict)
    val_images: int = 0
    chance: dict[str, float] = field(default_factory=dict)
    dropped_rows: int = 0
    bad_images: list[dict] = field(default_factory=list)
    decode_cache: dict = field(default_factory=dict)
    skipped_shards: list[dict] = field(default_factory=list)  # streamed shards given up on, and why

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def cosine_lr(step: int, base_lr: float, warmup: int, total: int) -> float:
    """Linear warmup then cosine decay to zero, the schedule of CLIP and open_clip."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))) * base_lr


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: never on biases, norms, embeddings or the temperature/bias."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exempt = p.ndim < 2 or "embedding" in name or "logit_" in name or name.endswith(".bias")
        (no_decay if exempt else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# --------------------------------------------------------------------------------------------------
# Set-up
# --------------------------------------------------------------------------------------------------


def _precision(requested: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, whether a gradient scaler is needed)."""
    if requested == "auto":
        if device.type == "cuda":
            requested = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            requested = "fp32"
    if requested == "fp32":
        return None, False
    if requested == "bf16":
        return torch.bfloat16, False
    if requested == "fp16":  # on a CPU it runs (slowly): that is how the tests cover the scaler path
        return torch.float16, True
    raise BadInput(f"unknown precision '{requested}' (auto, fp32, bf16, fp16)")


def _build_model(config: TrainConfig, device: torch.device, resume_from: Path | None) -> tuple[LoadedModel, dict, str]:
    """The model to train, its open_clip config and its architecture name."""
    if resume_from is not None:  # the step directory holds the architecture and the weights
        source = resolve_source(ModelSpec(checkpoint=str(resume_from)))
        arch = source["arch"]
    else:
        source = resolve_source(ModelSpec(config.model if not config.checkpoint else None,
                                          config.pretrained, config.checkpoint))
        arch = source["arch"]
        if source["source"] == "random":  # from scratch, --seed chooses the initial weights too
            source = {**source, "seed": config.seed, "identity": f"random:{arch}:seed{config.seed}"}
    loaded = load_model(source, device=str(device))
    model_cfg = model_config(source)
    model = loaded.model
    if config.loss == "siglip" and getattr(model, "logit_bias", None) is None:
        model.logit_bias = torch.nn.Parameter(torch.full_like(model.logit_scale, SIGLIP_INIT_LOGIT_BIAS))
        if source["source"] == "random":
            with torch.no_grad():
                model.logit_scale.fill_(SIGLIP_INIT_LOGIT_SCALE)
        model_cfg = {**model_cfg, "init_logit_bias": SIGLIP_INIT_LOGIT_BIAS}
    if config.lock_image and config.lock_text:
        raise BadInput("--lock-image and --lock-text together leave nothing to train")
    if config.lock_image:
        model.lock_image_tower()
    if config.lock_text:
        model.lock_text_tower()
    if config.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return loaded, model_cfg, arch


def _loader(dataset: PairDataset, sampler: Any, workers: int, device: torch.device) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate_pairs,
        pin_memory=device.type == "cuda", persistent_workers=workers > 0,
    )


# --------------------------------------------------------------------------------------------------
# One optimisation step
# --------------------------------------------------------------------------------------------------


class Optimisation:
    """The model wrapped for training and everything that updates it: DDP, AdamW, the precision and its
    gradient scaler, the loss. One step is `forward_backward` then `update`; in between the loop checks
    the loss, so that a NaN never reaches the weights."""

    def __init__(self, loaded: LoadedModel, config: TrainConfig, beta2: float, eps: float, world: World,
                 device: torch.device):
        self.model = loaded.model
        self.model.train()
        self.forward = TrainingForward(self.model)
        self.wrapped: torch.nn.Module = self.forward
        if world.distributed:
            self.wrapped = torch.nn.parallel.DistributedDataParallel(
                self.forward, device_ids=[device.index] if device.type == "cuda" else None)
        self.amp_dtype, needs_scaler = _precision(config.precision, device)
        self.scaler = torch.amp.GradScaler(device.type) if needs_scaler else None
        groups = param_groups(self.model, config.weight_decay)
        self.trainable = [p for g in groups for p in g["params"]]
        self.optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, beta2), eps=eps,
                                           fused=device.type in ("cuda", "cpu"))  # one kernel for all parameters
        self.loss_fn = LOSSES[config.loss]
        self.world = world
        self.device = device

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else contextlib.nullcontext()

    def forward_backward(self, pixels: torch.Tensor, texts: torch.Tensor, accum_steps: int) -> torch.Tensor:
        """Forward and backward over one local batch; returns the (local) loss. With `accum_steps` > 1, by
        gradient caching (see the module docstring)."""
        world = self.world
        scale_loss = self.scaler.scale if self.scaler else (lambda loss: loss)
        if accum_steps == 1:
            with self.autocast():
                image, text, scale, bias = self.wrapped(pixels, texts)
            loss = self.loss_fn(image.float(), text.float(), scale.float(), None if bias is None else bias.float(),
                                rank=world.rank, world_size=world.world_size)
            scale_loss(loss).backward()
            return loss.detach()

        chunks = list(zip(pixels.chunk(accum_steps), texts.chunk(accum_steps), strict=True))
        with torch.no_grad(), self.autocast():
            cached = [self.forward(p, t) for p, t in chunks]
        image = torch.cat([c[0] for c in cached]).float().requires_grad_()
        text = torch.cat([c[1] for c in cached]).float().requires_grad_()
        scale = cached[0][2].float().requires_grad_()
        bias = None if cached[0][3] is None else cached[0][3].float().requires_grad_()
        loss = self.loss_fn(image, text, scale, bias, rank=world.rank, world_size=world.world_size)
        scale_loss(loss).backward()
        sizes = [len(p) for p, _ in chunks]
        offsets = [sum(sizes[:j]) for j in range(len(sizes))]
        ddp = self.wrapped if isinstance(self.wrapped, torch.nn.parallel.DistributedDataParallel) else None
        for j, (p, t) in enumerate(chunks):
            last = j == len(chunks) - 1
            sync = ddp.no_sync() if ddp is not None and not last else contextlib.nullcontext()
            with sync:
                with self.autocast():
                    outs = self.wrapped(p, t)
                rows = slice(offsets[j], offsets[j] + sizes[j])
                assert image.grad is not None and text.grad is not None and scale.grad is not None
                grads = [image.grad[rows], text.grad[rows], scale.grad / len(chunks),
                         None if bias is None else bias.grad / len(chunks)]
                pairs = [(o, g.to(o.dtype)) for o, g in zip(outs, grads, strict=True)
                         if o is not None and o.requires_grad]
                torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        return loss.detach()

    def update(self, lr: float, grad_clip: float | None) -> None:
        """Clip, step AdamW at `lr`, clear the gradients, and keep the temperature within CLIP's bound."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(self.trainable, grad_clip)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)

    def discard(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def state(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict() if self.scaler else None}

    def restore(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    @property
    def temperature_scale(self) -> float:
        return float(self.model.logit_scale.detach().exp())


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------


@torch.inference_mode()
def evaluate(loaded: LoadedModel, pairs: PairSet, *, batch_size: int = 256, workers: int = 0,
             max_pixels: int = DEFAULT_MAX_PIXELS, transparency: str = WHITE) -> dict[str, float]:
    """Recall@1/5/10 in both directions on held-out pairs, with every caption of every image.
    `transparency` DROP scores a model trained by open_clip as it was trained (clipengine.images.TRANSPARENCY)."""
    model, was_training = loaded.model, loaded.model.training
    model.eval()
    pixel_transform, normalizer = _split(loaded.image_transform(), loaded.device)
    dataset = PairDataset(pairs, SampleMaker(pixel_transform, loaded.tokenizer, image_size=loaded.image_size,
                                             max_pixels=max_pixels, all_captions=True, transparency=transparency))
    images: list[torch.Tensor] = []
    texts: list[torch.Tensor] = []
    owners: list[int] = []
    for pixels, tokens, owner, _, _ in _loader(dataset, Sequential(len(pairs), batch_size), workers, loaded.device):
        owners.extend(o + sum(map(len, images)) for o in owner)  # batch rows -> rows of the whole set
        with loaded.autocast():
            images.append(model.encode_image(normalizer(pixels), normalize=True).float().cpu())
            texts.append(model.encode_text(tokens.to(loaded.device), normalize=True).float().cpu())
    model.train(was_training)
    return retrieval_recall(torch.cat(images).numpy(), torch.cat(texts).numpy(), owners)


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


def _check_out_dir(config: TrainConfig, out: Path) -> Path | None:
    """The step directory to resume from, after checking that `out` may be used."""
    steps = ckpt.step_directories(out)
    if not config.resume:
        if steps:
            raise BadInput(f"{out} already holds a training run: add --resume to continue it, or choose another --out")
        return None
    if not steps:
        raise BadInput(f"nothing to resume in {out}: it holds no checkpoint (drop --resume to start)")
    saved = ckpt.read_run_config(steps[-1])
    defaults = TrainConfig(data="")  # a run saved before a setting existed ran with its default
    changed = [k for k in RUN_IDENTITY if saved.get(k, getattr(defaults, k)) != getattr(config, k)]
    if changed:
        what = ", ".join(f"{k}: {saved.get(k)!r} -> {getattr(config, k)!r}" for k in changed)
        raise BadInput(f"--resume must continue the same run, but these settings differ ({what})")
    return steps[-1]


def _log(out: Path, record: dict) -> None:
    with open(out / LOG_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")


def train(config: TrainConfig, progress: Callable[[dict], None] | None = None) -> TrainReport:
    """Train (or fine-tune) a CLIP model on image–caption pairs; the output directory is a checkpoint.

    `progress` receives one dict per step (``kind: "step"``) and per validation (``kind: "val"``,
    with ``recall``), on the main process only; the same dicts go to OUT/log.jsonl. Works unchanged under torchrun.
    """
    if config.loss not in LOSSES:
        raise BadInput(f"unknown loss '{config.loss}' (one of {', '.join(LOSSES)})")
    if config.accum_steps < 1 or config.batch_size < 1 or config.epochs < 1:
        raise BadInput("--batch-size, --accum-steps and --epochs must be at least 1")
    out = Path(config.out).expanduser()
    resume_from = _check_out_dir(config, out)

    world, device = setup_world(pick_device(config.device))
    try:
        return _run(config, out, resume_from, world, device, progress)
    finally:
        teardown_world(world)


@dataclass
class Tally:
    """What the loop has done so far: the step it is at, the samples and seconds behind it, the last loss,
    and the images it could not decode (a run whose images mostly fail stops, rather than learn from few)."""

    step: int
    samples: int = 0
    seconds: float = 0.0
    loss: float | None = None
    bad: dict[str, str] = field(default_factory=dict)
    bad_attempts: float = 0.0
    samples_seen: float = 0.0

    def count_batch(self, loss: torch.Tensor, bad_here: list[tuple[str, str]], batch: int, world: World) -> None:
        for ref, reason in bad_here:
            self.bad.setdefault(ref, reason)
        stats = mean_over_world(torch.tensor([loss.item(), len(bad_here), batch], dtype=torch.float64), world)
        self.loss = float(stats[0])
        self.bad_attempts += float(stats[1])
        self.samples_seen += float(stats[2])

    def check(self, out: Path) -> None:
        """Stop on a loss that is not finite, or on a data set that mostly cannot be decoded."""
        assert self.loss is not None
        if not math.isfinite(self.loss):
            kept = ckpt.step_directories(out)
            where = f"the last good checkpoint is {kept[-1]}" if kept else "no checkpoint was written yet"
            raise TrainingDiverged(f"the loss became {self.loss} at step {self.step + 1}: stopped; {where}. "
                                   "Lower --lr, raise --warmup-steps, or use --precision fp32")
        if self.bad_attempts > MOSTLY_BAD * self.samples_seen:
            ref, reason = next(iter(self.bad.items()))
            raise BadInput(f"most training images cannot be decoded ({int(self.bad_attempts)} failures in "
                           f"{int(self.samples_seen)} samples; first: {ref}: {reason})")

    def finish_step(self, batch_size: int, seconds: float) -> None:
        self.step += 1
        self.samples += batch_size
        self.seconds += seconds

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.seconds if self.seconds else 0.0


class Journal:
    """Where the main process reports: OUT/log.jsonl and the caller's progress callback. Other ranks stay quiet."""

    def __init__(self, out: Path, world: World, progress: Callable[[dict], None] | None):
        self.out, self.world, self.progress = out, world, progress
        if world.is_main:
            out.mkdir(parents=True, exist_ok=True)

    def __call__(self, record: dict, *, log: bool = True) -> None:
        if not self.world.is_main:
            return
        if log:
            _log(self.out, record)
        if self.progress:
            self.progress(record)


@dataclass
class Schedule:
    """Where the run is going: steps in all (the lr schedule spans them), warmup, and where this invocation stops."""

    steps_per_epoch: int
    total: int
    warmup: int
    last: int

    @classmethod
    def for_run(cls, config: TrainConfig, steps_per_epoch: int) -> Schedule:
        total = config.epochs * steps_per_epoch
        warmup = config.warmup_steps if config.warmup_steps is not None else max(1, round(0.05 * total))
        return cls(steps_per_epoch, total, warmup, min(total, config.max_steps) if config.max_steps else total)

    def lr(self, step: int, base_lr: float) -> float:
        return cosine_lr(step, base_lr, self.warmup, self.total)

    def epoch_ends(self, step: int) -> bool:
        return step % self.steps_per_epoch == 0 or step >= self.last


@dataclass
class Run:
    """What stays fixed while the loop runs, and the two things it does at an epoch's end."""

    config: TrainConfig
    out: Path
    world: World
    loaded: LoadedModel
    model_cfg: dict
    arch: str
    opt: Optimisation
    journal: Journal
    val_pairs: PairSet
    stream: StreamedBatches | None

    def save(self, tally: Tally, epoch: int) -> None:
        """A checkpoint of this step: the weights, plus what --resume needs (optimiser, scaler, RNG, config,
        and where every data lane stands when the data is streamed)."""
        lanes = gathered(self.stream.lane_states(), self.world) if self.stream else []
        if self.world.is_main:
            state = {"step": tally.step, "epoch": epoch, **self.opt.state(), "rng": ckpt.rng_state()}
            if self.stream:
                state["stream"] = {"lanes_total": self.stream.dataset.layout.lanes,
                                   "lanes": {k: v for here in lanes for k, v in here.items()}}
            ckpt.write_checkpoint(self.out, tally.step, self.opt.model, self.model_cfg, self.loaded.preprocess_cfg,
                                  self.arch, state, self.config.to_dict())
        barrier(self.world)

    def validate(self, tally: Tally, epoch: int, workers: int) -> dict[str, float]:
        """Held-out recall, on the main process (the others wait)."""
        result: dict[str, float] = {}
        if self.world.is_main and len(self.val_pairs):
            result = evaluate(self.loaded, self.val_pairs, workers=workers, max_pixels=self.config.max_pixels)
            self.journal({"kind": "val", "step": tally.step, "epoch": epoch, "recall": result})
        barrier(self.world)
        return result


def streams(config: TrainConfig) -> bool:
    """Whether the run streams its shards (`clipengine.training.stream`) rather than indexing its data."""
    return config.stream or config.resampled or is_streamed(config.data)


def _read_data(config: TrainConfig, world: World) -> tuple[PairSet, PairSet, PairSet]:
    """(everything read, the training pairs, the validation pairs); for streamed data, only the last."""
    local_batch = config.batch_size // world.world_size
    if local_batch % config.accum_steps:
        raise BadInput(f"the batch of each process ({local_batch}) must be divisible by --accum-steps {config.accum_steps}")
    if streams(config):
        if config.val_size:
            raise BadInput("streamed data holds nothing out for validation: name a validation set with --val-data")
        val_pairs = read_pairs(config.val_data, config.image_root) if config.val_data else PairSet()
        return PairSet(), PairSet(), val_pairs
    pairs = read_pairs(config.data, config.image_root)
    if config.val_data:
        train_pairs, val_pairs = pairs, read_pairs(config.val_data, config.image_root)
    else:
        val_size = default_val_size(len(pairs)) if config.val_size is None else config.val_size
        train_pairs, val_pairs = split_validation(pairs, val_size)
    return pairs, train_pairs, val_pairs


def _stream_layout(config: TrainConfig, world: World, lanes_here: int) -> tuple[StreamLayout, FaultPolicy]:
    """The lanes of a streamed run, after checking (on every process, before step 1) that the data can be read."""
    shards = shard_names(config.data)
    policy = FaultPolicy(config.shard_retries, config.shard_backoff, config.shard_timeout)
    check_readable(shards, policy.timeout)
    sizes = None if config.resampled else on_main(lambda: read_sizes(shards, policy.timeout), world)
    layout = StreamLayout(tuple(shards), None if sizes is None else tuple(sizes), config.seed, config.batch_size,
                          world.world_size * lanes_here, config.resampled, config.samples_per_epoch,
                          config.shuffle_buffer)
    return layout, policy


def _run(config: TrainConfig, out: Path, resume_from: Path | None, world: World, device: torch.device,
         progress: Callable[[dict], None] | None) -> TrainReport:
    # ---- data: indexed pairs (batches by step) or streamed shards (lanes), checked before the model loads
    pairs, train_pairs, val_pairs = _read_data(config, world)
    streamed = streams(config)
    if streamed:  # the data's lanes are its workers
        layout, policy = _stream_layout(config, world, max(1, _default_workers(config, device, world)))
        steps_per_epoch = layout.steps_per_epoch
    else:
        sampler = StepBatches(len(train_pairs), config.batch_size, seed=config.seed, rank=world.rank,
                              world_size=world.world_size)
        steps_per_epoch = sampler.steps_per_epoch

    # ---- model and optimiser; the AdamW settings that ran are what checkpoints record
    loaded, model_cfg, arch = _build_model(config, device, resume_from)
    default_beta2, default_eps = adam_defaults(arch)
    config = dataclasses.replace(config, beta2=default_beta2 if config.beta2 is None else config.beta2,
                                 eps=default_eps if config.eps is None else config.eps)
    assert config.beta2 is not None and config.eps is not None
    opt = Optimisation(loaded, config, config.beta2, config.eps, world, device)

    # ---- the schedule, and where this run starts in it
    schedule = Schedule.for_run(config, steps_per_epoch)
    tally = Tally(step=0)
    state: dict = {}
    if resume_from is not None:
        state = ckpt.read_checkpoint_state(resume_from)
        opt.restore(state)
        ckpt.restore_rng_state(state["rng"])
        tally.step = int(state["step"])

    # ---- loading: workers and threads (measured on a CPU), the decode cache, the loader
    planner = _cpu_planner(config, device, world, schedule.last - tally.step, fixed_workers=streamed)
    plan = planner.current
    torch.set_num_threads(plan.threads)
    transform = loaded.image_transform(train=True)
    shrink = TrainingShrink(loaded.image_size, crop_headroom(transform))
    cache = _decode_cache(config, shrink)
    pixel_transform, normalizer = _split(transform, device)
    maker = SampleMaker(pixel_transform, loaded.tokenizer, image_size=loaded.image_size,
                        max_pixels=config.max_pixels, shrink=shrink, cache=cache)
    stream: StreamedBatches | None = None
    if streamed:
        stream = StreamedBatches(StreamedPairs(layout, maker, rank=world.rank, lanes_here=max(1, plan.workers),
                                               policy=policy), plan.workers, device.type == "cuda")
        if "stream" in state:
            stream.restore(tally.step // steps_per_epoch,
                           lanes_from_checkpoint(state["stream"], layout, tally.step % steps_per_epoch))
    else:
        dataset = PairDataset(train_pairs, maker)
        loader = _loader(dataset, sampler, plan.workers, device)
    run = Run(config, out, world, loaded, model_cfg, arch, opt, Journal(out, world, progress), val_pairs, stream)
    if streamed:
        run.journal({"kind": "stream", "shards": len(layout.shards), "lanes": layout.lanes,
                     "processes": world.world_size, "samples_per_epoch": layout.samples_in_epoch,
                     "steps_per_epoch": layout.steps_per_epoch, "resampled": layout.resampled})
    samples_log = out / f"samples-rank{world.rank}.jsonl" if config.log_samples else None

    # ---- the loop: an epoch at a time, from wherever the run stands
    val: dict[str, float] = {}
    epoch = tally.step // schedule.steps_per_epoch
    while tally.step < schedule.last:
        start = tally.step - epoch * schedule.steps_per_epoch
        if stream is not None:
            batches: Any = stream.epoch(epoch, start)
        else:
            sampler.set_position(epoch, start)
            batches = loader
        switch_to: Plan | None = None
        tick = time.perf_counter()
        for pixels, texts, _, bad_here, ids in batches:
            waited = time.perf_counter() - tick
            lr = schedule.lr(tally.step, config.lr)
            loss = opt.forward_backward(normalizer(pixels), texts.to(device, non_blocking=True), config.accum_steps)
            tally.count_batch(loss, bad_here, len(pixels), world)
            try:
                tally.check(out)
            except ClipEngineError:
                opt.discard()
                raise
            opt.update(lr, config.grad_clip)
            step_seconds = time.perf_counter() - tick
            tally.finish_step(config.batch_size, step_seconds)
            if samples_log is not None:
                _log_samples(samples_log, tally.step, ids if streamed else [describe_ref(train_pairs.images[i]) for i in ids])
            run.journal({"kind": "step", "step": tally.step, "total": schedule.last, "epoch": epoch,
                         "loss": tally.loss, "lr": lr, "logit_scale": opt.temperature_scale,
                         "samples_per_second": tally.samples_per_second, "seconds": tally.seconds},
                        log=tally.step % config.log_every == 0 or tally.step == schedule.last)
            if config.save_every and tally.step % config.save_every == 0 and tally.step < schedule.last:
                run.save(tally, epoch)
            if planner.deciding:
                switch_to = planner.observe(step_seconds, waited)
                if switch_to == plan:
                    switch_to = None  # decided on the plan it runs
                if not planner.deciding:
                    run.journal(planner.record())
                if switch_to is not None and switch_to.workers == plan.workers:  # threads alone: the loader stays
                    plan, switch_to = switch_to, None
                    torch.set_num_threads(plan.threads)
            if tally.step >= schedule.last or switch_to is not None:
                break
            tick = time.perf_counter()
        if switch_to is not None:  # a new plan: its threads, and a loader with its workers
            plan = switch_to
            torch.set_num_threads(plan.threads)
            loader = _loader(dataset, sampler, plan.workers, device)
            if not schedule.epoch_ends(tally.step):
                continue  # on with this epoch from the next step
        if schedule.epoch_ends(tally.step):
            val = run.validate(tally, epoch, plan.workers)
            run.save(tally, epoch)
        epoch += 1
    skipped = {k: v for here in gathered(stream.faults if stream else {}, world) for k, v in here.items()}
    if tally.step >= schedule.last and not val and resume_from is not None and world.is_main and len(val_pairs):
        val = evaluate(loaded, val_pairs, workers=plan.workers, max_pixels=config.max_pixels)  # resumed a finished run

    return TrainReport(
        out=str(out), step=tally.step, epoch=min(epoch, config.epochs), samples=tally.samples, seconds=tally.seconds,
        samples_per_second=tally.samples_per_second, loss=tally.loss, logit_scale=opt.temperature_scale, val=val,
        val_images=len(val_pairs),
        chance={f"text_to_image_R@{k}": chance_recall(len(val_pairs), k) for k in (1, 5, 10)} if len(val_pairs) else {},
        dropped_rows=len(pairs.dropped), bad_images=[{"path": r, "reason": why} for r, why in tally.bad.items()],
        decode_cache=cache.stats() if cache and world.is_main else {},
        skipped_shards=[{"shard": shard, "reason": why} for shard, why in sorted(skipped.items())],
    )


def _log_samples(path: Path, step: int, names: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps({"step": step, "samples": names}) + "\n")


def _cores_per_process(world: World) -> int:
    return max(1, available_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", world.world_size)))


def _default_workers(config: TrainConfig, device: torch.device, world: World) -> int:
    if config.workers is not None:
        return config.workers
    per_process = _cores_per_process(world)
    return max(1, min(per_process - 1, 8)) if device.type == "cuda" else max(1, per_process // 4)


def _cpu_planner(config: TrainConfig, device: torch.device, world: World, steps_left: int, *,
                 fixed_workers: bool = False) -> CpuPlanner:
    """Data workers and torch threads: the user's, else (on a CPU) measured over this run's first steps.

    Oversubscribing the cores is the costliest mistake on a CPU when decoding is heavy (an OpenMP thread
    descheduled while a worker decodes stalls every other thread at the next barrier), and the best
    choice when the model is heavy and the worker mostly waits; only measuring tells which run is which.
    With `fixed_workers` (streamed data, whose workers are its lanes) only the threads are tried.
    """
    per_process = _cores_per_process(world)
    workers = _default_workers(config, device, world)
    if device.type == "cuda":
        return CpuPlanner.fixed(Plan(workers, config.threads or torch.get_num_threads()))
    omp = os.environ.get("OMP_NUM_THREADS", "")
    threads = config.threads or (int(omp) if omp.isdigit() else None)
    if threads or world.distributed or (config.workers is not None and not fixed_workers):
        return CpuPlanner.fixed(Plan(workers, threads or max(1, per_process - workers)))  # ranks would have to agree
    if fixed_workers:
        return CpuPlanner.for_threads(workers, per_process, steps_left)
    return CpuPlanner.for_run(per_process, steps_left)


def _decode_cache(config: TrainConfig, shrink: TrainingShrink) -> DecodedCache | None:
    if config.decode_cache == "off":
        return None
    path = DecodedCache.default_path() if config.decode_cache == "auto" else Path(config.decode_cache).expanduser()
    size = parse_size(config.decode_cache_size, "--decode-cache-size")
    try:
        return DecodedCache(path, f"side{shrink.side}:{WHITE}", size)
    except (OSError, sqlite3.Error) as e:
        raise BadInput(f"cannot use the decode cache {path} ({e}): name another file, or --decode-cache off") from None


def _split(transform: Callable, device: torch.device) -> tuple[Callable, PixelNormalizer]:
    """The PIL half of a transform for the workers, and its normalisation for batches on the device."""
    pixel_transform, normalize = split_transform(transform)
    return pixel_transform, PixelNormalizer(normalize, device)
