"""Training data: labels from rasters or vectors, windows sampled from the labelled area,
per-band statistics, and augmentation that moves image and mask together.

Everything here reads windows from paths, so the same code runs in the client and in Dask tasks.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.features import rasterize
from rasterio.windows import Window
from rasterio.windows import bounds as window_bounds
from rasterio.windows import transform as window_transform

from geoseg.augment import IGNORE, build_augmenter
from geoseg.errors import LabelError
from geoseg.io import (
    ClassInfo,
    SceneProfile,
    check_same_grid,
    is_vector_path,
    raster_bounds,
    read_class_metadata,
    read_profile,
    read_vector,
    window_inside,
)

# A qualitative palette for classes that come without colours (ColorBrewer Set1 + Dark2).
_PALETTE = [
    "#e41a1c",
    "#377eb8",
    "#4daf4a",
    "#984ea3",
    "#ff7f00",
    "#ffff33",
    "#a65628",
    "#f781bf",
    "#999999",
    "#1b9e77",
    "#d95f02",
    "#7570b3",
    "#e7298a",
    "#66a61e",
]


@dataclass(frozen=True)
class LabelSpec:
    """Where labels come from: a class raster on the scene's grid, or a vector file with a
    class field. Codes in ``ignore`` mean unlabelled."""

    path: str
    field: str | None = None
    ignore: tuple[int, ...] = ()

    @property
    def is_vector(self) -> bool:
        return is_vector_path(self.path)


@lru_cache(maxsize=8)
def _vector_in_crs(path: str, crs_wkt: str | None, columns: tuple[str, ...]) -> Any:
    # label and area files are small beside the rasters: read once per process, index once
    gdf = read_vector(path, "vector file", CRS.from_wkt(crs_wkt) if crs_wkt else None)
    gdf = gdf[[*columns, "geometry"]]
    gdf.sindex  # noqa: B018  (build the spatial index now, once)
    return gdf


def vector_in_window(
    path: str, window: Window, profile: SceneProfile, columns: Sequence[str] = ()
) -> Any:
    """The features of vector file ``path`` that intersect ``window`` of the scene, in the
    scene's CRS (the file is read once per process and indexed)."""
    gdf = _vector_in_crs(path, profile.crs.to_wkt() if profile.crs else None, tuple(columns))
    hits = gdf.sindex.query(_box(*window_bounds(window, profile.transform)))
    return gdf.iloc[np.sort(hits)]


def area_mask(path: str | None, window: Window, profile: SceneProfile) -> np.ndarray:
    """True where ``window``'s pixels lie inside the polygons of ``path`` (all true if None)."""
    shape = (int(window.height), int(window.width))
    if path is None:
        return np.ones(shape, dtype=bool)
    gdf = vector_in_window(path, window, profile)
    if gdf.empty:
        return np.zeros(shape, dtype=bool)
    return rasterize(
        ((g, 1) for g in gdf.geometry),
        out_shape=shape,
        transform=window_transform(window, profile.transform),
        fill=0,
        dtype="uint8",
    ).astype(bool)


def read_codes(
    spec: LabelSpec, window: Window, profile: SceneProfile, src: Any = None
) -> np.ndarray:
    """Label codes in ``window`` as int32, with -1 where there is no label. ``src``: the label
    raster, already open (else it is opened here)."""
    shape = (int(window.height), int(window.width))
    if spec.is_vector:
        field = spec.field
        assert field is not None
        gdf = vector_in_window(spec.path, window, profile, [field])
        if gdf.empty:
            return np.full(shape, -1, dtype=np.int32)
        codes = rasterize(
            ((g, int(v)) for g, v in zip(gdf.geometry, gdf[field]) if v is not None),
            out_shape=shape,
            transform=window_transform(window, profile.transform),
            fill=-1,
            dtype="int32",
        )
    else:
        with contextlib.ExitStack() as stack:
            if src is None:
                src = stack.enter_context(rasterio.open(spec.path))
            data = src.read(1, window=window, boundless=not window_inside(src, window), masked=True)
        codes = np.where(np.ma.getmaskarray(data), -1, np.asarray(data.filled(0)).astype(np.int32))
    for c in spec.ignore:
        codes[codes == c] = -1
    return codes


