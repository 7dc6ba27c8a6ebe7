"""The text tower cut after each text's end token (training's length buckets, the exported query tower)."""

from __future__ import annotations

import pytest
import torch
from open_clip.model import CLIP, CustomTextCLIP

from clipengine.causal_text import TrainingForward, bucketed_text_features, causal_text

VISION = {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16}
TEXT = {"context_length": 24, "vocab_size": 100, "width": 32, "heads": 2, "layers": 2}


def _tokens(lengths: list[int], eot: int = 99) -> torch.Tensor:
    """Texts of the given lengths (end token included), padded with zeros; the end token has the largest id."""
    g = torch.Generator().manual_seed(0)
    rows = torch.zeros(len(lengths), TEXT["context_length"], dtype=torch.long)
    for r, n in enumerate(lengths):
        rows[r, :n - 1] = torch.randint(1, 90, (n - 1,), generator=g)
        rows[r, n - 1] = eot
    return rows


def _models() -> list[torch.nn.Module]:
    torch.manual_seed(0)
    return [CLIP(16, VISION, TEXT),  # the towers on the model itself, argmax pooling
            CustomTextCLIP(16, VISION, {**TEXT, "pool_type": "eos", "eos_id": 99, "proj_type": "linear"})]


@pytest.mark.parametrize("model", _models(), ids=["clip-argmax", "custom-eos-linear"])
def test_buckets_give_the_towers_own_features_and_gradients(model):
    tokens = _tokens([3, 24, 5, 9, 2, 17, 11, 4, 6, 8])  # one text fills the context
    text = causal_text(model)
    assert text is not None
    ours = bucketed_text_features(text, tokens, buckets=4)
    (ours * torch.linspace(-1, 1, ours.numel()).view_as(ours)).sum().backward()
    ours_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    reference = model.encode_text(tokens)
    (reference * torch.linspace(-1, 1, reference.numel()).view_as(reference)).sum().backward()
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    assert ours_grads and set(ours_grads) == {n for n, p in model.named_parameters() if p.grad is not None}
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert (ours_grads[name] - p.grad).norm() <= 1e-5 * p.grad.norm(), name  # sums of many rows: rounding


def test_the_training_forward_matches_the_models_own():
    model = _models()[0]
    images, tokens = torch.randn(6, 3, 32, 32), _tokens([2, 7, 3, 12, 4, 5])
    image, text, scale, bias = TrainingForward(model)(images, tokens)
    ref_image, ref_text, ref_scale = model(images, tokens)
    torch.testing.assert_close(image, ref_image)
    torch.testing.assert_close(text, ref_text, rtol=1e-5, atol=1e-6)
    assert torch.equal(scale, ref_scale) and bias is None


def test_towers_that_see_past_the_end_token_are_left_whole():
    torch.manual_seed(0)
    not_causal = CLIP(16, VISION, {**TEXT, "no_causal_mask": True})
    pooled_last = CustomTextCLIP(16, VISION, {**TEXT, "pool_type": "last", "proj_type": "linear"})
    assert causal_text(not_causal) is None and causal_text(pooled_last) is None
    forward = TrainingForward(not_causal)
    tokens = _tokens([2, 7, 3])
    torch.testing.assert_close(forward(torch.randn(3, 3, 32, 32), tokens)[1], not_causal.encode_text(tokens, normalize=True))
