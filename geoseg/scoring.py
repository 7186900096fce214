"""Scores from a confusion matrix: IoU, precision, recall, F1 per class, mIoU, frequency-weighted
IoU, overall accuracy and kappa. Pure numpy: rows are truth, columns prediction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from geoseg.classes import ClassInfo


@dataclass(frozen=True)
class ClassScores:
    """One class's scores; ``None`` where a ratio has no pixels to stand on (a class absent from
    truth and prediction has ``present=False`` and no IoU or F1)."""

    id: int
    name: str
    present: bool
    iou: float | None
    precision: float | None
    recall: float | None
    f1: float | None
    truth_pixels: int
    predicted_pixels: int


@dataclass(frozen=True)
class Scores:
    """The scores of one confusion matrix (rows truth, columns prediction, in class order);
    the summary scores are ``None`` when no pixel was scored."""

    pixels: int
    miou: float | None
    fw_iou: float | None
    overall_accuracy: float | None
    kappa: float | None
    per_class: tuple[ClassScores, ...]
    confusion_matrix: tuple[tuple[int, ...], ...]

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (:mod:`geoseg.report`'s schema): lists for the tuples."""
        out = asdict(self)
        out["per_class"] = [asdict(c) for c in self.per_class]
        out["confusion_matrix"] = [list(row) for row in self.confusion_matrix]
        return out

    def iou_by_name(self) -> dict[str, float | None]:
        return {c.name: c.iou for c in self.per_class}


def scores(confusion: np.ndarray, classes: Sequence[ClassInfo]) -> Scores:
    """Metrics from one ``K x K`` confusion matrix (rows truth, columns prediction).

    mIoU is the macro mean over classes present in truth or prediction; a class absent from
    both has no scores and ``present=False``.
    """
    cm = confusion.astype(np.float64)
    tp = np.diag(cm)
    truth = cm.sum(1)
    pred = cm.sum(0)
    total = cm.sum()
    present = (truth + pred) > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = tp / (truth + pred - tp)
        precision = tp / pred
        recall = tp / truth
        f1 = 2 * tp / (truth + pred)
    per_class = []
    for i, c in enumerate(classes):

        def val(a: np.ndarray, i: int = i) -> float | None:
            return None if not np.isfinite(a[i]) else round(float(a[i]), 6)

        per_class.append(
            ClassScores(
                id=c.id,
                name=c.name,
                present=bool(present[i]),
                iou=val(iou) if present[i] else None,
                precision=val(precision),
                recall=val(recall),
                f1=val(f1) if present[i] else None,
                truth_pixels=int(truth[i]),
                predicted_pixels=int(pred[i]),
            )
        )
    matrix = tuple(tuple(int(v) for v in row) for row in confusion)
    if total == 0:
        return Scores(0, None, None, None, None, tuple(per_class), matrix)
    oa = tp.sum() / total
    pe = (truth * pred).sum() / total**2
    kappa = (oa - pe) / (1 - pe) if pe < 1 else 1.0
    iou_present = np.where(present, np.nan_to_num(iou), 0.0)
    return Scores(
        pixels=int(total),
        miou=round(float(iou_present[present].mean()), 6),
        fw_iou=round(float((truth / total * np.nan_to_num(iou)).sum()), 6),
        overall_accuracy=round(float(oa), 6),
        kappa=round(float(kappa), 6),
        per_class=tuple(per_class),
        confusion_matrix=matrix,
    )


@dataclass(frozen=True)
class Interval:
    """A 95 % bootstrap interval (the 2.5th and 97.5th percentiles of the resamples);
    ``None`` bounds where too few resamples had the score at all."""

    low: float | None
    high: float | None

    def to_dict(self) -> dict[str, float | None]:
        return {"ci95_low": self.low, "ci95_high": self.high}


@dataclass(frozen=True)
class BlockIntervals:
    """Bootstrap intervals of one area's scores, from ``blocks`` resampled blocks."""

    blocks: int
    miou: Interval
    overall_accuracy: Interval
    iou: tuple[Interval, ...]  # in class order
    name: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {} if self.name is None else {"name": self.name}
        out.update(
            blocks=self.blocks,
            miou=self.miou.to_dict(),
            overall_accuracy=self.overall_accuracy.to_dict(),
            iou=[i.to_dict() for i in self.iou],
        )
        return out


@dataclass(frozen=True)
class Intervals:
    """Bootstrap intervals over blocks for the whole area and each region."""

    resamples: int
    seed: int
    overall: BlockIntervals
    regions: tuple[BlockIntervals, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": "bootstrap over blocks (percentile, 95 %)",
            "resamples": self.resamples,
            "seed": self.seed,
            "overall": self.overall.to_dict(),
            "regions": [r.to_dict() for r in self.regions],
        }


def _bounds(v: np.ndarray) -> Interval:
    ok = v[np.isfinite(v)]
    if len(ok) < max(2, len(v) // 2):  # the score exists in too few resamples to bound it
        return Interval(None, None)
    lo, hi = np.percentile(ok, [2.5, 97.5])
    return Interval(round(float(lo), 6), round(float(hi), 6))


def block_bootstrap(
    confusions: np.ndarray, resamples: int, rng: np.random.Generator, name: str | None = None
) -> BlockIntervals:
    """Intervals of mIoU, overall accuracy and each class's IoU from ``confusions``, one
    ``K x K`` matrix per block: ``resamples`` draws of as many blocks, with replacement, from
    the blocks that hold scored pixels (scores computed as :func:`scores` does)."""
    cm = confusions[confusions.reshape(len(confusions), -1).sum(1) > 0].astype(np.float64)
    b, k = len(cm), confusions.shape[-1]
    if b == 0:
        none = Interval(None, None)
        return BlockIntervals(0, none, none, tuple(none for _ in range(k)), name)
    weights = rng.multinomial(b, np.full(b, 1.0 / b), size=resamples).astype(np.float64)
    total = (weights @ cm.reshape(b, k * k)).reshape(resamples, k, k)
    tp = np.diagonal(total, axis1=1, axis2=2)
    truth, pred = total.sum(2), total.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = tp / (truth + pred - tp)
        present = (truth + pred) > 0
        miou = np.where(present, np.nan_to_num(iou), 0).sum(1) / present.sum(1)
        oa = tp.sum(1) / total.sum((1, 2))
    return BlockIntervals(
        blocks=b,
        miou=_bounds(miou),
        overall_accuracy=_bounds(oa),
        iou=tuple(_bounds(iou[:, i]) for i in range(k)),
        name=name,
    )