def check_labels(spec: LabelSpec, scene: SceneProfile) -> None:
    """Raise a :class:`LabelError` if labels cannot be used with ``scene`` at all."""
    if spec.is_vector:
        gdf = read_vector(spec.path, "labels")
        if gdf.empty:
            raise LabelError(f"labels {spec.path!r} hold no features")
        numeric = [c for c in gdf.columns if c != "geometry" and gdf[c].dtype.kind in "iu"]
        if spec.field is None:
            if len(numeric) != 1:
                raise LabelError(
                    f"labels {spec.path!r}: say which column holds the class codes with "
                    f"--label-field; integer columns: {', '.join(numeric) or 'none'}; all columns: "
                    f"{', '.join(c for c in gdf.columns if c != 'geometry')}"
                )
            object.__setattr__(spec, "field", numeric[0])
        elif spec.field not in gdf.columns:
            raise LabelError(
                f"labels {spec.path!r} have no column {spec.field!r}; columns: "
                f"{', '.join(c for c in gdf.columns if c != 'geometry')}"
            )
        elif spec.field not in numeric:
            raise LabelError(
                f"labels {spec.path!r}: column {spec.field!r} holds {gdf[spec.field].dtype} values, "
                f"not integer class codes; integer columns: {', '.join(numeric) or 'none'}"
            )
        if scene.crs is not None and gdf.crs is not None:
            gdf = gdf.to_crs(scene.crs)
        if not gdf.intersects(_box(*raster_bounds(scene))).any():
            raise LabelError(f"labels {spec.path!r} do not overlap scene {scene.path!r}")
    else:
        check_same_grid(scene, read_profile(spec.path, "labels"), "labels")


def _box(*b: float) -> Any:
    from shapely.geometry import box

    return box(*b)


def resolve_classes(
    spec: LabelSpec, code_counts: dict[int, int], classes: Sequence[ClassInfo] | None
) -> list[ClassInfo]:
    """The class list: as given, else from the label raster's metadata, else one class per
    code found in the labels. Codes found but not listed are an error."""
    if classes is None and not spec.is_vector:
        with rasterio.open(spec.path) as src:
            classes = read_class_metadata(src)
            if classes is None:
                try:
                    cmap = src.colormap(1)
                except ValueError:
                    cmap = {}
                classes = [
                    ClassInfo(
                        c, f"class {c}", _hex(cmap[c]) if c in cmap else _PALETTE[i % len(_PALETTE)]
                    )
                    for i, c in enumerate(sorted(code_counts))
                ]
    if classes is None:
        # every code of a vector file's field, not just those that fall on valid pixels
        codes = set(code_counts)
        if spec.is_vector:
            codes |= {
                int(v) for v in read_vector(spec.path, "labels")[spec.field].dropna().unique()
            }
        classes = [
            ClassInfo(c, f"class {c}", _PALETTE[i % len(_PALETTE)])
            for i, c in enumerate(sorted(codes))
        ]
    classes = sorted(classes, key=lambda c: c.id)
    known = {c.id for c in classes}
    missing = sorted(set(code_counts) - known)
    if missing:
        raise LabelError(
            f"labels {spec.path!r} hold codes {missing} that are not in the class list "
            f"({sorted(known)}); add them to --classes or pass --ignore {','.join(map(str, missing))}"
        )
    if not classes:
        raise LabelError(f"labels {spec.path!r} hold no class codes inside the scene")
    if any(not 0 <= c.id < 255 for c in classes):
        raise LabelError("class codes must be between 0 and 254 (255 marks nodata in class maps)")
    return classes


def _hex(rgba: tuple[int, ...]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgba[:3])


