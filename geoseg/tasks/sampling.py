"""Worker side of training data: the validation split, per-block statistics, and the windows a
training rank samples from the labelled area (image and mask augmented together).

Everything here reads windows from paths and runs in Dask tasks or in the client alike.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import rasterio
from rasterio.windows import Window

from geoseg.augment import build_augmenter
from geoseg.classes import NODATA
from geoseg.derive import add_derived
from geoseg.errors import LabelError, option
from geoseg.io import (
    SceneProfile,
    raster_bounds,
    read_vector,
    standardize,
)
from geoseg.labels import LabelSpec, area_mask, read_codes
from geoseg.tiling import spans


@dataclass(frozen=True)
class ValSplit:
    """The validation pixels of one scene: inside the polygons of ``region``, or inside the
    ``cells`` (row and column indexes of squares of ``cell`` px on the scene's grid)."""

    region: str | None = None
    cell: int = 256
    cells: frozenset[tuple[int, int]] = frozenset()

    def mask(self, window: Window, profile: SceneProfile) -> np.ndarray:
        """True at the validation pixels of ``window``."""
        if self.region is not None:
            return area_mask(self.region, window, profile)
        r0, c0 = int(window.row_off), int(window.col_off)
        rows = np.arange(r0, r0 + int(window.height)) // self.cell
        cols = np.arange(c0, c0 + int(window.width)) // self.cell
        ur, ri = np.unique(rows, return_inverse=True)
        uc, ci = np.unique(cols, return_inverse=True)
        grid = np.array([[(a, b) in self.cells for b in uc] for a in ur], dtype=bool)
        return grid[ri][:, ci]


ANCHORS_PER_CODE = 256  # per block: enough that rare classes are drawn too


@dataclass
class BlockStats:
    """Additive statistics of one block: per-band sums over valid pixels; label code counts for
    training and validation; stratified random training pixels (``anchors``: scene row, column,
    code) with the number of pixels each stands for (``weights``); and the training-grid cells
    (row, column indexes of ``window``-px squares) that hold a labelled training pixel."""

    count: np.ndarray
    total: np.ndarray
    total_sq: np.ndarray
    codes: dict[int, int]
    val_codes: dict[int, int]
    anchors: np.ndarray
    weights: np.ndarray
    cells: np.ndarray

    def __add__(self, other: BlockStats) -> BlockStats:
        return BlockStats(
            self.count + other.count,
            self.total + other.total,
            self.total_sq + other.total_sq,
            _add_counts(self.codes, other.codes),
            _add_counts(self.val_codes, other.val_codes),
            np.concatenate([self.anchors, other.anchors]),
            np.concatenate([self.weights, other.weights]),
            np.concatenate([self.cells, other.cells]),
        )

    def to_validation(self) -> BlockStats:
        """The same block given wholly to validation."""
        return BlockStats(
            self.count,
            self.total,
            self.total_sq,
            {},
            _add_counts(self.codes, self.val_codes),
            self.anchors[:0],
            self.weights[:0],
            self.cells[:0],
        )

    def mean_std(self) -> tuple[list[float], list[float]]:
        n = np.maximum(self.count, 1)
        mean = self.total / n
        var = np.maximum(self.total_sq / n - mean**2, 0.0)
        std = np.sqrt(var)
        std[std == 0] = 1.0
        return mean.tolist(), std.tolist()


def _add_counts(a: dict[int, int], b: dict[int, int]) -> dict[int, int]:
    out = dict(a)
    for k, v in b.items():
        out[k] = out.get(k, 0) + v
    return out


def _counts(codes: np.ndarray) -> dict[int, int]:
    values, counts = np.unique(codes, return_counts=True)
    return {int(v): int(c) for v, c in zip(values, counts)}


def _read(
    src: Any,
    profile: SceneProfile,
    window: Window,
    bands: Sequence[int],
    nodata: float | None,
    derived: Sequence[tuple[int, int]] = (),
) -> tuple[np.ndarray, np.ndarray]:
    """A window of a training scene: from the open file ``src``, or for a scene of several
    files (band files, a STAC item) each band read onto the scene's grid; then the derived
    bands (:func:`geoseg.derive.add_derived`) after them."""
    from geoseg.io import read_scene, read_window

    if src is None:
        data, valid = read_scene(profile, window, bands, nodata)
    else:
        data, valid = read_window(src, window, bands, nodata)
    return add_derived(data, valid, derived), valid


def block_stats(
    window: Window,
    scene: SceneProfile,
    bands: Sequence[int],
    labels: LabelSpec,
    within: str | None,
    nodata: float | None = None,
    val_region: str | None = None,
    train_window: int = 64,
    derived: Sequence[tuple[int, int]] = (),
) -> BlockStats:
    """Statistics of one block (a Dask task); float64 sums so blocks add up exactly. Pixels
    inside ``val_region`` count as validation and give no anchors or cells."""
    profile = scene
    with contextlib.ExitStack() as stack:
        src = None if scene.sources else stack.enter_context(rasterio.open(scene.path))
        data, valid = _read(src, scene, window, bands, nodata, derived)
    valid &= area_mask(within, window, profile)
    d = data[:, valid].astype(np.float64)
    codes = read_codes(labels, window, profile)
    labelled = valid & (codes >= 0)
    val = ValSplit(val_region).mask(window, profile) if val_region else np.zeros_like(labelled)
    train = labelled & ~val
    rows, cols = np.nonzero(train)
    found = codes[rows, cols]
    rng = np.random.default_rng([int(window.row_off), int(window.col_off)])
    picks, weights = [], []
    for code in np.unique(found):
        idx = np.flatnonzero(found == code)
        pick = rng.permutation(idx)[:ANCHORS_PER_CODE]
        picks.append(pick)
        weights.append(np.full(len(pick), len(idx) / len(pick)))
    pick = np.concatenate(picks) if picks else np.zeros(0, dtype=int)
    r0, c0 = int(window.row_off), int(window.col_off)
    anchors = np.column_stack([rows[pick] + r0, cols[pick] + c0, found[pick]])
    cells = np.unique(
        np.column_stack([(rows + r0) // train_window, (cols + c0) // train_window]), axis=0
    )
    return BlockStats(
        count=np.full(len(d), d.shape[1], dtype=np.float64),
        total=d.sum(axis=1),
        total_sq=(d * d).sum(axis=1),
        codes=_counts(codes[train]),
        val_codes=_counts(codes[labelled & val]),
        anchors=anchors.astype(np.int32).reshape(-1, 3),
        weights=np.concatenate(weights) if weights else np.zeros(0),
        cells=cells.astype(np.int32).reshape(-1, 2),
    )


SAMPLERS = ("random", "balanced", "grid")


@dataclass(frozen=True)
class SampleSpec:
    """One training scene as the training tasks see it (paths and numbers, cheap to send)."""

    scene: SceneProfile
    bands: tuple[int, ...]
    labels: LabelSpec
    class_ids: tuple[int, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    window: int
    within: str | None
    bounds: Window  # where windows may lie
    augment: str = "light"
    nodata: float | None = None
    val: ValSplit | None = None
    derived: tuple[tuple[int, int], ...] = ()  # places of each derived band's two bands


@dataclass(frozen=True)
class AnchorTable:
    """Where training windows are drawn, over all scenes: ``anchors`` (scene, row, column,
    code) with ``weights`` (pixels each stands for), and grid ``cells`` (scene, row, column
    indexes of window-size squares holding a labelled training pixel)."""

    anchors: np.ndarray
    weights: np.ndarray
    cells: np.ndarray


def pixel_bounds(profile: SceneProfile, within: str | None) -> Window:
    """The pixel rectangle of the scene that holds ``within``'s polygons (all of it without)."""
    if within is None:
        return Window(0, 0, profile.width, profile.height)
    gdf = read_vector(within, "area", profile.crs, bounds=raster_bounds(profile))
    if gdf.empty:
        raise LabelError(f"area {within!r} holds no polygons")
    left, bottom, right, top = gdf.total_bounds
    inv = ~profile.transform
    cols, rows = zip(inv * (left, top), inv * (right, bottom))
    r0 = max(0, int(np.floor(min(rows) + 1e-6)))
    c0 = max(0, int(np.floor(min(cols) + 1e-6)))
    r1 = min(profile.height, int(np.ceil(max(rows) - 1e-6)))
    c1 = min(profile.width, int(np.ceil(max(cols) - 1e-6)))
    if r1 <= r0 or c1 <= c0:
        raise LabelError(f"area {within!r} does not overlap scene {profile.path!r}")
    return Window(c0, r0, c1 - c0, r1 - r0)


class SceneReader:
    """Reads normalised image windows and class-index masks of one training scene."""

    def __init__(self, spec: SampleSpec) -> None:
        self.spec = spec
        self.profile = spec.scene
        self.src = None if spec.scene.sources else rasterio.open(spec.scene.path)
        self.label_src = None if spec.labels.is_vector else rasterio.open(spec.labels.path)
        self.lut = np.full(256, NODATA, dtype=np.uint8)  # label code -> class index
        self.lut[list(spec.class_ids)] = np.arange(len(spec.class_ids), dtype=np.uint8)

    def close(self) -> None:
        if self.src is not None:
            self.src.close()
        if self.label_src is not None:
            self.label_src.close()

    def read(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        """``(image, mask)``: image ``(bands, h, w)`` float32 normalised (0 where invalid),
        mask ``(h, w)`` uint8 class indexes, NODATA where unlabelled or invalid."""
        spec = self.spec
        data, valid = _read(self.src, self.profile, window, spec.bands, spec.nodata, spec.derived)
        codes = read_codes(self.spec.labels, window, self.profile, self.label_src)
        mask = np.where(codes >= 0, self.lut[np.clip(codes, 0, 255)], NODATA).astype(np.uint8)
        mask[~valid] = NODATA
        return standardize(data, valid, self.spec.mean, self.spec.std), mask

    def val_mask(self, window: Window) -> np.ndarray:
        if self.spec.val is None:
            return np.zeros((int(window.height), int(window.width)), dtype=bool)
        return self.spec.val.mask(window, self.profile)


class TrainingSampler:
    """Draws training windows from several scenes: around random labelled pixels (``random``:
    each labelled pixel equally likely; ``balanced``: each class equally likely) or from a
    shuffled grid (``grid``: every cell of the grid holding labels once per pass, the cells
    shared out between ranks). A window lies wholly inside its scene's training area and holds
    no validation pixel, its augmentation margin included."""

    def __init__(
        self,
        specs: Sequence[SampleSpec],
        table: AnchorTable,
        mode: str = "random",
        seed: int | Sequence[int] = 0,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        if mode not in SAMPLERS:
            raise LabelError(f"unknown sampler {mode!r}; expected one of {', '.join(SAMPLERS)}")
        if len(table.anchors) == 0:
            raise LabelError(
                "no labelled training pixel to draw windows from; check the labels, "
                f"{option('--within', None)} and the validation split"
            )
        self.specs, self.table, self.mode = list(specs), table, mode
        seed = [seed] if isinstance(seed, int) else list(seed)
        self.rng = np.random.default_rng([*seed, rank])
        self.readers: dict[int, SceneReader] = {}
        window = specs[0].window
        self.aug = build_augmenter(specs[0].augment, window, int(self.rng.integers(2**31)))
        codes = table.anchors[:, 3]
        p = table.weights.astype(np.float64)
        if mode == "balanced":
            totals = {c: p[codes == c].sum() for c in np.unique(codes)}
            p = p / np.array([totals[c] for c in codes])
        self.cdf = np.cumsum(p / p.sum())
        order = np.random.default_rng(seed).permutation(len(table.cells))  # same on every rank
        self.cells = table.cells[order[rank::world]]
        self.next_cell = 0

    def close(self) -> None:
        for r in self.readers.values():
            r.close()

    def reader(self, scene: int) -> SceneReader:
        if scene not in self.readers:
            self.readers[scene] = SceneReader(self.specs[scene])
        return self.readers[scene]

    def draw_window(self) -> tuple[int, Window]:
        """A scene index and a window (with the augmentation's margin on each side) inside
        that scene's bounds."""
        m = self.aug.margin
        if self.mode == "grid" and len(self.cells):
            scene, cr, cc = self.cells[self.next_cell % len(self.cells)]
            self.next_cell += 1
            size = self.specs[scene].window
            ar, ac = cr * size, cc * size
            off_r = off_c = 0
        else:
            i = min(int(np.searchsorted(self.cdf, self.rng.random())), len(self.cdf) - 1)
            scene, ar, ac, _ = self.table.anchors[i]
            size = self.specs[scene].window
            off_r, off_c = self.rng.integers(size, size=2)
        (r0, r1), (c0, c1) = spans(self.specs[scene].bounds)
        w = size + 2 * m
        r = int(np.clip(ar - m - off_r, r0, max(r0, r1 - w)))
        c = int(np.clip(ac - m - off_c, c0, max(c0, c1 - w)))
        return int(scene), Window(c, r, w, w)

    def _read(self, scene: int, window: Window) -> tuple[np.ndarray, np.ndarray] | None:
        rd = self.reader(scene)
        spec = rd.spec
        if spec.within is not None and not area_mask(spec.within, window, rd.profile).all():
            return None  # windows lie wholly inside the area: nothing outside it is seen
        if rd.val_mask(window).any():
            return None  # no validation pixel is ever seen in training
        x, mask = rd.read(window)
        if not (mask != NODATA).any():
            return None
        return x, mask

    def sample(self, max_tries: int = 200) -> tuple[np.ndarray, np.ndarray, tuple[int, Window]]:
        """One training pair and where it came from: image ``(bands, w, w)`` float32
        normalised, mask ``(w, w)`` class indexes with NODATA where unlabelled, and
        ``(scene index, window read)``."""
        for _ in range(max_tries):
            scene, window = self.draw_window()
            got = self._read(scene, window)
            if got is not None:
                x, y = self.aug(*got)
                return x, y, (scene, window)
        raise LabelError(
            f"no window of {self.specs[0].window} px with a labelled, valid pixel, inside the "
            f"training area and clear of validation pixels, found in {max_tries} tries; use a "
            f"smaller {option('--window', None)}, a larger area or a smaller validation share"
        )
