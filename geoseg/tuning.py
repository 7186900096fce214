"""Choosing the prediction window for throughput: which window and batch map a run's scenes
soonest, from the model's measured speed at a few windows. No model and no pixels here.

The model's own speed per pixel changes with the window (on a CPU it falls as the window
grows: caches, page faults), while the share of each window computed again by its neighbours,
``window² / (window - overlap)²``, falls the other way; and a scene smaller than a few windows
pays whole windows at its edges. So the best window depends on the model, the device and the
scenes, and is found by counting: for every candidate window, the windows the scenes need
times what one costs at the measured speed, spread over the workers.

>>> points = [Rate(256, 4, 1.0e6), Rate(512, 1, 0.9e6), Rate(1024, 1, 0.6e6)]
>>> choice = choose(points, [(4096, 4096)], overlap_for=lambda w: 120, slots=2)
>>> choice.window, choice.batch  # between the measured 512 and 1024, speeds interpolated
(576, 1)
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

from geoseg.tiling import axis_starts

MEASURED = (256, 384, 512, 768, 1024, 1536, 2048)
"""The windows whose speed is measured (those a run's scenes can use)."""
MEASURE_BUDGET_S = 10
"""Seconds a first measurement of a model's speed may take, about (the last window measured
may end past it)."""
STEP = 64
"""Candidate windows are multiples of this (and of the model's stride)."""
CACHE_ENV = "GEOSEG_CACHE"
"""Folder of geoseg's measurement cache (default: ``$XDG_CACHE_HOME/geoseg``)."""


@dataclass(frozen=True)
class Rate:
    """The model's measured speed at one window: scene pixels per second of forward passes of
    ``batch`` windows (softmax and argmax included)."""

    window: int
    batch: int
    px_per_s: float


@dataclass(frozen=True)
class Choice:
    """The window chosen, its batch and overlap, and what the count predicted for it."""

    window: int
    batch: int
    overlap: int
    windows: int  # model windows the scenes need at it
    seconds: float  # estimated model time on the workers


def measured_windows(sizes: Sequence[tuple[int, int]], overlap: int) -> list[int]:
    """The windows worth measuring for scenes of ``sizes`` (height, width) with ``overlap``:
    from the first of at least twice the overlap (smaller windows compute each pixel four
    times or more; if there is none, the largest above the overlap) up to the first that holds
    the largest scene whole. Empty when no window of :data:`MEASURED` exceeds the overlap."""
    side = max(max(s) for s in sizes)
    out = []
    for w in MEASURED:
        if w < 2 * overlap:
            continue
        out.append(w)
        if w >= side:
            break
    return out or [w for w in MEASURED if w > overlap][-1:]


def stop_measuring(seen: Sequence[Rate], overlaps: dict[int, int], window: int) -> bool:
    """Whether measuring ``window`` (and larger) cannot pay: the best score so far (speed over
    the overlap's redundancy, ``window² / (window - overlap)²``) is above the score of the
    largest window measured (by more than 2 %, this machine's noise), so scores are falling
    with the window; or ``window`` is not in ``overlaps`` (a smaller one ran out of memory)."""
    if window not in overlaps:
        return True
    if len({r.window for r in seen}) < 2:
        return False

    def score(r: Rate) -> float:
        o = overlaps[r.window]
        return r.px_per_s * ((r.window - o) / r.window) ** 2

    largest = max(r.window for r in seen)
    last = max(score(r) for r in seen if r.window == largest)
    return max(score(r) for r in seen) > 1.02 * last


def covering(sizes: Iterable[tuple[int, int]], step: int = 1) -> int:
    """The smallest window, a multiple of ``step`` (the model's stride), that holds each of the
    scenes of ``sizes`` (height, width) whole."""
    side = max(max(s) for s in sizes)
    return -(-side // step) * step


def windows_needed(sizes: Iterable[tuple[int, int]], window: int, overlap: int) -> int:
    """Model windows a trim-blended prediction of scenes of ``sizes`` runs at ``window``."""
    stride = window - overlap
    return sum(
        len(axis_starts(h, window, stride)) * len(axis_starts(w, window, stride)) for h, w in sizes
    )


def best_rates(points: Iterable[Rate]) -> dict[int, Rate]:
    """The fastest batch measured at each window, by window (ascending)."""
    best: dict[int, Rate] = {}
    for p in points:
        if p.window not in best or p.px_per_s > best[p.window].px_per_s:
            best[p.window] = p
    return dict(sorted(best.items()))


def _rate_at(points: Sequence[Rate], window: int) -> tuple[float, int]:
    """Speed and batch at ``window``: measured, or interpolated in log window between the
    measured windows around it (the batch keeping the pixels per pass of the smaller one); below
    the smallest measured window, that one's speed."""
    best = best_rates(points)
    ws = list(best)
    if window in best:
        return best[window].px_per_s, best[window].batch
    if window < ws[0]:  # a window smaller than any measured: the smallest's speed
        lo = ws[0]
        return best[lo].px_per_s, max(1, round(best[lo].batch * lo * lo / (window * window)))
    lo = max(w for w in ws if w < window)
    hi = min(w for w in ws if w > window)
    f = (math.log(window) - math.log(lo)) / (math.log(hi) - math.log(lo))
    rate = math.exp((1 - f) * math.log(best[lo].px_per_s) + f * math.log(best[hi].px_per_s))
    batch = max(1, round(best[lo].batch * lo * lo / (window * window)))
    return rate, batch


def choose(
    points: Sequence[Rate],
    sizes: Sequence[tuple[int, int]],
    *,
    overlap_for: Callable[[int], int],
    slots: int,
    step: int = 1,
) -> Choice:
    """The window (a multiple of :data:`STEP` and of the model's ``step``, within the measured
    range) that maps scenes of ``sizes`` soonest on ``slots`` workers: the windows needed,
    a whole number of rounds of ``slots`` at a time, each costing ``window²`` over the speed
    there; and the window that holds the largest scene whole (a multiple of ``step``), above
    which a window only adds padding. Ties go to the smaller window (less memory)."""
    if not points:
        raise ValueError("no measured speed to choose a window from")
    ws = sorted({p.window for p in points})
    unit = STEP * step // math.gcd(STEP, step)
    grid = {*ws, *range(-(-ws[0] // unit) * unit, ws[-1] + 1, unit)}
    whole = covering(sizes, step)
    if whole <= ws[-1]:
        grid = {w for w in grid if w < whole} | {whole}
    candidates = sorted(w for w in grid if w % step == 0)
    best: Choice | None = None
    for w in candidates:
        ovl = overlap_for(w)
        if ovl >= w and w == whole:  # one window holds each scene: no neighbour to overlap
            ovl = w // 2
        if ovl >= w:
            continue
        rate, batch = _rate_at(points, w)
        n = windows_needed(sizes, w, ovl)
        rounds = math.ceil(n / max(1, slots))
        seconds = rounds * w * w / rate
        if best is None or seconds < best.seconds * (1 - 1e-9):
            best = Choice(w, max(1, min(batch, n)), ovl, n, seconds)  # no batch above the windows
    if best is None:
        raise ValueError("no measured window is larger than the overlap")
    return best


def cache_path(name: str = "throughput.json") -> Path:
    """Where geoseg keeps ``name`` between runs (measured speeds by default)."""
    base = os.environ.get(CACHE_ENV)
    if base:
        return Path(base) / name
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "geoseg" / name


def load_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def update_cache(path: Path, key: str, entry: Callable[[Any], Any]) -> None:
    """Set ``key`` to ``entry(what it holds now, or None)`` (written to a temporary name, then
    renamed; a cache that cannot be written is only a cache)."""
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        data = load_cache(path)
        data[key] = entry(data.get(key))
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)


def save_cache(path: Path, key: str, rates: Sequence[Rate], about: dict[str, Any]) -> None:
    """Add ``rates`` under ``key`` to those kept there."""

    def merged(entry: Any) -> dict[str, Any]:
        old = (entry or {}).get("rates", [])
        known = {(int(r[0]), int(r[1])): float(r[2]) for r in old}
        known.update({(r.window, r.batch): r.px_per_s for r in rates})
        return {**about, "rates": [[w, b, v] for (w, b), v in sorted(known.items())]}

    update_cache(path, key, merged)


def cached_rates(path: Path, key: str) -> list[Rate]:
    """The speeds kept under ``key``; a speed of 0 marks a window tried and left out."""
    entry = load_cache(path).get(key) or {}
    return [Rate(int(w), int(b), float(v)) for w, b, v in entry.get("rates", [])]


# -- the overlap the model needs ----------------------------------------------------------------

EFFECTIVE_SHARE = 5e-4
"""``--overlap effective``: the smallest overlap at which a tiled map differs from the whole
crop's on fewer than this share of its pixels (0.05 %)."""


def tiled_classes(
    classes_of: Callable[[np.ndarray], np.ndarray], image: np.ndarray, window: int, overlap: int
) -> np.ndarray:
    """The class map of ``image`` (bands, rows, cols) predicted window by window,
    ``classes_of`` mapping a batch (n, bands, h, w) to classes (n, h, w): each pixel from the
    window whose middle is nearest, as trim blending takes it."""
    _, h, w = image.shape
    stride = window - overlap
    rows, cols = axis_starts(h, window, stride), axis_starts(w, window, stride)
    # windows on one phase, as predict places them: the last ones run past the end, over zeros
    # (what a normalised nodata pixel is)
    padded = np.zeros(
        (image.shape[0], int(rows[-1]) + window, int(cols[-1]) + window), dtype=image.dtype
    )
    padded[:, :h, :w] = image
    out = np.empty((h, w), dtype=np.int64)
    rc, cc = _cuts(rows, h, window), _cuts(cols, w, window)
    for i, r in enumerate(rows.tolist()):
        for j, c in enumerate(cols.tolist()):
            if rc[i] >= rc[i + 1] or cc[j] >= cc[j + 1]:
                continue
            classes = classes_of(padded[None, :, r : r + window, c : c + window])[0]
            out[rc[i] : rc[i + 1], cc[j] : cc[j + 1]] = classes[
                rc[i] - r : rc[i + 1] - r, cc[j] - c : cc[j + 1] - c
            ]
    return out


def _cuts(starts: np.ndarray, size: int, window: int) -> list[int]:
    """Where trim takes one window's pixels after another's along an axis of ``size`` px:
    0, the middles of the overlaps, ``size``."""
    middles = [min(size, (int(a) + int(b) + window) // 2) for a, b in pairwise(starts)]
    return [0, *middles, size]


@dataclass(frozen=True)
class OverlapMeasure:
    """What :func:`effective_overlap` found: the overlap (None when no overlap up to the exact
    one, or half the window, got below :data:`EFFECTIVE_SHARE`, or when the crop is too small
    to hold a window edge away from its own: no overlap tried), the share of pixels that
    differed at each overlap tried, and the crop and window it was measured on."""

    overlap: int | None
    shares: dict[int, float]
    crop: tuple[int, int]
    window: int


def effective_overlap(
    classes_of: Callable[[np.ndarray], np.ndarray],
    image: np.ndarray,
    window: int,
    step: int,
    exact: int,
) -> OverlapMeasure:
    """The smallest overlap, a multiple of ``step`` (the model's stride) up to ``exact`` and
    below half the window, at which tiling ``image`` into windows of ``window`` px gives the
    classes the whole image at once gives on all but :data:`EFFECTIVE_SHARE` of its pixels
    (away from the image's edges). ``classes_of`` maps a batch (n, bands, h, w) to classes
    (n, h, w). The share falls as the overlap grows, so the overlaps are bisected: about five
    tiled predictions of the image. Overlaps whose window edges all fall outside the crop's
    middle are not tried (there any overlap looks enough); with none left, no figure.

    The model's receptive field bounds the overlap that makes tiling exact; most of its weight
    lies much nearer the centre, so a far smaller overlap changes almost no pixel. The window
    is the bundle's, at most the crop's: more window edges than at larger prediction windows,
    so the share measured is an upper bound for those.
    """
    whole = classes_of(image[None])[0]
    window = min(window, image.shape[1], image.shape[2])
    # away from the crop's edges, where a window running past them sees zeros as pixels and the
    # whole crop sees its layers' zero padding: that is the scene's edge, not a seam
    m = min(exact, image.shape[1] // 4, image.shape[2] // 4)
    inner = (slice(m, image.shape[1] - m), slice(m, image.shape[2] - m))
    shares: dict[int, float] = {}

    def share(ovl: int) -> float:
        if ovl not in shares:
            tiled = tiled_classes(classes_of, image, window, ovl)
            shares[ovl] = float(np.mean(tiled[inner] != whole[inner]))
        return shares[ovl]

    # the share falls as the overlap grows: bisect the multiples of the stride
    candidates = [o for o in range(0, exact + 1, max(1, step)) if o == 0 or o < window // 2]

    def seam_inside(ovl: int) -> bool:  # else the tiles equal the whole there, whatever ovl
        return any(
            m < c < size - m
            for size in image.shape[1:]
            for c in _cuts(axis_starts(size, window, window - ovl), size, window)[1:-1]
        )

    # a crop the window holds whole, or almost, makes no seam in its middle
    candidates = [o for o in candidates if seam_inside(o)]
    if not candidates:
        return OverlapMeasure(None, shares, (image.shape[1], image.shape[2]), window)
    lo, hi = 0, len(candidates) - 1
    if share(candidates[hi]) >= EFFECTIVE_SHARE:
        return OverlapMeasure(None, shares, (image.shape[1], image.shape[2]), window)
    while lo < hi:
        mid = (lo + hi) // 2
        if share(candidates[mid]) < EFFECTIVE_SHARE:
            hi = mid
        else:
            lo = mid + 1
    found = candidates[lo]
    return OverlapMeasure(found, shares, (image.shape[1], image.shape[2]), window)