def parse_classes(items: Any, source: str = "classes") -> list[ClassInfo]:
    """Classes from a list of mappings with ``id`` and optional ``name`` and ``color``."""
    try:
        return [
            c
            if isinstance(c, ClassInfo)
            else ClassInfo(
                int(c["id"]),
                str(c.get("name", f"class {c['id']}")),
                str(c.get("color", _PALETTE[i % len(_PALETTE)])),
            )
            for i, c in enumerate(items)
        ]
    except (TypeError, KeyError, ValueError) as exc:
        raise LabelError(
            f"{source} is not a list of classes with 'id' (and optional 'name', 'color'): {exc}"
        ) from None


def load_classes(classes: str | os.PathLike[str] | Sequence[Any]) -> list[ClassInfo]:
    """A class list from a YAML file (``- {id: 1, name: water, color: "#1f78b4"}`` per class,
    optionally under a ``classes:`` key) or from a list already in memory."""
    import yaml

    from geoseg.io import check_input

    if not isinstance(classes, (str, os.PathLike)):
        return parse_classes(classes)
    with open(check_input(classes, "classes file")) as f:
        raw = yaml.safe_load(f)
    items = raw.get("classes", raw) if isinstance(raw, dict) else raw
    return parse_classes(items, f"classes file {str(classes)!r}")


# -- statistics ------------------------------------------------------------------------------


ANCHORS_PER_BLOCK = 2048


@dataclass
class BlockStats:
    """Additive statistics of one block: per-band sums over valid pixels, label code counts,
    and a random sample of labelled pixels (``anchors``, scene row and column) to draw
    training windows around."""

    count: np.ndarray
    total: np.ndarray
    total_sq: np.ndarray
    codes: dict[int, int]
    anchors: np.ndarray

    def __add__(self, other: BlockStats) -> BlockStats:
        codes = dict(self.codes)
        for k, v in other.codes.items():
            codes[k] = codes.get(k, 0) + v
        return BlockStats(
            self.count + other.count,
            self.total + other.total,
            self.total_sq + other.total_sq,
            codes,
            np.concatenate([self.anchors, other.anchors]),
        )

    def mean_std(self) -> tuple[list[float], list[float]]:
        n = np.maximum(self.count, 1)
        mean = self.total / n
        var = np.maximum(self.total_sq / n - mean**2, 0.0)
        std = np.sqrt(var)
        std[std == 0] = 1.0
        return mean.tolist(), std.tolist()


def block_stats(
    window: Window,
    scene: str,
    bands: Sequence[int],
    labels: LabelSpec,
    within: str | None,
    nodata: float | None = None,
) -> BlockStats:
    """Statistics of one block (a Dask task); float64 sums so blocks add up exactly."""
    from geoseg.io import read_window

    profile = read_profile(scene)
    with rasterio.open(scene) as src:
        data, valid = read_window(src, window, bands, nodata)
    valid &= area_mask(within, window, profile)
    d = data[:, valid].astype(np.float64)
    codes = read_codes(labels, window, profile)
    labelled = valid & (codes >= 0)
    values, counts = np.unique(codes[labelled], return_counts=True)
    rows, cols = np.nonzero(labelled)
    rng = np.random.default_rng([int(window.row_off), int(window.col_off)])
    pick = rng.permutation(len(rows))[:ANCHORS_PER_BLOCK]
    anchors = np.column_stack([rows[pick] + int(window.row_off), cols[pick] + int(window.col_off)])
    return BlockStats(
        count=np.full(len(bands), d.shape[1], dtype=np.float64),
        total=d.sum(axis=1),
        total_sq=(d * d).sum(axis=1),
        codes={int(v): int(c) for v, c in zip(values, counts)},
        anchors=anchors.astype(np.int32),
    )


# -- sampling and augmentation -----------------------------------------------------------------


