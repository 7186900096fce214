"""Training data: labels from rasters or vectors, windows sampled from the labelled area,
per-band statistics, and augmentation that moves image and mask together.

Everything here reads windows from paths, so the same code runs in the client and in Dask tasks.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
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
    standardize,
    vector_near,
    window_inside,
)

log = logging.getLogger("geoseg")

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
    class field. Codes in ``ignore`` mean unlabelled; ``class_map`` turns codes into class ids
    (``(code, id)`` pairs; codes it does not name stay as they are)."""

    path: str
    field: str | None = None
    ignore: tuple[int, ...] = ()
    class_map: tuple[tuple[int, int], ...] = ()

    @property
    def is_vector(self) -> bool:
        return is_vector_path(self.path)


@lru_cache(maxsize=8)
def _vector_in_crs(
    path: str,
    crs_wkt: str | None,
    columns: tuple[str, ...],
    bounds: tuple[float, float, float, float] | None = None,
) -> Any:
    # the features near the scene: read once per process, index once
    crs = CRS.from_wkt(crs_wkt) if crs_wkt else None
    gdf = read_vector(path, "vector file", crs, bounds=bounds if crs else None)
    gdf = gdf[[*columns, "geometry"]]
    gdf.sindex  # noqa: B018  (build the spatial index now, once)
    return gdf


def vector_in_window(
    path: str, window: Window, profile: SceneProfile, columns: Sequence[str] = ()
) -> Any:
    """The features of vector file ``path`` that intersect ``window`` of the scene, in the
    scene's CRS (the file is read once per process and indexed)."""
    gdf = _vector_in_crs(
        path,
        profile.crs.to_wkt() if profile.crs else None,
        tuple(columns),
        raster_bounds(profile),
    )
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
    """Label codes in ``window`` as int32, with -1 where there is no label (nodata, NaN, an
    ignored code), after ``spec.class_map``. ``src``: the label raster, already open (else it
    is opened here). The codes are those :func:`check_codes` let through: whole numbers, none
    negative, so -1 never stands for a real code."""
    shape = (int(window.height), int(window.width))
    mapping = dict(spec.class_map)
    if spec.is_vector:
        field = spec.field
        assert field is not None
        gdf = vector_in_window(spec.path, window, profile, [field])
        if gdf.empty:
            return np.full(shape, -1, dtype=np.int32)
        ignore = set(spec.ignore)
        return rasterize(
            (
                (g, -1 if int(v) in ignore else mapping.get(int(v), int(v)))
                for g, v in zip(gdf.geometry, gdf[field])
                if v is not None and v == v  # not None, not NaN
            ),
            out_shape=shape,
            transform=window_transform(window, profile.transform),
            fill=-1,
            dtype="int32",
        )
    with contextlib.ExitStack() as stack:
        if src is None:
            src = stack.enter_context(rasterio.open(spec.path))
        data = src.read(1, window=window, boundless=not window_inside(src, window), masked=True)
    if data.dtype.kind == "f":
        data = np.ma.masked_invalid(data)
    raw = np.asarray(data.filled(0)).astype(np.int64)
    labelled = ~np.ma.getmaskarray(data)
    if spec.ignore:
        labelled &= ~np.isin(raw, spec.ignore)
    if mapping:
        raw = map_codes(raw, mapping)
    return np.where(labelled, raw, -1).astype(np.int32)


def map_codes(codes: np.ndarray, mapping: dict[int, int]) -> np.ndarray:
    """Codes through ``mapping`` (code -> class id); codes it does not name stay."""
    if not mapping:
        return codes
    out = codes.copy()
    for src_code, dst in mapping.items():
        out[codes == src_code] = dst
    return out


CODE_RANGE = "class ids are whole numbers 0-254 (255 marks nodata in class maps)"


def _field_option(what: str) -> str:
    """The option that names the class field of vector ``what`` (labels or truth)."""
    return "--label-field" if what == "labels" else "--truth-field"


ID_LIKE = {"id", "fid", "gid", "ogc_fid", "objectid", "object_id", "uid", "index"}


