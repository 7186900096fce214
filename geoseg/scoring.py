"""Scores from a confusion matrix: IoU, precision, recall, F1 per class, mIoU, frequency-weighted
IoU, overall accuracy and kappa. Pure numpy: rows are truth, columns prediction.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from geoseg.classes import ClassInfo


def scores(confusion: np.ndarray, classes: Sequence[ClassInfo]) -> dict[str, Any]:
    """Metrics from one ``K x K`` confusion matrix (rows truth, columns prediction).

    mIoU is the macro mean over classes present in truth or prediction; a class absent from
    both has ``null`` scores and ``"present": false``.
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
            {
                "id": c.id,
                "name": c.name,
                "present": bool(present[i]),
                "iou": val(iou) if present[i] else None,
                "precision": val(precision),
                "recall": val(recall),
                "f1": val(f1) if present[i] else None,
                "truth_pixels": int(truth[i]),
                "predicted_pixels": int(pred[i]),
            }
        )
    if total == 0:
        return {
            "pixels": 0,
            "miou": None,
            "fw_iou": None,
            "overall_accuracy": None,
            "kappa": None,
            "per_class": per_class,
            "confusion_matrix": confusion.tolist(),
        }
    oa = tp.sum() / total
    pe = (truth * pred).sum() / total**2
    kappa = (oa - pe) / (1 - pe) if pe < 1 else 1.0
    iou_present = np.where(present, np.nan_to_num(iou), 0.0)
    return {
        "pixels": int(total),
        "miou": round(float(iou_present[present].mean()), 6),
        "fw_iou": round(float((truth / total * np.nan_to_num(iou)).sum()), 6),
        "overall_accuracy": round(float(oa), 6),
        "kappa": round(float(kappa), 6),
        "per_class": per_class,
        "confusion_matrix": confusion.tolist(),
    }