@dataclass(frozen=True)
class SampleSpec:
    """What a training task needs to draw windows (all paths and numbers, cheap to send)."""

    scene: str
    bands: tuple[int, ...]
    labels: LabelSpec
    class_ids: tuple[int, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    window: int
    within: str | None
    bounds: tuple[int, int, int, int]  # row0, col0, row1, col1: where windows may lie
    anchors: np.ndarray  # (n, 2) labelled pixels (row, col); each window contains one
    augment: str = "light"
    nodata: float | None = None


def pixel_bounds(profile: SceneProfile, within: str | None) -> tuple[int, int, int, int]:
    """The pixel rectangle (row0, col0, row1, col1) of the scene inside ``within``'s polygons."""
    if within is None:
        return (0, 0, profile.height, profile.width)
    gdf = read_vector(within, "area", profile.crs)
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
    return (r0, c0, r1, c1)


class WindowSampler:
    """Draws random training windows lying wholly inside the area, with enough labelled pixels."""

    def __init__(self, spec: SampleSpec, seed: int) -> None:
        self.spec = spec
        self.rng = np.random.default_rng(seed)
        self.profile = read_profile(spec.scene)
        self.src = rasterio.open(spec.scene)
        self.label_src = None if spec.labels.is_vector else rasterio.open(spec.labels.path)
        self.lut = np.full(256, IGNORE, dtype=np.uint8)  # label code -> class index
        self.lut[list(spec.class_ids)] = np.arange(len(spec.class_ids), dtype=np.uint8)
        self.mean = np.asarray(spec.mean, dtype=np.float32)[:, None, None]
        self.std = np.asarray(spec.std, dtype=np.float32)[:, None, None]
        self.aug = build_augmenter(spec.augment, spec.window, seed)

    def close(self) -> None:
        self.src.close()
        if self.label_src is not None:
            self.label_src.close()

    def _read(self, window: Window) -> tuple[np.ndarray, np.ndarray] | None:
        from geoseg.io import read_window

        if (
            self.spec.within is not None
            and not area_mask(self.spec.within, window, self.profile).all()
        ):
            return None  # windows lie wholly inside the area: nothing outside it is seen
        data, valid = read_window(self.src, window, self.spec.bands, self.spec.nodata)
        codes = read_codes(self.spec.labels, window, self.profile, self.label_src)
        mask = np.where(codes >= 0, self.lut[np.clip(codes, 0, 255)], IGNORE)
        mask[~valid] = IGNORE
        if not (mask != IGNORE).any():
            return None
        x = (data - self.mean) / self.std
        x[:, ~valid] = 0.0
        return x.astype(np.float32), mask.astype(np.uint8)

    def draw_window(self) -> Window:
        """A window holding a random labelled pixel at a random place, kept inside the bounds,
        plus the augmentation's margin on each side."""
        r0, c0, r1, c1 = self.spec.bounds
        w, m = self.spec.window + 2 * self.aug.margin, self.aug.margin
        ar, ac = self.spec.anchors[self.rng.integers(len(self.spec.anchors))]
        r = int(np.clip(ar - m - self.rng.integers(self.spec.window), r0, max(r0, r1 - w)))
        c = int(np.clip(ac - m - self.rng.integers(self.spec.window), c0, max(c0, c1 - w)))
        return Window(c, r, w, w)

    def sample(self, max_tries: int = 200) -> tuple[np.ndarray, np.ndarray]:
        """One (image, mask) pair: image (bands, w, w) float32 normalised, mask (w, w) class
        indices with IGNORE where unlabelled."""
        for _ in range(max_tries):
            got = self._read(self.draw_window())
            if got is None:
                continue
            return self.aug(*got)
        r0, c0, r1, c1 = self.spec.bounds
        raise LabelError(
            f"no window of {self.spec.window} px with a labelled, valid pixel wholly inside the "
            f"training area found in {max_tries} tries (rows {r0}-{r1}, cols {c0}-{c1} of "
            f"{self.spec.scene!r}); use a smaller --window or a larger area"
        )
