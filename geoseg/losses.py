"""Segmentation losses by name, combinable with weights: ``"ce"``, ``"ce+dice"``,
``"0.5*focal+lovasz"``. Every loss ignores pixels labelled ``NODATA`` (nodata, unlabelled) and is
finite, with no gradient, on a batch where every pixel is ignored."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from geoseg.classes import NODATA
from geoseg.errors import ConfigError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _valid(target: torch.Tensor) -> torch.Tensor:
    return target != NODATA


def _nothing(logits: torch.Tensor) -> torch.Tensor:
    return logits.sum() * 0.0  # finite, and no gradient to speak of


def cross_entropy(weight: torch.Tensor | None = None, label_smoothing: float = 0.0) -> LossFn:
    """Mean cross-entropy over labelled pixels, with class weights and label smoothing."""

    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if not _valid(target).any():
            return _nothing(logits)
        return F.cross_entropy(
            logits, target, weight=weight, ignore_index=NODATA, label_smoothing=label_smoothing
        )

    return loss


def soft_dice(weight: torch.Tensor | None = None, eps: float = 1.0) -> LossFn:
    """1 - mean soft Dice over the classes present in the batch's labels (multi-class)."""

    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        valid = _valid(target).unsqueeze(1)
        if not valid.any():
            return _nothing(logits)
        probs = torch.softmax(logits, dim=1) * valid
        onehot = F.one_hot(torch.where(valid[:, 0], target, 0), logits.shape[1])
        onehot = onehot.permute(0, 3, 1, 2).to(probs.dtype) * valid
        inter = (probs * onehot).sum((0, 2, 3))
        denom = probs.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
        dice = (2 * inter + eps) / (denom + eps)
        present = onehot.sum((0, 2, 3)) > 0
        w = weight[present] if weight is not None else torch.ones_like(dice[present])
        return 1 - (dice[present] * w).sum() / w.sum()

    return loss


def focal(weight: torch.Tensor | None = None, gamma: float = 2.0) -> LossFn:
    """Focal loss (Lin et al., 2017): ``-alpha_t (1 - p_t)^gamma log p_t`` averaged over
    labelled pixels; ``alpha`` is the class weight (1 without one)."""

    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        valid = _valid(target)
        if not valid.any():
            return _nothing(logits)
        logp = F.log_softmax(logits, dim=1)
        t = torch.where(valid, target, 0).unsqueeze(1)
        logp_t = logp.gather(1, t)[:, 0][valid]
        term = -((1 - logp_t.exp()) ** gamma) * logp_t
        if weight is not None:
            term = term * weight[t[:, 0][valid]]
        return term.mean()

    return loss


def _lovasz_grad(fg_sorted: torch.Tensor) -> torch.Tensor:
    # gradient of the Lovasz extension of the Jaccard loss at the sorted errors
    total = fg_sorted.sum()
    intersection = total - fg_sorted.cumsum(0)
    union = total + (1 - fg_sorted).cumsum(0)
    jaccard = 1.0 - intersection / union
    jaccard[1:] = jaccard[1:] - jaccard[:-1].clone()
    return jaccard


def lovasz_softmax(weight: torch.Tensor | None = None) -> LossFn:
    """Lovasz-softmax (Berman et al., 2018): a convex surrogate of 1 - IoU, averaged over the
    classes present in the batch's labels."""

    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        valid = _valid(target)
        if not valid.any():
            return _nothing(logits)
        probs = torch.softmax(logits, dim=1).permute(0, 2, 3, 1)[valid]  # (P, C)
        labels = target[valid]
        losses, weights = [], []
        for c in range(probs.shape[1]):
            fg = (labels == c).to(probs.dtype)
            if fg.sum() == 0:
                continue
            errors, order = torch.sort((fg - probs[:, c]).abs(), descending=True)
            losses.append(torch.dot(errors, _lovasz_grad(fg[order])))
            weights.append(weight[c] if weight is not None else probs.new_ones(()))
        w = torch.stack(weights)
        return (torch.stack(losses) * w).sum() / w.sum()

    return loss


LOSSES: dict[str, Callable[..., LossFn]] = {
    "ce": cross_entropy,
    "dice": soft_dice,
    "focal": focal,
    "lovasz": lovasz_softmax,
}
_TERM = re.compile(r"^\s*(?:(\d*\.?\d+)\s*\*\s*)?([a-z]+)\s*$")


def parse_loss(spec: str) -> list[tuple[float, str]]:
    """``"0.5*ce+dice"`` -> ``[(0.5, "ce"), (1.0, "dice")]``; a clear error otherwise."""
    terms = []
    for part in spec.split("+"):
        m = _TERM.match(part)
        if not m or m.group(2) not in LOSSES:
            raise ConfigError(
                f"unknown loss {spec!r}; expected names from {', '.join(LOSSES)}, optionally "
                "weighted and joined by '+', such as 'ce+dice' or '0.5*focal+lovasz'"
            )
        terms.append((float(m.group(1) or 1.0), m.group(2)))
    return terms


def make_loss(
    spec: str,
    class_weights: Sequence[float] | None = None,
    device: str | torch.device = "cpu",
    *,
    label_smoothing: float = 0.0,
    gamma: float = 2.0,
) -> LossFn:
    """Build the weighted sum of losses named by ``spec``; class weights apply to every term."""
    weight = None
    if class_weights is not None:
        weight = torch.tensor(class_weights, dtype=torch.float32, device=device)
    options = {"ce": {"label_smoothing": label_smoothing}, "focal": {"gamma": gamma}}
    terms = [(w, LOSSES[n](weight, **options.get(n, {}))) for w, n in parse_loss(spec)]

    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return sum((w * t(logits, target) for w, t in terms), start=logits.new_zeros(()))

    return loss