def check_labels(
    spec: LabelSpec, scene: SceneProfile, what: str = "labels", grid: str = "scene"
) -> LabelSpec:
    """Raise a :class:`LabelError` if labels cannot be used with ``scene`` at all; return the
    spec with its class field chosen (said in a log line when it was not given). ``what`` and
    ``grid`` name the labels and the raster they go with in messages (``truth`` and ``class
    map`` for evaluation)."""
    if spec.is_vector:
        gdf = read_vector(spec.path, what)
        if gdf.empty:
            raise LabelError(f"{what} {spec.path!r} hold no features")
        numeric = [c for c in gdf.columns if c != "geometry" and gdf[c].dtype.kind in "iu"]
        columns = ", ".join(c for c in gdf.columns if c != "geometry")
        field = spec.field
        if field is None:
            if len(numeric) != 1:
                raise LabelError(
                    f"{what} {spec.path!r}: say which column holds the class codes with "
                    f"{_field_option(what)}; integer columns: {', '.join(numeric) or 'none'}; all columns: "
                    f"{columns}"
                )
            field = numeric[0]
            _say_field(spec.path, what, field, gdf[field])
        elif field not in gdf.columns:
            raise LabelError(f"{what} {spec.path!r} have no column {field!r}; columns: {columns}")
        elif gdf[field].dtype.kind not in "iuf":
            raise LabelError(
                f"{what} {spec.path!r}: column {field!r} holds {gdf[field].dtype} values, "
                f"not integer class codes; integer columns: {', '.join(numeric) or 'none'}"
            )
        spec = LabelSpec(spec.path, field, spec.ignore, spec.class_map)
        check_codes(spec, gdf[field].dropna().unique().astype(np.float64), what)
        if scene.crs is not None and gdf.crs is not None:
            gdf = vector_near(gdf, scene.crs, raster_bounds(scene))
        if not gdf.intersects(_box(*raster_bounds(scene))).any():
            raise LabelError(f"{what} {spec.path!r} do not overlap the {grid} {scene.path!r}")
    else:
        check_same_grid(scene, read_profile(spec.path, what), what, grid)
        check_codes(spec, raster_values(spec.path), what)
    return spec


def _say_field(path: str, what: str, field: str, values: Any) -> None:
    """Say which column was taken for the class codes, and warn when it looks like an
    identifier rather than a class."""
    option = _field_option(what)
    distinct = values.nunique()
    if field.lower() in ID_LIKE or (len(values) > 20 and distinct == len(values)):
        warnings.warn(
            f"{what} {path!r}: the only integer column, {field!r}, was taken for the class "
            f"codes, but it looks like a feature identifier ({distinct} distinct values in "
            f"{len(values)} features); pass {option} with the column of class codes",
            stacklevel=4,
        )
    else:
        log.info(
            "%s %s: class codes from column %r (the only integer column; %s chooses another)",
            what,
            path,
            field,
            option,
        )


def raster_values(path: str) -> np.ndarray:
    """Every distinct value of a label raster's first band outside its nodata (and NaN), read
    block by block, as float64."""
    from geoseg.tiling import block_windows

    found: set[float] = set()
    with rasterio.open(path) as src:
        for win in block_windows(src.height, src.width, 2048):
            a = src.read(1, window=win, masked=True)
            v = a.compressed()
            if v.dtype.kind == "f":
                v = v[np.isfinite(v)]
            if v.dtype.kind in "u" and v.dtype.itemsize <= 2:
                found.update(np.flatnonzero(np.bincount(v)).tolist())
            else:
                found.update(np.unique(v).tolist())
    return np.array(sorted(found), dtype=np.float64)


def check_codes(spec: LabelSpec, values: np.ndarray, what: str = "labels") -> None:
    """Refuse label values that cannot be class codes: not whole numbers, negative, or above
    254 (255 is nodata in class maps), unless ``spec`` ignores them or maps them to a class;
    the message names the file, the field and the codes, and how to fix them."""
    allowed = set(spec.ignore) | {k for k, _ in spec.class_map}
    fractional = [v for v in values if v != np.floor(v)]
    whole = [int(v) for v in values if v == np.floor(v) and int(v) not in allowed]
    negative = [c for c in whole if c < 0]
    large = [c for c in whole if c > 254]
    bad_ids = sorted({i for _, i in spec.class_map if not 0 <= i <= 254})
    if bad_ids:
        raise LabelError(f"--class-map maps codes onto {bad_ids}; {CODE_RANGE}")
    if not (fractional or negative or large):
        return
    source = f"{what} {spec.path!r}" + (f", field {spec.field!r}," if spec.field else "")

    def some(items: list[Any]) -> str:
        return ", ".join(f"{v:g}" for v in items[:8]) + (" ..." if len(items) > 8 else "")

    found = "; ".join(
        text
        for text, items in (
            ("negative codes " + some(negative), negative),
            ("codes that are not whole numbers " + some(fractional), fractional),
            ("codes above 254 " + some(large), large),
        )
        if items
    )
    codes = [*negative, *large]
    fix = "recode them (gdal_calc.py, or a column of whole numbers 0-254)"
    if codes:
        fix += f", or leave them out with --ignore {','.join(map(str, codes[:8]))}"
        if what == "truth":
            fix += " or map them onto the class map's ids with --class-map CODE:ID"
    raise LabelError(f"{source} hold {found}; {CODE_RANGE}: {fix}")


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
    bad = sorted(c.id for c in classes if not 0 <= c.id <= 254)
    if bad:  # from a label raster's own class metadata: lists and codes are checked earlier
        raise LabelError(f"labels {spec.path!r} name class ids {bad}; {CODE_RANGE}")
    return classes


