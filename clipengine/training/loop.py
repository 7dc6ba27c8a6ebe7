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
from clipengine.embed import PixelNormalizer, available_cores, split_transform
from clipengine.errors import BadInput, ClipEngineError
from clipengine.images import DEFAULT_MAX_PIXELS, WHITE
from clipengine.metrics import chance_recall, retrieval_recall
from clipengine.models import LoadedModel, ModelSpec, load_model, model_config, pick_device, resolve_source
from clipengine.pairs import MOSTLY_BAD, PairSet, read_pairs
from clipengine.sizes import parse_size
from clipengine.training import checkpoint as ckpt
from clipengine.training.config import RUN_IDENTITY, TrainConfig, adam_defaults
from clipengine.training.cpu_plan import CpuPlanner, Plan
from clipengine.training.data import (
    PairDataset,
    Sequential,
    StepBatches,
    collate_pairs,
    default_val_size,
    split_validation,
)
from clipengine.training.decoded import DecodedCache, TrainingShrink, crop_headroom
from clipengine.training.distributed import World, barrier, mean_over_world, setup_world, teardown_world
from clipengine.training.loss import LOSSES, MAX_LOGIT_SCALE, SIGLIP_INIT_LOGIT_BIAS, SIGLIP_INIT_LOGIT_SCALE

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


def _forward_backward(forward: TrainingForward, wrapped: torch.nn.Module, pixels: torch.Tensor, texts: torch.Tensor,
                      loss_fn: Callable, world: World, accum_steps: int, autocast: Callable,
                      scale_loss: Callable) -> torch.Tensor:
    """Forward and backward over one local batch; returns the (local) loss. See the module docstring.
    `wrapped` is `forward`, or the DDP module around it."""
    if accum_steps == 1:
        with autocast():
            image, text, scale, bias = wrapped(pixels, texts)
        loss = loss_fn(image.float(), text.float(), scale.float(), None if bias is None else bias.float(),
                       rank=world.rank, world_size=world.world_size)
        scale_loss(loss).backward()
        return loss.detach()

    chunks = list(zip(pixels.chunk(accum_steps), texts.chunk(accum_steps), strict=True))
    with torch.no_grad(), autocast():
        cached = [forward(p, t) for p, t in chunks]
    image = torch.cat([c[0] for c in cached]).float().requires_grad_()
    text = torch.cat([c[1] for c in cached]).float().requires_grad_()
    scale = cached[0][2].float().requires_grad_()
    bias = None if cached[0][3] is None else cached[0][3].float().requires_grad_()
    loss = loss_fn(image, text, scale, bias, rank=world.rank, world_size=world.world_size)
    scale_loss(loss).backward()
    sizes = [len(p) for p, _ in chunks]
    offsets = [sum(sizes[:j]) for j in range(len(sizes))]
    ddp = wrapped if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel) else None
    for j, (p, t) in enumerate(chunks):
        last = j == len(chunks) - 1
        sync = ddp.no_sync() if ddp is not None and not last else contextlib.nullcontext()
        with sync:
            with autocast():
                outs = wrapped(p, t)
            rows = slice(offsets[j], offsets[j] + sizes[j])
            assert image.grad is not None and text.grad is not None and scale.grad is not None
            grads = [image.grad[rows], text.grad[rows], scale.grad / len(chunks),
                     None if bias is None else bias.grad / len(chunks)]
            pairs = [(o, g.to(o.dtype)) for o, g in zip(outs, grads, strict=True) if o is not None and o.requires_grad]
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
    return loss.detach()


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
    dataset = PairDataset(pairs, pixel_transform, loaded.tokenizer, image_size=loaded.image_size,
                          max_pixels=max_pixels, all_captions=True, transparency=transparency)
    images: list[torch.Tensor] = []
    texts: list[torch.Tensor] = []
    owners: list[int] = []
    for pixels, tokens, owner, _ in _loader(dataset, Sequential(len(pairs), batch_size), workers, loaded.device):
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
    changed = [k for k in RUN_IDENTITY if saved.get(k) != getattr(config, k)]
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


