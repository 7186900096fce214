"""Labels and class lists: class codes read from rasters or vectors, mapped and checked; the
classes of a model from a file, a list or the labels themselves; and :data:`NODATA`, the one
value that marks "no class" everywhere (nodata in class maps, ignored in training targets).

Pure: no Dask. Everything here reads windows from paths, so it runs in the client and in tasks.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.features import rasterize
from rasterio.windows import Window
from rasterio.windows import bounds as window_bounds
from rasterio.windows import transform as window_transform

from geoseg.classes import CODE_RANGE, ClassInfo
from geoseg.errors import ConfigError, LabelError, option
from geoseg.io import (
    SceneProfile,
    grid_offset,
    is_vector_path,
    raster_bounds,
    read_class_metadata,
    read_profile,
    read_vector,
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
    """Where labels come from: a class raster on the scene's pixel grid, or a vector file with a
    class field. Codes in ``ignore`` mean unlabelled; ``class_map`` turns codes into class ids
    (``(code, id)`` pairs; codes it does not name stay as they are). ``offset``: the ``(row,
    col)`` of the scene's first pixel in the raster, which may cover another extent (set by
    :func:`check_labels`)."""

    path: str
    field: str | None = None
    ignore: tuple[int, ...] = ()
    class_map: tuple[tuple[int, int], ...] = ()
    offset: tuple[int, int] = (0, 0)

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
    if spec.offset != (0, 0):  # the same pixels, in a raster of another extent
        r, c = spec.offset
        window = Window(window.col_off + c, window.row_off + r, window.width, window.height)
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


def _field_option(what: str) -> str:
    """The option that names the class field of vector ``what`` (labels or truth)."""
    return option("--label-field" if what == "labels" else "--truth-field", None)


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
        labels = read_profile(spec.path, what)
        r, c = grid_offset(scene, labels, what, grid)
        if (r, c) != (0, 0) or labels.shape != scene.shape:
            log.info(
                "%s %s: %dx%d px on the %s's pixel grid; the %s's %dx%d px read from row %d, "
                "column %d",
                what, spec.path, labels.width, labels.height, grid, grid, scene.width,
                scene.height, r, c,
            )  # fmt: skip
        spec = replace(spec, offset=(r, c))
        inside = Window(c, r, scene.width, scene.height).intersection(
            Window(0, 0, labels.width, labels.height)
        )
        check_codes(spec, raster_values(spec.path, inside), what)
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


def raster_values(path: str, within: Window | None = None) -> np.ndarray:
    """Every distinct value of a label raster's first band outside its nodata (and NaN), read
    block by block, as float64; only inside ``within`` when given."""
    from geoseg.tiling import block_windows

    found: set[float] = set()
    with rasterio.open(path) as src:
        area = within or Window(0, 0, src.width, src.height)
        for win in block_windows(int(area.height), int(area.width), 2048):
            win = Window(
                win.col_off + area.col_off, win.row_off + area.row_off, win.width, win.height
            )
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
        raise LabelError(f"{option('--class-map', None)} maps codes onto {bad_ids}; {CODE_RANGE}")
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
        fix += f", or leave them out with {option('--ignore', [int(c) for c in codes[:8]])}"
        if what == "truth":
            fix += f" or map them onto the class map's ids with {option('--class-map', None)}"
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
            f"({sorted(known)}); add them to {option('--classes', None)} or pass "
            f"{option('--ignore', missing)}"
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


def truth_codes(
    spec: LabelSpec, window: Window, profile: Any, resample: bool = False
) -> np.ndarray:
    """Truth codes in ``window`` of the class map's grid (-1: none); with ``resample``, a truth
    raster on another grid is warped onto it with nearest neighbour."""
    if not resample or spec.is_vector:
        return read_codes(spec, window, profile)
    from rasterio.enums import Resampling
    from rasterio.vrt import WarpedVRT

    with (
        rasterio.open(spec.path) as src,
        WarpedVRT(
            src,
            crs=profile.crs or src.crs,
            transform=profile.transform,
            width=profile.width,
            height=profile.height,
            resampling=Resampling.nearest,
        ) as vrt,
    ):
        return read_codes(spec, window, profile, src=vrt)


def check_regions(path: str, field: str | None, profile: Any) -> tuple[list[str], tuple[int, ...]]:
    """Names and file positions of the regions of ``path`` (named by ``field``, default
    ``name``) that overlap the raster of ``profile``; tasks refer to regions by position in
    the file."""

    gdf = read_vector(path, "regions", profile.crs, bounds=raster_bounds(profile))
    columns = [c for c in gdf.columns if c != "geometry"]
    if field is None:
        if "name" not in gdf.columns:
            raise ConfigError(
                f"regions {path!r}: say which column names the regions with "
                f"{option('--region-field', None)}; "
                f"columns: {', '.join(columns)}"
            )
        field = "name"
    if field not in gdf.columns:
        raise ConfigError(
            f"regions {path!r} have no column {field!r}; columns: {', '.join(columns)}"
        )
    inside = gdf[gdf.intersects(_box(*raster_bounds(profile))).to_numpy()]
    if inside.empty:
        warnings.warn(f"no region of {path!r} overlaps the class map", stacklevel=3)
    # the index holds each feature's position in the file, which the tasks refer to
    return [str(v) for v in inside[field]], tuple(int(i) for i in inside.index)
