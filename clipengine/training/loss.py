"""The two contrastive losses, over the *global* batch when training runs in several processes.

Why our own and not ``open_clip.loss``: the accumulation step of the training loop computes the loss
once over cached features of the whole effective batch and needs one function of
(image features, text features, scale, bias) that works the same in one process or many. Both functions
are tested equal to open_clip's ``ClipLoss`` and ``SigLipLoss`` (values and gradients).

In several processes each rank scores its own rows against the columns of every rank (features are
all-gathered *with* gradients). The mean of the per-rank losses is the single-process loss of the global
batch, and DDP's gradient averaging then yields exactly its gradient: the all-gather's backward sums
the other ranks' contributions into the local features.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MAX_LOGIT_SCALE = math.log(100)  # clamped after every step, as in CLIP
SIGLIP_INIT_LOGIT_SCALE = math.log(10)
SIGLIP_INIT_LOGIT_BIAS = -10.0


def gather(features: torch.Tensor, world_size: int) -> torch.Tensor:
    """Every rank's features, concatenated in rank order, with gradients flowing back to their owners."""
    if world_size == 1:
        return features
    import torch.distributed.nn.functional as dist_fn

    return torch.cat(dist_fn.all_gather(features), dim=0)


def contrastive_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                     logit_bias: torch.Tensor | None = None, *, rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP): cross-entropy of each image over all texts and each text over all images.

    `image` and `text` are L2-normalised local features; `logit_scale` is already exponentiated.
    """
    all_image, all_text = gather(image, world_size), gather(text, world_size)
    logits_per_image = logit_scale * image @ all_text.T
    logits_per_text = logit_scale * text @ all_image.T
    if logit_bias is not None:
        logits_per_image = logits_per_image + logit_bias
        logits_per_text = logits_per_text + logit_bias
    labels = torch.arange(image.shape[0], device=image.device) + rank * image.shape[0]
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def sigmoid_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                 logit_bias: torch.Tensor | None = None, *, rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """SigLIP: an independent binary match/no-match decision per (image, text) pair, normalised by
    the local batch size as in the paper (and open_clip)."""
    all_text = gather(text, world_size)
    logits = logit_scale * image @ all_text.T
    if logit_bias is not None:
        logits = logits + logit_bias
    n = image.shape[0]
    labels = -torch.ones_like(logits)
    labels[:, rank * n:(rank + 1) * n] += 2 * torch.eye(n, device=logits.device, dtype=logits.dtype)
    return -F.logsigmoid(labels * logits).sum() / n


LOSSES = {"clip": contrastive_loss, "siglip": sigmoid_loss}