def _run(config: TrainConfig, out: Path, resume_from: Path | None, world: World, device: torch.device,
         progress: Callable[[dict], None] | None) -> TrainReport:
    # ---- data
    pairs = read_pairs(config.data, config.image_root)
    if config.val_data:
        train_pairs, val_pairs = pairs, read_pairs(config.val_data, config.image_root)
    else:
        val_size = default_val_size(len(pairs)) if config.val_size is None else config.val_size
        train_pairs, val_pairs = split_validation(pairs, val_size)
    local_batch = config.batch_size // world.world_size
    if local_batch % config.accum_steps:
        raise BadInput(f"the batch of each process ({local_batch}) must be divisible by --accum-steps {config.accum_steps}")
    sampler = StepBatches(len(train_pairs), config.batch_size, seed=config.seed, rank=world.rank,
                          world_size=world.world_size)

    # ---- model, optimiser, precision
    loaded, model_cfg, arch = _build_model(config, device, resume_from)
    default_beta2, default_eps = adam_defaults(arch)
    beta2 = config.beta2 if config.beta2 is not None else default_beta2
    eps = config.eps if config.eps is not None else default_eps
    config = dataclasses.replace(config, beta2=beta2, eps=eps)  # checkpoints record what ran
    model = loaded.model
    model.train()
    forward = TrainingForward(model)
    wrapped: torch.nn.Module = forward
    if world.distributed:
        wrapped = torch.nn.parallel.DistributedDataParallel(
            forward, device_ids=[device.index] if device.type == "cuda" else None)
    amp_dtype, needs_scaler = _precision(config.precision, device)
    scaler = torch.amp.GradScaler(device.type) if needs_scaler else None

    def autocast() -> contextlib.AbstractContextManager:
        return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()

    def scale_loss(loss: torch.Tensor) -> torch.Tensor:
        return scaler.scale(loss) if scaler else loss

    groups = param_groups(model, config.weight_decay)
    trainable = [p for g in groups for p in g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, beta2), eps=eps,
                                  fused=device.type in ("cuda", "cpu"))  # one kernel for all parameters
    loss_fn = LOSSES[config.loss]

    steps_per_epoch = sampler.steps_per_epoch
    total_steps = config.epochs * steps_per_epoch
    warmup = config.warmup_steps if config.warmup_steps is not None else max(1, round(0.05 * total_steps))
    last_step = min(total_steps, config.max_steps) if config.max_steps else total_steps
    step = 0
    if resume_from is not None:
        state = ckpt.read_checkpoint_state(resume_from)
        optimizer.load_state_dict(state["optimizer"])
        if scaler and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        ckpt.restore_rng_state(state["rng"])
        step = int(state["step"])

    planner = _cpu_planner(config, device, world, last_step - step)
    plan = planner.current
    torch.set_num_threads(plan.threads)
    transform = loaded.image_transform(train=True)
    shrink = TrainingShrink(loaded.image_size, crop_headroom(transform))
    cache = _decode_cache(config, shrink)
    pixel_transform, normalizer = _split(transform, device)
    dataset = PairDataset(train_pairs, pixel_transform, loaded.tokenizer, image_size=loaded.image_size,
                          max_pixels=config.max_pixels, shrink=shrink, cache=cache)
    loader = _loader(dataset, sampler, plan.workers, device)
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)

    def save(epoch: int) -> None:
        if world.is_main:
            state = {"step": step, "epoch": epoch, "optimizer": optimizer.state_dict(),
                     "scaler": scaler.state_dict() if scaler else None, "rng": ckpt.rng_state()}
            ckpt.write_checkpoint(out, step, model, model_cfg, loaded.preprocess_cfg, arch, state, config.to_dict())
        barrier(world)

    def validate(epoch: int) -> dict[str, float]:
        result: dict[str, float] = {}
        if world.is_main and len(val_pairs):
            result = evaluate(loaded, val_pairs, workers=plan.workers, max_pixels=config.max_pixels)
            record = {"kind": "val", "step": step, "epoch": epoch, "recall": result}
            _log(out, record)
            if progress:
                progress(record)
        barrier(world)
        return result

    # ---- the loop
    bad: dict[str, str] = {}
    bad_attempts = samples_seen = 0.0
    samples = 0
    train_seconds = 0.0
    loss_value: float | None = None
    val: dict[str, float] = {}
    epoch = step // steps_per_epoch
    while step < last_step:
        sampler.set_position(epoch, step - epoch * steps_per_epoch)
        switch_to: Plan | None = None
        tick = time.perf_counter()
        for pixels, texts, _, bad_here in loader:
            waited = time.perf_counter() - tick
            lr = cosine_lr(step, config.lr, warmup, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            pixels = normalizer(pixels)
            texts = texts.to(device, non_blocking=True)
            loss = _forward_backward(forward, wrapped, pixels, texts, loss_fn, world, config.accum_steps,
                                     autocast, scale_loss)
            for ref, reason in bad_here:
                bad.setdefault(ref, reason)
            stats = mean_over_world(torch.tensor([loss.item(), len(bad_here), len(pixels)], dtype=torch.float64), world)
            loss_value, bad_attempts, samples_seen = (float(stats[0]), bad_attempts + float(stats[1]),
                                                      samples_seen + float(stats[2]))
            if not math.isfinite(loss_value):
                optimizer.zero_grad(set_to_none=True)
                kept = ckpt.step_directories(out)
                where = f"the last good checkpoint is {kept[-1]}" if kept else "no checkpoint was written yet"
                raise TrainingDiverged(f"the loss became {loss_value} at step {step + 1}: stopped; {where}. "
                                       "Lower --lr, raise --warmup-steps, or use --precision fp32")
            if bad_attempts > MOSTLY_BAD * samples_seen:
                ref, reason = next(iter(bad.items()))
                raise BadInput(f"most training images cannot be decoded ({int(bad_attempts)} failures in "
                               f"{int(samples_seen)} samples; first: {ref}: {reason})")
            if scaler:
                scaler.unscale_(optimizer)
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip)
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
            step += 1
            samples += config.batch_size
            step_seconds = time.perf_counter() - tick
            train_seconds += step_seconds
            if world.is_main:
                record = {"kind": "step", "step": step, "total": last_step, "epoch": epoch, "loss": loss_value,
                          "lr": lr, "logit_scale": float(model.logit_scale.detach().exp()),
                          "samples_per_second": samples / train_seconds if train_seconds else 0.0,
                          "seconds": train_seconds}
                if step % config.log_every == 0 or step == last_step:
                    _log(out, record)
                if progress:
                    progress(record)
            if config.save_every and step % config.save_every == 0 and step < last_step:
                save(epoch)
            if planner.deciding:
                switch_to = planner.observe(step_seconds, waited)
                if switch_to == plan:
                    switch_to = None  # decided on the plan it runs
                if not planner.deciding and world.is_main:
                    decision = planner.record()
                    _log(out, decision)
                    if progress:
                        progress(decision)
            if step >= last_step or switch_to is not None:
                break
            tick = time.perf_counter()
        if switch_to is not None:  # a new plan: its threads, and a loader with its workers
            plan = switch_to
            torch.set_num_threads(plan.threads)
            loader = _loader(dataset, sampler, plan.workers, device)
            if step % steps_per_epoch and step < last_step:
                continue  # on with this epoch from the next step
        if step % steps_per_epoch == 0 or step >= last_step:
            val = validate(epoch)
            save(epoch)
        epoch += 1
    if step >= last_step and not val and resume_from is not None and world.is_main and len(val_pairs):
        val = evaluate(loaded, val_pairs, workers=plan.workers, max_pixels=config.max_pixels)  # resumed a finished run

    return TrainReport(
        out=str(out), step=step, epoch=min(epoch, config.epochs), samples=samples, seconds=train_seconds,
        samples_per_second=samples / train_seconds if train_seconds else 0.0, loss=loss_value,
        logit_scale=float(model.logit_scale.detach().exp()), val=val, val_images=len(val_pairs),
        chance={f"text_to_image_R@{k}": chance_recall(len(val_pairs), k) for k in (1, 5, 10)} if len(val_pairs) else {},
        dropped_rows=len(pairs.dropped), bad_images=[{"path": r, "reason": why} for r, why in bad.items()],
        decode_cache=cache.stats() if cache and world.is_main else {},
    )


def _cpu_planner(config: TrainConfig, device: torch.device, world: World, steps_left: int) -> CpuPlanner:
    """Data workers and torch threads: the user's, else (on a CPU) measured over this run's first steps.

    Oversubscribing the cores is the costliest mistake on a CPU when decoding is heavy (an OpenMP thread
    descheduled while a worker decodes stalls every other thread at the next barrier), and the best
    choice when the model is heavy and the worker mostly waits; only measuring tells which run is which.
    """
    per_process = max(1, available_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", world.world_size)))
    if device.type == "cuda":
        workers = config.workers if config.workers is not None else max(1, min(per_process - 1, 8))
        return CpuPlanner.fixed(Plan(workers, config.threads or torch.get_num_threads()))
    omp = os.environ.get("OMP_NUM_THREADS", "")
    threads = config.threads or (int(omp) if omp.isdigit() else None)
    if config.workers is not None or threads or world.distributed:  # ranks would have to agree on trials
        workers = config.workers if config.workers is not None else max(1, per_process // 4)
        return CpuPlanner.fixed(Plan(workers, threads or max(1, per_process - workers)))
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
