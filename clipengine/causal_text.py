"""A causal text tower run only as far as each text goes: the same embedding for a fraction of the work.

In a causal text tower pooled at its end token (open_clip's CLIP text towers: argmax or eos pooling), no
position after the end token can reach the pooled output, so the padding up to the context length is
wasted work. Two users cut it off:

- the query encoders export the tower from token embeddings on, and a query runs only to its end token;
- training runs a batch's texts in length buckets (`bucketed_text_features`): sorted by length, cut into
  a few groups, each group run to its own longest text. On the emoji captions (median 21 tokens, context
  77, batch 128, the `small` model) the text tower's forward and backward fell from 2.42 s to 0.91 s on
  one thread; whole training steps are 1.4-1.6x faster (benchmarks/bench_train.py).

Towers this does not hold for (non-causal, pooled elsewhere, with a class token or a padding mask, or
from Hugging Face) are reported as None by `causal_text` and keep their own forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

BUCKETS = 4  # groups per batch: 4 recovered most of the padding; more makes matrices too small to be efficient


@dataclass(frozen=True)
class CausalText:
    owner: Any  # the module holding token_embedding, positional_embedding, transformer, ln_final, attn_mask
    pool: str  # "argmax" (the end token has the largest id) or "eos"
    eos: int | None


def causal_text(model: torch.nn.Module) -> CausalText | None:
    """The text tower of an open_clip model, if it can be cut after the end token; else None."""
    owner = model if hasattr(model, "token_embedding") else getattr(model, "text", None)
    if owner is None or not hasattr(owner, "transformer") or not hasattr(owner, "token_embedding"):
        return None
    if getattr(owner, "cls_emb", None) is not None or getattr(owner, "use_pad_mask", False):
        return None
    mask = getattr(owner, "attn_mask", None)
    pool = getattr(owner, "text_pool_type", None) or getattr(owner, "pool_type", "argmax")
    if mask is None or pool not in ("argmax", "eos"):
        return None  # not causal, or pooled where later positions matter
    eos = getattr(owner, "text_eos_id", None) if owner is model else getattr(owner, "eos_id", None)
    if pool == "eos" and eos is None:
        return None  # pooled at an end token it does not name
    return CausalText(owner, pool, eos)


def pool_positions(tokens: torch.Tensor, pool: str, eos: int | None) -> torch.Tensor:
    """Where each text is pooled: its end token."""
    if pool == "eos" and eos is not None:
        return tokens.eq(eos).int().argmax(dim=-1)
    return tokens.argmax(dim=-1)


def encode_prefix(transformer: torch.nn.Module, ln_final: torch.nn.Module, projection: Any, mask: torch.Tensor,
                  x: torch.Tensor, pool_index: torch.Tensor) -> torch.Tensor:
    """Token embeddings with positions, of any length up to the context -> unnormalised text features."""
    length = x.shape[1]
    x = transformer(x, attn_mask=mask[:length, :length])
    x = ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), pool_index]
    if isinstance(projection, torch.nn.Linear):
        return projection(x)
    return x if projection is None else x @ projection


def bucketed_text_features(text: CausalText, tokens: torch.Tensor, buckets: int = BUCKETS) -> torch.Tensor:
    """Unnormalised features of `tokens` (rows in their given order), each bucket run to its longest text.

    Equal to the tower's own `encode_text` up to float rounding, gradients included (tests/test_causal_text.py).
    """
    owner = text.owner
    positions = pool_positions(tokens, text.pool, text.eos)
    order = positions.argsort(stable=True)
    features = []
    for rows in order.chunk(min(buckets, len(order))):
        length = int(positions[rows].max()) + 1
        x = owner.token_embedding(tokens[rows, :length]) + owner.positional_embedding[:length]
        features.append(encode_prefix(owner.transformer, owner.ln_final, owner.text_projection, owner.attn_mask,
                                      x, positions[rows]))
    return torch.cat(features)[order.argsort()]


class TrainingForward(torch.nn.Module):
    """model(images, texts) as training needs it: (image features, text features, scale, bias or None),
    normalised, with the text tower bucketed where it is causal. DDP wraps this module."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model: Any = model  # an open_clip CLIP: its encode_* methods are not typed as Module attributes
        self.text = causal_text(model)

    def forward(self, images: torch.Tensor, texts: torch.Tensor) -> tuple:
        model = self.model
        image = model.encode_image(images, normalize=True)
        if self.text is None:
            text = model.encode_text(texts, normalize=True)
        else:
            text = F.normalize(bucketed_text_features(self.text, texts), dim=-1)
        return image, text, model.logit_scale.exp(), getattr(model, "logit_bias", None)
