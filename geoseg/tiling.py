"""Geometry of tiled prediction: blocks, the global window grid, halos. No pixels here.

A scene is cut into *blocks* (the unit of scheduling and writing) whose *cores* tile the scene
exactly. Model *windows* lie on one grid for the whole scene, so the windows that touch a pixel,
and therefore its prediction, do not depend on the block size. A block reads the union of the
windows that touch its core: that is its core plus a *halo*.

>>> grid = WindowGrid(height=443, width=489, window=256, overlap=64)
>>> grid.row_starts.tolist(), grid.col_starts.tolist()
([0, 192], [0, 192, 384])
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
from rasterio.windows import Window

from geoseg.errors import ConfigError


def axis_starts(length: int, window: int, stride: int) -> np.ndarray:
    """Start offsets of windows along one axis: every ``stride`` px from 0, as many as cover
    ``length``. The last window may run past the scene's end (it reads nodata there): keeping
    every window on one phase means a model that downsamples sees each pixel at the same offset
    in every window, as it would in one window over the whole scene."""
    n = -(-max(length - window, 0) // stride) + 1
    return np.arange(n) * stride


MIN_BLOCK = 64
"""The smallest block, px: smaller ones cost more in scheduling than they hold in pixels."""
MIN_WINDOW = 8
"""The smallest model window, px."""


def block_windows(height: int, width: int, block: int) -> list[Window]:
    """The cores of all blocks, row-major; they tile the ``height`` x ``width`` scene exactly."""
    if block <= 0:
        raise ConfigError(f"block size must be positive, got {block}")
    return [
        Window(c, r, min(block, width - c), min(block, height - r))
        for r in range(0, height, block)
        for c in range(0, width, block)
    ]


def spans(window: Window) -> tuple[tuple[int, int], tuple[int, int]]:
    """``window``'s rows and columns as whole ``(start, stop)`` pairs (rasterio keeps floats)."""
    (r0, r1), (c0, c1) = window.toranges()
    return (int(r0), int(r1)), (int(c0), int(c1))


@dataclass(frozen=True)
class WindowGrid:
    """The global grid of model windows over a ``height`` x ``width`` scene.

    With ``trim``, each window owns a *plateau*: the part of it at least ``overlap // 2`` px from
    its start, up to the next window's plateau (the first and last plateaus reach the scene's
    edges). Plateaus tile the scene, so each pixel is predicted by exactly one window, and a
    block whose edges lie on plateau edges (:meth:`blocks`) runs each window exactly once.
    """

    height: int
    width: int
    window: int
    overlap: int
    trim: bool = False
    row_starts: np.ndarray = field(init=False, repr=False, compare=False)
    col_starts: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.window <= 0:
            raise ConfigError(f"window must be positive, got {self.window}")
        if not 0 <= self.overlap < self.window:
            raise ConfigError(
                f"overlap must be at least 0 and less than the window ({self.window}), "
                f"got {self.overlap}"
            )
        object.__setattr__(self, "row_starts", axis_starts(self.height, self.window, self.stride))
        object.__setattr__(self, "col_starts", axis_starts(self.width, self.window, self.stride))

    @property
    def stride(self) -> int:
        return self.window - self.overlap

    def _edges(self, starts: np.ndarray, length: int) -> np.ndarray:
        """Plateau edges along one axis: plateau k is ``[edges[k], edges[k + 1])``."""
        edges = starts + self.overlap // 2
        edges[0] = 0
        return np.append(edges, length)

    def _touching(self, starts: np.ndarray, length: int, lo: int, hi: int) -> np.ndarray:
        if self.trim:
            e = self._edges(starts, length)
            return starts[(e[:-1] < hi) & (e[1:] > lo)]
        return starts[(starts < hi) & (starts + self.window > lo)]

    def plateau(self, window: Window) -> Window:
        """For ``trim``: ``window``'s plateau, in scene pixels."""
        out = []
        for starts, length, off in (
            (self.row_starts, self.height, int(window.row_off)),
            (self.col_starts, self.width, int(window.col_off)),
        ):
            e = self._edges(starts, length)
            k = int(np.searchsorted(starts, off))
            out += [int(e[k]), int(min(e[k + 1], off + self.window))]
        r0, r1, c0, c1 = out
        return Window(c0, r0, c1 - c0, r1 - r0)

    def weights(self, window: Window) -> np.ndarray:
        """For ``trim``: 1 on ``window``'s plateau, 0 elsewhere (a ``(window, window)`` array)."""
        (r0, r1), (c0, c1) = spans(self.plateau(window))
        w = np.zeros((self.window, self.window), dtype=np.float32)
        w[
            r0 - int(window.row_off) : r1 - int(window.row_off),
            c0 - int(window.col_off) : c1 - int(window.col_off),
        ] = 1.0
        return w

    def blocks(self, block: int) -> list[Window]:
        """Block cores of about ``block`` px whose edges lie on plateau edges (with ``trim``), so
        no window is needed by two blocks; plain :func:`block_windows` otherwise."""
        if not self.trim:
            return block_windows(self.height, self.width, block)
        if block <= 0:
            raise ConfigError(f"block size must be positive, got {block}")
        cuts = []
        for starts, length in ((self.row_starts, self.height), (self.col_starts, self.width)):
            e = self._edges(starts, length)
            inner = e[1:-1]
            snapped = (
                {int(inner[np.abs(inner - b).argmin()]) for b in range(block, length, block)}
                if len(inner)
                else set()
            )
            cuts.append([0, *sorted(snapped), length])
        rows, cols = cuts
        return [
            Window(c0, r0, c1 - c0, r1 - r0)
            for r0, r1 in itertools.pairwise(rows)
            for c0, c1 in itertools.pairwise(cols)
        ]

    def windows_for(self, core: Window) -> list[Window]:
        """Every grid window that contributes to ``core`` (overlaps it, or with ``trim`` has
        its plateau in it), row-major."""
        r0, c0 = int(core.row_off), int(core.col_off)
        rows = self._touching(self.row_starts, self.height, r0, r0 + int(core.height))
        cols = self._touching(self.col_starts, self.width, c0, c0 + int(core.width))
        return [Window(int(c), int(r), self.window, self.window) for r in rows for c in cols]

    def owned_windows(self, core: Window) -> list[Window]:
        """The grid windows that ``core``'s block runs when windows are shared out between
        blocks: those whose plateau starts inside it. Every window has exactly one owner among
        blocks that tile the scene."""
        r0, c0 = int(core.row_off), int(core.col_off)
        r1, c1 = r0 + int(core.height), c0 + int(core.width)
        er = self._edges(self.row_starts, self.height)[:-1]
        ec = self._edges(self.col_starts, self.width)[:-1]
        rows = self.row_starts[(er >= r0) & (er < r1)]
        cols = self.col_starts[(ec >= c0) & (ec < c1)]
        return [Window(int(c), int(r), self.window, self.window) for r in rows for c in cols]

    @staticmethod
    def extent(windows: list[Window]) -> Window:
        """The smallest window holding all of ``windows``."""
        r0 = min(int(w.row_off) for w in windows)
        c0 = min(int(w.col_off) for w in windows)
        r1 = max(int(w.row_off + w.height) for w in windows)
        c1 = max(int(w.col_off + w.width) for w in windows)
        return Window(c0, r0, c1 - c0, r1 - r0)

    def halo_window(self, core: Window) -> Window:
        """The area a block reads: the union of the windows touching its core."""
        return self.extent(self.windows_for(core))

    @property
    def n_windows(self) -> int:
        return len(self.row_starts) * len(self.col_starts)
