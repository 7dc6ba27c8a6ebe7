"""Whole training runs on tiny data: checkpoints that index and search, exact resume, NaN stop,
locked towers, SigLIP, and two processes under torchrun equal to one."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import same_weights, spy
from safetensors.torch import load_file

from clipengine.errors import BadInput
from clipengine.models import ModelSpec, load_model, resolve_source
from clipengine.scenes import write_scene_set
from clipengine.training import TrainConfig, TrainingDiverged, resume_config, train
from clipengine.training.checkpoint import read_checkpoint_state, read_run_config
from clipengine.training.config import adam_defaults

pytestmark = pytest.mark.slow  # every test here trains a model

FAST: dict[str, Any] = dict(model="tiny", batch_size=8, workers=0, val_size=8, lr=1e-3, warmup_steps=2)
# Runs compared as "equal but for rounding" use CLIP's AdamW settings. With `tiny`'s defaults (0.999, 1e-8),
# AdamW turns the gradient of attention's key bias, which cannot change a softmax and so is rounding noise
# alone, into lr-sized steps whose sign is the noise's: two runs that round differently differ in that bias.
ROUNDING_SAFE: dict[str, Any] = {"beta2": 0.98, "eps": 1e-6}


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    return write_scene_set(tmp_path_factory.mktemp("scenes"), 48, size=64)


def _log(out: Path, kind: str = "step") -> list[dict]:
    return [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if r["kind"] == kind]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "open_clip_model.safetensors"))


def test_a_run_writes_a_checkpoint_that_index_and_search_load(scenes, tmp_path):
    from clipengine.index.pipeline import index_folder
    from clipengine.index.search import Searcher

    out = tmp_path / "run"
    report = train(TrainConfig(data=str(scenes), out=str(out), epochs=2, log_every=1, **FAST))
    assert report.step == 10 and report.samples == 80 and report.epoch == 2  # 40 training images / 8
    assert set(report.val) == {f"{d}_R@{k}" for d in ("text_to_image", "image_to_text") for k in (1, 5, 10)}
    assert report.val_images == 8 and report.chance["text_to_image_R@1"] == 1 / 8
    steps = _log(out)
    assert [r["step"] for r in steps] == list(range(1, 11)) and all(r["loss"] > 0 for r in steps)
    assert len(_log(out, "val")) == 2
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000010"]
    step_dir = out / "checkpoints" / "step-00000010"
    groups = read_checkpoint_state(step_dir)["optimizer"]["param_groups"]  # what AdamW ran with
    assert {(tuple(g["betas"]), g["eps"]) for g in groups} == {((0.9, 0.999), 1e-8)}  # open_clip's for a non-ViT name
    recorded = read_run_config(step_dir)
    assert (recorded["beta2"], recorded["eps"]) == (0.999, 1e-8)

    source = resolve_source(ModelSpec(checkpoint=str(out)))
    assert source["source"] == "checkpoint" and source["arch"] == "tiny"
    loaded = load_model(source, device="cpu")
    initial = load_model(ModelSpec(arch="tiny"), device="cpu")
    assert not torch.equal(loaded.model.visual.conv1.weight, initial.model.visual.conv1.weight)
    import open_clip  # the checkpoint is open_clip's own layout: open_clip alone loads it, with its tokenizer

    plain, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out}")
    assert same_weights(plain, loaded.model.state_dict())
    assert open_clip.get_tokenizer(f"local-dir:{out}")(["a red circle"]).shape == (1, plain.context_length)
    index_report = index_folder(scenes.parent / "images", tmp_path / "idx", ModelSpec(checkpoint=str(out)))
    assert index_report.count == 48
    with Searcher(tmp_path / "idx") as searcher:
        assert len(searcher.search_text("two red circles on the left", 5)) == 5


def test_resume_continues_exactly(scenes, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(TrainConfig(data=str(scenes), out=str(straight), epochs=2, log_every=1, **FAST))
    train(TrainConfig(data=str(scenes), out=str(split), epochs=2, log_every=1, max_steps=3, save_every=3, **FAST))
    assert [r["step"] for r in _log(split)] == [1, 2, 3]
    with pytest.raises(BadInput, match="already holds a training run"):
        train(TrainConfig(data=str(scenes), out=str(split), epochs=2, **FAST))
    with pytest.raises(BadInput, match="batch_size"):
        train(TrainConfig(data=str(scenes), out=str(split), epochs=2, resume=True, **{**FAST, "batch_size": 4}))
    report = train(resume_config(split))
    assert report.step == 10
    a, b = _log(straight), _log(split)
    assert [r["step"] for r in b] == list(range(1, 11))
    for x, y in zip(a, b, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5, abs=1e-6) and x["lr"] == y["lr"]
    wa, wb = _weights(straight), _weights(split)
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-5, atol=1e-6, msg=name)


def test_seeds_start_from_different_weights_and_batches(scenes, tmp_path):
    losses = {}
    for seed in (0, 1):
        train(TrainConfig(data=str(scenes), out=str(tmp_path / f"s{seed}"), epochs=1, log_every=1, max_steps=2,
                          seed=seed, **FAST))
        losses[seed] = [r["loss"] for r in _log(tmp_path / f"s{seed}")]
    assert all(a != pytest.approx(b, rel=1e-4) for a, b in zip(losses[0], losses[1], strict=True))
    initial = load_model(ModelSpec(arch="tiny"), device="cpu").model.state_dict()  # the random init of seed 0
    for seed in (0, 1):  # lr 0 keeps the initial weights
        out = tmp_path / f"init{seed}"
        train(TrainConfig(data=str(scenes), out=str(out), epochs=1, max_steps=1, seed=seed, **{**FAST, "lr": 0.0}))
        assert torch.equal(_weights(out)["visual.conv1.weight"], initial["visual.conv1.weight"]) == (seed == 0)


def test_the_cpu_plan_is_measured_and_never_changes_the_numbers(scenes, tmp_path, monkeypatch):
    from clipengine.training import cpu_plan

    monkeypatch.setattr(cpu_plan, "MIN_TRIAL_SECONDS", 0.0)  # tiny steps: time 3 of them, not a second's worth
    monkeypatch.setattr("clipengine.training.loop.available_cores", lambda: 2)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    planned, fixed = tmp_path / "planned", tmp_path / "fixed"
    events: list[dict] = []
    train(TrainConfig(data=str(scenes), out=str(planned), epochs=6, log_every=1, **{**FAST, "workers": None},
                      **ROUNDING_SAFE), progress=events.append)
    threads_after = torch.get_num_threads()
    train(TrainConfig(data=str(scenes), out=str(fixed), epochs=6, log_every=1, **FAST, **ROUNDING_SAFE))
    plan, = _log(planned, "plan")
    tried = [(t["workers"], t["threads"]) for t in plan["trials"]]
    assert tried[0] == (1, 1) and len(tried) >= 2 and set(tried) <= {(1, 1), (1, 2), (2, 1), (2, 2)}
    fastest = max(plan["trials"], key=lambda t: t["steps_per_second"])
    assert plan["chosen"] == {"workers": fastest["workers"], "threads": fastest["threads"]}
    assert threads_after == fastest["threads"]  # the choice was applied, not only logged
    assert [e for e in events if e["kind"] == "plan"] == [plan]
    a, b = _log(planned), _log(fixed)
    assert len(a) == len(b) == 30  # trials are training steps: every step ran once, in order
    assert [x["loss"] for x in a] == pytest.approx([y["loss"] for y in b], rel=1e-5)
    wa, wb = _weights(planned), _weights(fixed)
    for name in wa:  # equal but for rounding: one thread or two sum a matrix product in another order
        assert (wa[name] - wb[name]).norm() <= 1e-3 * wb[name].norm(), name


def test_a_nan_loss_stops_and_keeps_the_last_good_checkpoint(scenes, tmp_path):
    out = tmp_path / "nan"
    config = TrainConfig(data=str(scenes), out=str(out), epochs=3, save_every=1, grad_clip=None,
                         **{**FAST, "lr": 1e30, "warmup_steps": 0})
    with pytest.raises(TrainingDiverged, match=r"loss became nan at step \d+: stopped; the last good checkpoint is"):
        train(config)
    kept = sorted((out / "checkpoints").iterdir())
    assert len(kept) == 1
    good = load_model(ModelSpec(checkpoint=str(out)), device="cpu")  # the kept weights are finite and load
    assert all(torch.isfinite(p).all() for p in good.model.parameters())


def test_locked_text_tower_does_not_move(scenes, tmp_path):
    out = tmp_path / "lit"
    train(TrainConfig(data=str(scenes), out=str(out), epochs=1, lock_text=True, **FAST))
    before = load_model(ModelSpec(arch="tiny"), device="cpu").model.state_dict()
    after = _weights(out)
    assert torch.equal(after["token_embedding.weight"], before["token_embedding.weight"])
    assert torch.equal(after["text_projection"], before["text_projection"])
    assert not torch.equal(after["visual.conv1.weight"], before["visual.conv1.weight"])


def test_adam_settings_default_as_open_clip_train_and_given_ones_win(scenes, tmp_path):
    assert adam_defaults("ViT-B-32") == (0.98, 1e-6) and adam_defaults("hf-hub:timm/vit_base") == (0.98, 1e-6)
    assert adam_defaults("tiny") == adam_defaults("RN50") == (0.999, 1e-8)
    out = tmp_path / "given"
    train(TrainConfig(data=str(scenes), out=str(out), epochs=1, max_steps=1, save_every=1, beta1=0.8, beta2=0.95,
                      eps=1e-7, **FAST))
    (step_dir,) = (out / "checkpoints").iterdir()
    groups = read_checkpoint_state(step_dir)["optimizer"]["param_groups"]
    assert {(tuple(g["betas"]), g["eps"]) for g in groups} == {((0.8, 0.95), 1e-7)}


def test_siglip_loss_trains_and_its_checkpoint_keeps_the_bias(scenes, tmp_path):
    out = tmp_path / "siglip"
    train(TrainConfig(data=str(scenes), out=str(out), epochs=1, log_every=1, loss="siglip", **FAST))
    steps = _log(out)
    assert all(math.isfinite(r["loss"]) for r in steps) and steps[-1]["loss"] < steps[0]["loss"]
    config = json.loads((out / "open_clip_config.json").read_text())
    assert config["model_cfg"]["init_logit_bias"] == -10.0
    loaded = load_model(ModelSpec(checkpoint=str(out)), device="cpu")
    assert loaded.model.logit_bias is not None and loaded.model.logit_bias.item() != -10.0  # learned, and saved


def test_accumulated_run_matches_the_plain_run(scenes, tmp_path):
    plain, accum = tmp_path / "plain", tmp_path / "accum"
    train(TrainConfig(data=str(scenes), out=str(plain), epochs=1, log_every=1, **FAST, **ROUNDING_SAFE))
    train(TrainConfig(data=str(scenes), out=str(accum), epochs=1, log_every=1, accum_steps=4, **FAST, **ROUNDING_SAFE))
    for x, y in zip(_log(plain), _log(accum), strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4)
    wa, wb = _weights(plain), _weights(accum)
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_with_accumulation_tracks_fp32(scenes, tmp_path, precision):
    """Autocast (and, for fp16, the gradient scaler) through the gradient-cached accumulation path."""
    ref, amp = tmp_path / "fp32", tmp_path / precision
    train(TrainConfig(data=str(scenes), out=str(ref), epochs=1, log_every=1, **FAST))
    train(TrainConfig(data=str(scenes), out=str(amp), epochs=1, log_every=1, accum_steps=2, precision=precision,
                      **FAST))
    ref_log, amp_log = _log(ref), _log(amp)
    assert amp_log[0]["loss"] == pytest.approx(ref_log[0]["loss"], rel=0.01)  # same weights, same batch
    assert len(amp_log) == len(ref_log) and all(r["loss"] > 0 for r in amp_log)  # (fp16 may skip overflow steps)
    weights = _weights(amp)
    assert all(torch.isfinite(w).all() for w in weights.values())
    initial = load_model(ModelSpec(arch="tiny"), device="cpu").model.state_dict()
    assert not torch.equal(weights["visual.conv1.weight"], initial["visual.conv1.weight"])
    state = torch.load(next((amp / "checkpoints").iterdir()) / "train_state.pt", weights_only=True)
    assert (state["scaler"] is not None) == (precision == "fp16")


def test_gradient_checkpointing_changes_memory_not_results(scenes, tmp_path, monkeypatch):
    import open_clip.transformer

    calls = spy(monkeypatch, open_clip.transformer, "checkpoint")
    plain, ckpt = tmp_path / "plain", tmp_path / "ckpt"
    train(TrainConfig(data=str(scenes), out=str(plain), epochs=1, log_every=1, max_steps=2, **FAST))
    assert not calls
    train(TrainConfig(data=str(scenes), out=str(ckpt), epochs=1, log_every=1, max_steps=2, grad_checkpointing=True,
                      **FAST))
    assert len(calls) >= 2 * 4  # both steps, each block of both towers (2 + 2 in `tiny`) recomputed
    assert [r["loss"] for r in _log(plain)] == pytest.approx([r["loss"] for r in _log(ckpt)], rel=1e-5)


def test_fine_tunes_from_a_checkpoint_and_from_a_weights_file(scenes, tmp_path):
    base = tmp_path / "base"
    train(TrainConfig(data=str(scenes), out=str(base), epochs=1, **FAST))
    tuned = tmp_path / "tuned"
    train(TrainConfig(data=str(scenes), out=str(tuned), epochs=1, checkpoint=str(base), lock_image=True, **FAST))
    start, end = _weights(base), _weights(tuned)
    assert torch.equal(start["visual.conv1.weight"], end["visual.conv1.weight"])  # locked, and started from base
    assert not torch.equal(start["text_projection"], end["text_projection"])
    from_file = tmp_path / "from-file"
    train(TrainConfig(data=str(scenes), out=str(from_file), epochs=1, pretrained=str(base / "open_clip_model.safetensors"),
                      lock_text=True, **FAST))
    assert torch.equal(_weights(from_file)["token_embedding.weight"], start["token_embedding.weight"])


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clipengine", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=240)


def test_two_processes_under_torchrun_equal_one(scenes, tmp_path):
    """gloo on the CPU: the global batch is split over 2 ranks, features are gathered with gradients."""
    args = ["train", "--data", str(scenes), "--epochs", "1", "--batch-size", "8", "--workers", "0",
            "--val-size", "8", "--max-steps", "3", "--lr", "1e-3",
            "--beta2", str(ROUNDING_SAFE["beta2"]), "--eps", str(ROUNDING_SAFE["eps"]), "--json"]
    single = _cli(*args, "--out", str(tmp_path / "one"))
    assert single.returncode == 0, single.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "clipengine", *args, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, two.stderr[-3000:]
    one_log, two_log = _log(tmp_path / "one"), _log(tmp_path / "two")
    assert len(one_log) == len(two_log) == 1  # only rank 0 writes
    assert json.loads(single.stdout)["loss"] == pytest.approx(one_log[0]["loss"])
    assert one_log[0]["loss"] == pytest.approx(two_log[0]["loss"], rel=1e-5)
    wa, wb = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=1e-5, msg=name)


def test_cli_train_errors_are_one_line(scenes, tmp_path):
    missing = _cli("train", "--data", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "x"))
    assert missing.returncode == 1 and missing.stderr.strip().startswith("error: data not found")
    assert "Traceback" not in missing.stderr
    nothing = _cli("train", "--resume", "--out", str(tmp_path / "x"))
    assert nothing.returncode == 1 and "nothing to resume" in nothing.stderr
