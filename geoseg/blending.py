"""Weights for blending overlapping window predictions.

Each window's class probabilities are multiplied by a weight that is high in the window's centre
and low at its edges, where the model lacks context; the blended value is the weighted sum divided
by the sum of weights, so the weights need not add to one. A small floor keeps the weight positive,
so a pixel covered by a single window (at a scene edge) is still predicted.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from geoseg.errors import ConfigError, check_choice

BLEND_MODES = ("trim", "gaussian", "cosine", "none")
_FLOOR = 1e-3


def check_blend(mode: str) -> str:
    check_choice("blend", mode, ("auto", *BLEND_MODES))
    return mode


def resolve_blend(
    mode: str, receptive_field: int | None, overlap: int, *, holds: bool = False
) -> str:
    """``auto``: ``trim`` when the overlap covers the model's receptive field (the tiled map then
    equals a whole-scene prediction) or a window ``holds`` each scene whole (nothing to
    blend), else ``gaussian``."""
    check_blend(mode)
    if mode != "auto":
        return mode
    covered = receptive_field is not None and overlap >= receptive_field - 1
    return "trim" if holds or covered else "gaussian"


@lru_cache(maxsize=8)
def window_weights(size: int, mode: str = "gaussian") -> np.ndarray:
    """A ``(size, size)`` float32 weight map for one window (cached; do not modify).

    ``trim`` is not a weight map but a geometry: see :class:`geoseg.tiling.WindowGrid`.
    """
    if check_blend(mode) in ("trim", "auto"):
        raise ConfigError(f"blend {mode!r} has no fixed weight map; ask the window grid")
    x = (np.arange(size, dtype=np.float64) + 0.5) / size - 0.5  # -0.5 .. 0.5 across the window
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
