"""Segmentation losses by name, combinable with ``+`` (``"ce+dice"``); all ignore ``IGNORE``."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from geoseg.data import IGNORE
from geoseg.errors import ConfigError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy(weight: torch.Tensor | None = None) -> LossFn:
    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if not (target != IGNORE).any():
            return logits.sum() * 0.0  # all ignored: finite, no gradient
        return F.cross_entropy(logits, target, weight=weight, ignore_index=IGNORE)

    return loss


def soft_dice(weight: torch.Tensor | None = None, eps: float = 1.0) -> LossFn:
    """1 - mean soft Dice over classes present in the batch (multi-class)."""

    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        valid = (target != IGNORE).unsqueeze(1)
        probs = torch.softmax(logits, dim=1) * valid
        onehot = F.one_hot(torch.where(valid[:, 0], target, 0), logits.shape[1])
        onehot = onehot.permute(0, 3, 1, 2).to(probs.dtype) * valid
        inter = (probs * onehot).sum((0, 2, 3))
        denom = probs.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
        dice = (2 * inter + eps) / (denom + eps)
        present = onehot.sum((0, 2, 3)) > 0
        if not present.any():
            return logits.sum() * 0.0
        return 1 - dice[present].mean()

    return loss


LOSSES: dict[str, Callable[..., LossFn]] = {"ce": cross_entropy, "dice": soft_dice}


def make_loss(
    spec: str, class_weights: Sequence[float] | None = None, device: str | torch.device = "cpu"
) -> LossFn:
    """Build a loss from ``spec`` such as ``"ce"`` or ``"ce+dice"`` (terms summed)."""
    names = [s.strip() for s in spec.split("+") if s.strip()]
    bad = [n for n in names if n not in LOSSES]
    if bad or not names:
        raise ConfigError(
            f"unknown loss {spec!r}; expected names from {', '.join(LOSSES)} joined by '+'"
        )
    weight = None
    if class_weights is not None:
        weight = torch.tensor(class_weights, dtype=torch.float32, device=device)
    terms = [LOSSES[n](weight) for n in names]

    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return sum((t(logits, target) for t in terms), start=logits.new_zeros(()))

    return loss
