"""The losses equal open_clip's, and gradient accumulation equals the full-batch gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss

from clipengine.training.config import TrainConfig
from clipengine.training.distributed import World
from clipengine.training.loop import Optimisation, cosine_lr, param_groups
from clipengine.training.loss import LOSSES, contrastive_loss, sigmoid_loss


def _features(n: int = 16, d: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, d, generator=g), dim=-1).requires_grad_()
    text = F.normalize(torch.randn(n, d, generator=g), dim=-1).requires_grad_()
    scale = torch.tensor(14.3, requires_grad=True)
    bias = torch.tensor(-3.0, requires_grad=True)
    return image, text, scale, bias


def _value_and_grads(fn, *inputs):
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    loss = fn(*leaves)
    loss.backward()
    return loss.detach(), [x.grad for x in leaves]


@pytest.mark.parametrize("with_bias", [False, True])
def test_contrastive_loss_equals_open_clip(with_bias):
    image, text, scale, bias = _features()
    inputs = (image, text, scale, bias) if with_bias else (image, text, scale)
    ours, our_grads = _value_and_grads(contrastive_loss, *inputs)
    theirs, their_grads = _value_and_grads(ClipLoss(), *inputs)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    for a, b in zip(our_grads, their_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert ours > 0


def test_sigmoid_loss_equals_open_clip():
    image, text, scale, bias = _features()
    ours, our_grads = _value_and_grads(sigmoid_loss, image, text, scale, bias)
    theirs, their_grads = _value_and_grads(SigLipLoss(), image, text, scale, bias)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    for a, b in zip(our_grads, their_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_contrastive_loss_rewards_matching_pairs():
    image, _, scale, _ = _features()
    matched = contrastive_loss(image, image, scale)
    shuffled = contrastive_loss(image, image.roll(1, dims=0), scale)
    assert matched < 0.01 < shuffled


def _batch(model, n: int = 16, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(n, 3, 64, 64, generator=g)
    texts = torch.randint(1, 1000, (n, 32), generator=g)
    return pixels, texts


def _grads(opt: Optimisation, pixels, texts, accum_steps):
    opt.model.zero_grad(set_to_none=True)
    loss = opt.forward_backward(pixels, texts, accum_steps)
    return loss, {n: p.grad.clone() for n, p in opt.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_accumulation_equals_the_full_batch(tiny_model, loss):
    """Four micro-batches give the gradient of the whole batch's loss (all negatives), the temperature's too."""
    import copy
    import dataclasses

    model = copy.deepcopy(tiny_model.model).train()
    loaded = dataclasses.replace(tiny_model, model=model)
    opt = Optimisation(loaded, TrainConfig("unused", loss=loss, precision="fp32"), 0.98, 1e-6, World(),
                       torch.device("cpu"))
    loss_fn = LOSSES[loss]
    pixels, texts = _batch(model)
    full_loss, full = _grads(opt, pixels, texts, 1)
    accum_loss, accum = _grads(opt, pixels, texts, 4)
    torch.testing.assert_close(accum_loss, full_loss, rtol=1e-5, atol=1e-6)
    assert full.keys() == accum.keys() and "logit_scale" in full
    torch.testing.assert_close(accum["logit_scale"], full["logit_scale"], rtol=1e-4, atol=1e-6)
    for name in full:  # (the text buckets group other rows per micro-batch: equal but for rounding)
        assert (accum[name] - full[name]).norm() <= 1e-4 * full[name].norm(), name

    # what accumulation would give without the cache: a sum of small-batch losses, each with 3 negatives
    model.zero_grad(set_to_none=True)
    for p, t in zip(pixels.chunk(4), texts.chunk(4), strict=True):
        img, txt, scale = model(p, t)[:3]
        (loss_fn(img, txt, scale) / 4).backward()
    naive = model.logit_scale.grad.clone()
    assert not torch.allclose(naive, full["logit_scale"], rtol=1e-3)


def test_lr_schedule_warms_up_then_decays_to_zero():
    lrs = [cosine_lr(s, 1.0, 10, 100) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))
    assert cosine_lr(100, 1.0, 10, 100) == pytest.approx(0.0, abs=1e-12)


def test_no_weight_decay_on_biases_norms_embeddings_and_temperature(tiny_model):
    decay, no_decay = param_groups(tiny_model.model, 0.2)
    names = {id(p): n for n, p in tiny_model.model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.2
    assert {"logit_scale", "positional_embedding", "token_embedding.weight", "ln_final.weight",
            "ln_final.bias", "visual.class_embedding"} <= exempt
    assert "text_projection" in decayed and any(n.endswith("attn.in_proj_weight") for n in decayed)
    assert not any(n.endswith(".bias") or "ln_" in n for n in decayed)