def _hex(rgba: tuple[int, ...]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgba[:3])


def parse_classes(items: Any, source: str = "classes") -> list[ClassInfo]:
    """Classes from a list of mappings with ``id`` and optional ``name`` and ``color``."""
    try:
        parsed = [
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
    bad = sorted(c.id for c in parsed if not 0 <= c.id <= 254)
    if bad:
        raise LabelError(f"{source} has class ids {bad}; {CODE_RANGE}")
    return parsed


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


# -- the validation split ----------------------------------------------------------------------


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


# -- statistics ------------------------------------------------------------------------------


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


def block_stats(
    window: Window,
    scene: str,
    bands: Sequence[int],
    labels: LabelSpec,
    within: str | None,
    nodata: float | None = None,
    val_region: str | None = None,
    train_window: int = 64,
) -> BlockStats:
    """Statistics of one block (a Dask task); float64 sums so blocks add up exactly. Pixels
    inside ``val_region`` count as validation and give no anchors or cells."""
    from geoseg.io import read_window

    profile = read_profile(scene)
    with rasterio.open(scene) as src:
        data, valid = read_window(src, window, bands, nodata)
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
        count=np.full(len(bands), d.shape[1], dtype=np.float64),
        total=d.sum(axis=1),
        total_sq=(d * d).sum(axis=1),
        codes=_counts(codes[train]),
        val_codes=_counts(codes[labelled & val]),
        anchors=anchors.astype(np.int32).reshape(-1, 3),
        weights=np.concatenate(weights) if weights else np.zeros(0),
        cells=cells.astype(np.int32).reshape(-1, 2),
    )


# -- sampling and augmentation -----------------------------------------------------------------

SAMPLERS = ("random", "balanced", "grid")


@dataclass(frozen=True)
class SampleSpec:
    """One training scene as the training tasks see it (paths and numbers, cheap to send)."""

    scene: str
    bands: tuple[int, ...]
    labels: LabelSpec
    class_ids: tuple[int, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    window: int
    within: str | None
    bounds: tuple[int, int, int, int]  # row0, col0, row1, col1: where windows may lie
    augment: str = "light"
    nodata: float | None = None
    val: ValSplit | None = None


@dataclass(frozen=True)
class AnchorTable:
    """Where training windows are drawn, over all scenes: ``anchors`` (scene, row, column,
    code) with ``weights`` (pixels each stands for), and grid ``cells`` (scene, row, column
    indexes of window-size squares holding a labelled training pixel)."""

    anchors: np.ndarray
    weights: np.ndarray
    cells: np.ndarray


def pixel_bounds(profile: SceneProfile, within: str | None) -> tuple[int, int, int, int]:
    """The pixel rectangle (row0, col0, row1, col1) of the scene inside ``within``'s polygons."""
    if within is None:
        return (0, 0, profile.height, profile.width)
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
    return (r0, c0, r1, c1)


class SceneReader:
    """Reads normalised image windows and class-index masks of one training scene."""

    def __init__(self, spec: SampleSpec) -> None:
        self.spec = spec
        self.profile = read_profile(spec.scene)
        self.src = rasterio.open(spec.scene)
        self.label_src = None if spec.labels.is_vector else rasterio.open(spec.labels.path)
        self.lut = np.full(256, IGNORE, dtype=np.uint8)  # label code -> class index
        self.lut[list(spec.class_ids)] = np.arange(len(spec.class_ids), dtype=np.uint8)

    def close(self) -> None:
        self.src.close()
        if self.label_src is not None:
            self.label_src.close()

    def read(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        """``(image, mask)``: image ``(bands, h, w)`` float32 normalised (0 where invalid),
        mask ``(h, w)`` uint8 class indexes, IGNORE where unlabelled or invalid."""
        from geoseg.io import read_window

        data, valid = read_window(self.src, window, self.spec.bands, self.spec.nodata)
        codes = read_codes(self.spec.labels, window, self.profile, self.label_src)
        mask = np.where(codes >= 0, self.lut[np.clip(codes, 0, 255)], IGNORE).astype(np.uint8)
        mask[~valid] = IGNORE
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
                "no labelled training pixel to draw windows from; check the labels, --within "
                "and the validation split"
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
        r0, c0, r1, c1 = self.specs[scene].bounds
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
        if not (mask != IGNORE).any():
            return None
        return x, mask

    def sample(self, max_tries: int = 200) -> tuple[np.ndarray, np.ndarray, tuple[int, Window]]:
        """One training pair and where it came from: image ``(bands, w, w)`` float32
        normalised, mask ``(w, w)`` class indexes with IGNORE where unlabelled, and
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
            "smaller --window, a larger area or a smaller validation share"
        )
