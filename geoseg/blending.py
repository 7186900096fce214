"""Weights for blending overlapping window predictions.

Each window's class probabilities are multiplied by a weight that is high in the window's centre
and low at its edges, where the model lacks context; the blended value is the weighted sum divided
by the sum of weights, so the weights need not add to one. A small floor keeps the weight positive,
so a pixel covered by a single window (at a scene edge) is still predicted.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from geoseg.errors import ConfigError

BLEND_MODES = ("trim", "gaussian", "cosine", "none")
_FLOOR = 1e-3


def check_blend(mode: str) -> str:
    if mode not in (*BLEND_MODES, "auto"):
        raise ConfigError(f"unknown blend {mode!r}; expected one of auto, {', '.join(BLEND_MODES)}")
    return mode


def resolve_blend(mode: str, receptive_field: int | None, overlap: int) -> str:
    """``auto``: ``trim`` when the overlap covers the model's receptive field (the tiled map then
    equals a whole-scene prediction), else ``gaussian``."""
    check_blend(mode)
    if mode != "auto":
        return mode
    return "trim" if receptive_field is not None and overlap >= receptive_field - 1 else "gaussian"


@lru_cache(maxsize=8)
def window_weights(size: int, mode: str = "gaussian", overlap: int = 0) -> np.ndarray:
    """A ``(size, size)`` float32 weight map for one window (cached; do not modify).

    ``trim`` keeps each window's centre, ``overlap / 2`` px in from every edge, at full weight and
    nearly nothing outside it: the centres of neighbouring windows tile the scene, so each pixel
    comes from the one window in which it is farthest from an edge. With an overlap of at least
    the model's receptive field, that equals predicting the whole scene in one window.
    """
    check_blend(mode)
    x = (np.arange(size, dtype=np.float64) + 0.5) / size - 0.5  # -0.5 .. 0.5 across the window
    if mode == "trim":
        lo = overlap // 2
        w1 = np.full(size, 1e-6)  # not zero: scene-edge pixels lie in no window's centre
        w1[lo : size - (overlap - lo)] = 1.0
        w = np.outer(w1, w1).astype(np.float32)
        w.setflags(write=False)
        return w
    if mode == "gaussian":
        w1 = np.exp(-0.5 * (x / 0.125) ** 2)  # sigma = window / 8
    elif mode == "cosine":
        w1 = np.cos(np.pi * x) ** 2
    else:
        w1 = np.ones(size)
    w = np.outer(w1, w1)
    w = np.maximum(w / w.max(), _FLOOR).astype(np.float32)
    w.setflags(write=False)
    return w
