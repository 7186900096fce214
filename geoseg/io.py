"""Reading scenes and labels, and writing outputs atomically.

Everything that touches a file goes through here: opening a scene for its profile, windowed reads
with the scene's nodata turned into a validity mask, class metadata (colour table and names) in
GeoTIFF tags, and outputs written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import shapely
from affine import Affine
from rasterio.coords import BoundingBox
from rasterio.crs import CRS
from rasterio.enums import MaskFlags
from rasterio.errors import RasterioError, RasterioIOError
from rasterio.windows import Window
from rasterio.windows import bounds as window_bounds

from geoseg.classes import ClassInfo
from geoseg.errors import (
    GridMismatchError,
    InputNotFoundError,
    NotARasterError,
    NotAVectorError,
    OutputError,
    OutputExistsError,
    OutputLockedError,
    option,
)

CLASSES_TAG = "GEOSEG_CLASSES"
"""GeoTIFF tag holding the class list (JSON: id, name, colour) of a class raster."""

_GDAL_URL_PREFIXES = ("/vsi", "http://", "https://", "s3://", "gs://")


@dataclass(frozen=True)
class Grid:
    """A pixel grid: CRS, affine transform and size. Bands are read onto one (resampled and
    reprojected where they lie on another)."""

    crs: CRS | None
    transform: Affine
    width: int
    height: int

    @property
    def res(self) -> tuple[float, float]:
        return (abs(self.transform.a), abs(self.transform.e))

    @property
    def shape(self) -> tuple[int, int]:
        return (self.height, self.width)

    def offset_of(self, other: Grid) -> tuple[int, int] | None:
        """``(row, col)`` of this grid's top-left pixel on ``other`` when both share pixels
        (same CRS, pixel size and alignment, no rotation), else None."""
        a, b = self.transform, other.transform
        if (self.crs is None) != (other.crs is None) or (self.crs and self.crs != other.crs):
            return None
        if a.b or a.d or b.b or b.d or not np.allclose([a.a, a.e], [b.a, b.e], rtol=1e-9):
            return None
        col = (a.c - b.c) / b.a
        row = (a.f - b.f) / b.e
        if abs(col - round(col)) > 1e-6 or abs(row - round(row)) > 1e-6:
            return None
        return round(row), round(col)


@dataclass(frozen=True)
class BandSource:
    """One band of a scene that is not a single file: band ``band`` (1-based) of ``path``, on
    its own grid; ``name`` is how a bundle finds it (an asset key, a band name)."""

    path: str
    band: int
    name: str
    grid: Grid
    nodata: float | None
    dtype: str


@dataclass(frozen=True)
class SceneProfile:
    """What geoseg needs to know about a scene before reading pixels.

    A scene is a raster file (``sources`` empty: its bands are the file's), or bands gathered
    from several files (``sources``: band files, the assets of a STAC item), read onto the
    scene's grid, the finest band's, block by block. ``by_name``: a bundle finds its bands by
    name (``descriptions``) rather than by index (STAC items). ``mask``: a band whose
    ``mask_values`` mark pixels that must not be predicted (clouds)."""

    path: str
    crs: CRS | None
    transform: Affine
    width: int
    height: int
    count: int
    dtype: str
    nodata: float | None
    descriptions: tuple[str | None, ...]
    sources: tuple[BandSource, ...] = ()
    by_name: bool = False
    id: str = ""
    mask: BandSource | None = None
    mask_values: tuple[float, ...] = ()
    datetime: str | None = None  # a STAC item's
    tile: tuple[int, int] = (0, 0)  # a one-file scene's internal block (rows, cols); 0 unknown

    @property
    def shape(self) -> tuple[int, int]:
        return (self.height, self.width)

    @property
    def res(self) -> tuple[float, float]:
        return (abs(self.transform.a), abs(self.transform.e))

    @property
    def grid(self) -> Grid:
        return Grid(self.crs, self.transform, self.width, self.height)

    @property
    def name(self) -> str:
        """The scene's id, else its file name without the suffix: what its outputs are named."""
        return self.id or Path(self.path).stem

    @property
    def files(self) -> list[str]:
        """Every file the scene reads."""
        paths = [s.path for s in self.sources] or [self.path]
        if self.mask is not None:
            paths.append(self.mask.path)
        return list(dict.fromkeys(paths))


def raster_bounds(profile: SceneProfile) -> BoundingBox:
    """A scene's (left, bottom, right, top) in its CRS."""
    return BoundingBox(
        *window_bounds(Window(0, 0, profile.width, profile.height), profile.transform)
    )


def is_url(path: str | os.PathLike[str]) -> bool:
    return str(path).startswith(_GDAL_URL_PREFIXES)


def resolve_path(path: str | os.PathLike[str]) -> str:
    """``path`` made absolute on the client (GDAL URLs as they are): workers may run in other
    folders, or on other machines."""
    return str(path) if is_url(path) else str(Path(path).resolve())


def check_input(path: str | os.PathLike[str], what: str = "input") -> str:
    """Return ``path`` as a string, raising a clear error if a local file is missing."""
    p = str(path)
    if not is_url(p) and not Path(p).exists():
        raise InputNotFoundError(f"{what} {p!r} does not exist; check the path", filename=p)
    return p


def open_raster(path: str | os.PathLike[str], what: str = "scene") -> rasterio.DatasetReader:
    """Open a raster for reading, turning GDAL's errors into one clear geoseg error."""
    p = check_input(path, what)
    try:
        return rasterio.open(p)
    except RasterioIOError as exc:
        raise NotARasterError(
            f"{what} {p!r} is not a raster GDAL can read ({exc}); expected a GeoTIFF or another "
            "GDAL raster format"
        ) from None


def read_profile(path: str | os.PathLike[str], what: str = "scene") -> SceneProfile:
    """Read a scene's grid and band layout without reading pixels."""
    with open_raster(path, what) as src:
        return SceneProfile(
            path=str(path),
            crs=src.crs,
            transform=src.transform,
            width=src.width,
            height=src.height,
            count=src.count,
            dtype=src.dtypes[0],
            nodata=src.nodata,
            descriptions=tuple(src.descriptions),
            tile=(int(src.block_shapes[0][0]), int(src.block_shapes[0][1])),
        )


def window_inside(src: rasterio.DatasetReader, window: Window) -> bool:
    """Whether ``window`` lies wholly inside the raster (so a plain read suffices)."""
    r0, c0 = int(window.row_off), int(window.col_off)
    return (
        r0 >= 0
        and c0 >= 0
        and r0 + int(window.height) <= src.height
        and c0 + int(window.width) <= src.width
    )


def _inside_part(
    src: rasterio.DatasetReader, window: Window
) -> tuple[Window | None, tuple[slice, slice]]:
    """The part of ``window`` inside the raster (None if it has none) and where that part
    lies in ``window``."""
    r0, c0 = int(window.row_off), int(window.col_off)
    top, left = max(0, -r0), max(0, -c0)
    bottom = min(int(window.height), src.height - r0)
    right = min(int(window.width), src.width - c0)
    if bottom <= top or right <= left:
        return None, (slice(0, 0), slice(0, 0))
    inner = Window(c0 + left, r0 + top, right - left, bottom - top)
    return inner, (slice(top, bottom), slice(left, right))


def read_window(
    src: rasterio.DatasetReader,
    window: Window,
    bands: Sequence[int] | None = None,
    nodata: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Read ``window`` (which may extend past the scene) and its validity mask.

    Returns ``(data, valid)``: data is ``(bands, h, w)`` float32, ``valid`` is ``(h, w)`` bool,
    true where every band holds data. Pixels outside the scene are invalid. ``nodata`` overrides
    the scene's own nodata (for scenes whose fill value is not declared).
    """
    indexes = list(bands) if bands is not None else list(range(1, src.count + 1))
    h, w = int(window.height), int(window.width)
    inner, (rows, cols) = _inside_part(src, window)
    flags = [src.mask_flag_enums[i - 1] for i in indexes]
    # a value marks nodata: the one given, else every band's own (a band's flags hold either
    # nodata or all_valid, never both)
    by_value = nodata is not None or all(MaskFlags.nodata in f for f in flags)
    dtype = np.dtype(src.dtypes[indexes[0] - 1])
    if nodata is not None:
        fill = np.asarray(nodata).astype(dtype)
    elif by_value:
        fill = np.asarray([src.nodatavals[i - 1] for i in indexes]).astype(dtype)[:, None, None]
    else:
        fill = np.zeros((), dtype)
    # the part inside the scene read plainly and placed in the window: rasterio's boundless
    # read builds a VRT and took about 3x as long (36 against 12-13 ms for an edge block of a
    # 2048² scene, each of whose blocks has a side past its edge); what lies outside holds
    # the fill rasterio's would (nodata, else 0)
    if inner is not None and (inner.height, inner.width) == (h, w):
        data = src.read(indexes, window=inner)
    else:
        data = np.empty((len(indexes), h, w), dtype=dtype)
        data[...] = fill
        if inner is not None:
            data[:, rows, cols] = src.read(indexes, window=inner)
    if by_value:
        valid = np.all(data != fill, axis=0)
    elif all(MaskFlags.all_valid in f for f in flags):
        valid = np.ones((h, w), dtype=bool)
    else:  # internal masks or alpha bands
        valid = np.zeros((h, w), dtype=bool)
        if inner is not None:
            valid[rows, cols] = np.all(src.read_masks(indexes, window=inner) > 0, axis=0)
    valid[: rows.start] = False  # outside the scene (all of it where inner is None)
    valid[rows.stop :] = False
    valid[:, : cols.start] = False
    valid[:, cols.stop :] = False
    if data.dtype.kind == "f":
        valid &= np.all(np.isfinite(data), axis=0)
    return data.astype("float32", copy=False), valid


def describe_window(window: Window) -> str:
    """A window as users read it: ``rows a-b, columns c-d``."""
    r, c = int(window.row_off), int(window.col_off)
    return f"rows {r}-{r + int(window.height)}, columns {c}-{c + int(window.width)}"


RESAMPLINGS = ("nearest", "bilinear", "cubic", "cubic_spline", "lanczos", "average")
"""How bands are resampled onto another grid (``--resampling``); masks are always nearest."""


def read_scene(
    scene: SceneProfile,
    window: Window,
    bands: Sequence[int],
    nodata: float | None = None,
    *,
    onto: Grid | None = None,
    resampling: str = "bilinear",
    threads: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`read_window` of ``bands`` of ``scene``, where ``window`` lies on the grid
    ``onto`` (default: the scene's own). A band on that grid is read as it is; a band on
    another grid (another pixel size, alignment or CRS) is warped onto it in the fixed tiles of
    that grid that the window touches (rasterio's ``WarpedVRT``, ``resampling``), so no band
    is ever read whole and every window sees a pixel with the same value. Pixels no band
    covers, and those the scene's mask marks, are invalid. A read error (a truncated or damaged
    file) becomes one :class:`NotARasterError` naming the file and window. A file's own nodata
    wins over ``nodata``. ``threads`` > 1: GDAL decodes the tiles (and warps) in that many
    threads (``GDAL_NUM_THREADS``, for this thread's reads only): the same values, for a worker
    whose cores would otherwise wait, such as a GPU's."""
    if threads > 1:
        with rasterio.Env(GDAL_NUM_THREADS=str(threads)):
            return read_scene(scene, window, bands, nodata, onto=onto, resampling=resampling)
    target = onto or scene.grid
    parts = (
        [(s.path, [s.band], resampling) for s in (scene.sources[i - 1] for i in bands)]
        if scene.sources
        else [(scene.path, list(bands), resampling)]
    )
    if scene.mask is not None:
        parts.append((scene.mask.path, [scene.mask.band], "nearest"))
    failure = None
    read = []
    for path, indexes, how in parts:
        try:
            read.append(_read_onto(path, indexes, window, target, nodata, how))
        except RasterioError as exc:
            failure = f"{path!r} could not be read at {describe_window(window)} ({exc})"
            break
    if failure is not None:  # raised outside the handler: GDAL's error must not travel with it
        raise NotARasterError(
            f"scene {scene.name!r}: {failure}; the file may be truncated or damaged"
        )
    if scene.mask is not None:
        values, mask_valid = read.pop()
        masked = np.isin(values[0], np.asarray(scene.mask_values, dtype=values.dtype))
        read = [(d, v & mask_valid & ~masked) for d, v in read]
    data = read[0][0] if len(read) == 1 else np.concatenate([d for d, _ in read])
    valid = read[0][1]
    for _, v in read[1:]:
        valid = valid & v
    return data, valid


WARP_TILE = 256
"""Bands on another grid are warped in tiles of this many pixels of the target grid."""


def _tiles(window: Window, height: int, width: int) -> Iterator[tuple[Window, Window]]:
    """The whole tiles (:data:`WARP_TILE` px, clipped to a ``height`` x ``width`` grid) that
    ``window`` touches, each with the part of it inside ``window``."""
    t = WARP_TILE
    r0, c0 = int(window.row_off), int(window.col_off)
    r1, c1 = r0 + int(window.height), c0 + int(window.width)
    for r in range(r0 // t * t, r1, t):
        for c in range(c0 // t * t, c1, t):
            tile = Window(c, r, min(c + t, width) - c, min(r + t, height) - r)
            a, b = max(r, r0), max(c, c0)
            yield tile, Window(b, a, min(c + t, c1) - b, min(r + t, r1) - a)


def _within(area: Window, outer: Window) -> tuple[slice, slice]:
    r, c = int(area.row_off - outer.row_off), int(area.col_off - outer.col_off)
    return slice(r, r + int(area.height)), slice(c, c + int(area.width))


def _read_onto(
    path: str,
    bands: list[int],
    window: Window,
    target: Grid,
    nodata: float | None,
    resampling: str,
) -> tuple[np.ndarray, np.ndarray]:
    from rasterio.enums import Resampling
    from rasterio.vrt import WarpedVRT

    with rasterio.open(path) as src:
        own = Grid(src.crs, src.transform, src.width, src.height)
        fill = None if src.nodata is not None else nodata
        offset = target.offset_of(own)
        if offset is not None:
            return read_window(
                src, Window(window.col_off + offset[1], window.row_off + offset[0],
                            window.width, window.height), bands, fill,
            )  # fmt: skip
        nd = src.nodata if src.nodata is not None else nodata
        h, w = int(window.height), int(window.width)
        data = np.zeros((len(bands), h, w), dtype=src.dtypes[bands[0] - 1])
        valid = np.zeros((h, w), dtype=bool)
        r0, c0 = max(0, int(window.row_off)), max(0, int(window.col_off))
        r1 = min(target.height, int(window.row_off) + h)
        c1 = min(target.width, int(window.col_off) + w)
        if r1 > r0 and c1 > c0:
            kw: dict[str, Any] = {
                "crs": target.crs,
                "transform": target.transform,
                "width": target.width,
                "height": target.height,
                "resampling": Resampling[resampling],
            }
            kw.update({"src_nodata": nd, "nodata": nd} if nd is not None else {"add_alpha": True})
            with WarpedVRT(src, **kw) as vrt:
                # warped in fixed tiles of the target grid: GDAL's transformer is interpolated
                # over each piece it warps, so a pixel read by two blocks (or at two block
                # sizes) must come from the same piece to get the same value
                for tile, part in _tiles(Window(c0, r0, c1 - c0, r1 - r0), *target.shape):
                    got = vrt.read(bands, window=tile)
                    if nd is not None:
                        ok = np.all(got != np.asarray(nd).astype(got.dtype), axis=0)
                    else:
                        ok = vrt.read_masks(bands[0], window=tile) > 0
                    src_rows, src_cols = _within(part, tile)
                    rows, cols = _within(part, window)
                    data[:, rows, cols] = got[:, src_rows, src_cols]
                    valid[rows, cols] = ok[src_rows, src_cols]
        if data.dtype.kind == "f":
            valid &= np.all(np.isfinite(data), axis=0)
        return data.astype("float32", copy=False), valid


def standardize(
    data: np.ndarray,
    valid: np.ndarray,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    inplace: bool = False,
) -> np.ndarray:
    """Bands scaled to zero mean and unit deviation as float32; invalid pixels become 0 (the
    mean). Training and prediction both scale this way. ``inplace``: written over ``data``
    when it is float32 (a block's 40 MB not allocated and faulted in again), else a new array.
    One pass a band from the data as read: the copy to float32 made first, and the invalid
    pixels set band by band with a mask, took 5x as long."""
    own = inplace and data.dtype == np.float32 and data.flags.c_contiguous
    out = data if own else np.empty(data.shape, np.float32)
    invalid = None if valid.all() else np.flatnonzero(~valid)
    for band, src, m, s in zip(out, data, mean, std):
        np.subtract(src, np.float32(m), out=band, dtype=np.float32)
        band /= np.float32(s)
        if invalid is not None:
            band.reshape(-1)[invalid] = 0  # a view: ``out`` is C-contiguous
    return out


def check_same_grid(a: SceneProfile, b: SceneProfile, what: str, grid: str = "scene") -> None:
    """Raise unless ``b`` lies on ``a``'s pixel grid (same shape, transform and, in effect, CRS).

    CRSs that differ only in name or datum realisation (NAD83 versus NAD83(HARN)) are accepted
    when they place the scene's centre within a tenth of a pixel of each other.
    """
    if a.shape != b.shape or not a.transform.almost_equals(b.transform, precision=1e-6):
        raise _off_grid(a, b, what, grid)
    _check_same_crs(a, b, what, grid)


def grid_offset(
    a: SceneProfile, b: SceneProfile, what: str, grid: str = "scene"
) -> tuple[int, int]:
    """``(row, col)`` of ``a``'s first pixel in ``b``, where ``b`` shares ``a``'s pixels (the same
    size, orientation and edges, and in effect CRS) over any extent that overlaps it: a label
    raster of a larger area than the scene, cut to another extent, or the scene itself
    (``(0, 0)``). Raise a :class:`GridMismatchError` unless it does (as :func:`check_same_grid`)."""
    ta, tb = a.transform, b.transform
    same_pixels = all(
        np.isclose(x, y, rtol=1e-6, atol=1e-9 * max(abs(ta.a), abs(ta.e)))
        for x, y in ((ta.a, tb.a), (ta.b, tb.b), (ta.d, tb.d), (ta.e, tb.e))
    )
    col, row = ~tb * (ta.c, ta.f)
    r, c = round(row), round(col)
    if not same_pixels or abs(row - r) > 1e-3 or abs(col - c) > 1e-3:
        raise _off_grid(a, b, what, grid)
    _check_same_crs(a, b, what, grid)
    if r >= b.height or c >= b.width or r + a.height <= 0 or c + a.width <= 0:
        raise GridMismatchError(
            f"{what} {b.path!r} lie on the {grid}'s pixel grid but do not overlap the {grid} "
            f"{a.path!r}; pass {what} that cover it"
        )
    return r, c


def _off_grid(a: SceneProfile, b: SceneProfile, what: str, grid: str) -> GridMismatchError:
    return GridMismatchError(
        f"{what} {b.path!r} is not on the {grid}'s grid: it is {b.width}x{b.height} px with "
        f"transform {tuple(b.transform)[:6]}, the {grid} {a.width}x{a.height} px with "
        f"{tuple(a.transform)[:6]}; resample it onto the {grid}'s grid (gdalwarp -tr -te) "
        f"or pass vector {what}"
    )


def _check_same_crs(a: SceneProfile, b: SceneProfile, what: str, grid: str) -> None:
    if a.crs and b.crs and a.crs != b.crs and not crs_equivalent(a, b.crs):
        raise GridMismatchError(
            f"{what} {b.path!r} is in {b.crs.to_string()!r}, the {grid} in "
            f"{a.crs.to_string()!r}; reproject it onto the {grid}'s grid or pass vector {what}"
        )


def crs_equivalent(profile: SceneProfile, other: CRS) -> bool:
    from pyproj import Transformer

    x, y = profile.transform * (profile.width / 2, profile.height / 2)
    t = Transformer.from_crs(profile.crs, other, always_xy=True)
    x2, y2 = t.transform(x, y)
    return bool(np.hypot(x2 - x, y2 - y) < 0.1 * min(profile.res))


# -- class metadata ---------------------------------------------------------------------------


def write_class_metadata(dst: Any, classes: Sequence[ClassInfo]) -> None:
    """Embed the colour table and the class list in an open, writable class raster."""
    dst.write_colormap(1, {c.id: c.rgba() for c in classes})
    dst.update_tags(**{CLASSES_TAG: json.dumps([c.__dict__ for c in classes])})
    dst.set_band_description(1, "class")


def write_category_names(path: str | os.PathLike[str], classes: Sequence[ClassInfo]) -> Path:
    """Write the class names beside the class raster at ``path`` as GDAL reads them: category
    names and a thematic raster attribute table (value, class, colour) in ``PATH.aux.xml``,
    GDAL's own side-car (GeoTIFF has no place for them in the file), so that ``gdalinfo`` lists
    the categories and QGIS labels the classes. Written under a temporary name, then renamed."""
    from xml.sax.saxutils import escape

    by_id = {c.id: c for c in classes}
    names = "".join(
        f"<Category>{escape(by_id[i].name) if i in by_id else ''}</Category>"
        for i in range(max(by_id, default=-1) + 1)
    )
    # field types: 0 integer, 2 string; usages: 5 value, 2 name, 6-8 red, green, blue
    fields = [("Value", 0, 5), ("Class", 2, 2), ("Red", 0, 6), ("Green", 0, 7), ("Blue", 0, 8)]
    defs = "".join(
        f'<FieldDefn index="{k}"><Name>{n}</Name><Type>{t}</Type><Usage>{u}</Usage></FieldDefn>'
        for k, (n, t, u) in enumerate(fields)
    )
    rows = "".join(
        f'<Row index="{k}"><F>{c.id}</F><F>{escape(c.name)}</F>'
        + "".join(f"<F>{v}</F>" for v in c.rgba()[:3])
        + "</Row>"
        for k, c in enumerate(sorted(classes, key=lambda c: c.id))
    )
    xml = (
        '<PAMDataset><PAMRasterBand band="1"><Description>class</Description>'
        f"<CategoryNames>{names}</CategoryNames>"
        f'<GDALRasterAttributeTable tableType="thematic">{defs}{rows}</GDALRasterAttributeTable>'
        "</PAMRasterBand></PAMDataset>\n"
    )
    side = Path(f"{path}.aux.xml")
    tmp = side.with_name(f".{side.name}.tmp")
    tmp.write_text(xml, encoding="utf-8")
    os.replace(tmp, side)
    return side


def read_class_metadata(src: rasterio.DatasetReader) -> list[ClassInfo] | None:
    """The class list stored in a class raster by geoseg, or ``None`` if there is none."""
    raw = src.tags().get(CLASSES_TAG)
    if not raw:
        return None
    return [ClassInfo(int(c["id"]), str(c["name"]), str(c["color"])) for c in json.loads(raw)]


def check_class_map(profile: SceneProfile) -> list[ClassInfo] | None:
    """Refuse a raster that is no class map (several bands, or values that are not whole
    numbers); return its class metadata, if it has any."""
    if profile.count != 1 or not np.issubdtype(np.dtype(profile.dtype), np.integer):
        raise NotARasterError(
            f"class map {profile.path!r} has {profile.count} band(s) of {profile.dtype} values; "
            "expected a single-band integer class raster such as the output of 'geoseg "
            "predict' (is this the scene rather than its class map?)"
        )
    with rasterio.open(profile.path) as src:
        return read_class_metadata(src)


# -- vectors ----------------------------------------------------------------------------------


def read_vector(
    path: str | os.PathLike[str],
    what: str,
    crs: CRS | None = None,
    *,
    bounds: tuple[float, float, float, float] | None = None,
) -> Any:
    """Read a vector file into a GeoDataFrame, reprojected to ``crs`` when given.

    With ``bounds`` (left, bottom, right, top in ``crs``), only the features that reach that box
    are kept, chosen in the file's own CRS before reprojecting: a world layer projected whole
    into a local CRS gives garbage far from the projection's centre (countries of another
    continent that seem to cross the scene). The index keeps each feature's position in the
    file.
    """
    import geopandas as gpd

    p = check_input(path, what)
    try:
        gdf = gpd.read_file(p)
    except Exception as exc:  # pyogrio raises its own DataSourceError family
        raise NotAVectorError(
            f"{what} {p!r} is not a vector file GDAL can read ({exc}); expected GeoPackage, "
            "GeoJSON, Shapefile or another OGR format"
        ) from None
    return vector_near(gdf, crs, bounds)


def vector_near(
    gdf: Any, crs: CRS | None, bounds: tuple[float, float, float, float] | None = None
) -> Any:
    """``gdf`` in ``crs``, keeping only the features that reach ``bounds`` (in ``crs``), chosen
    in the layer's own CRS before reprojecting (see :func:`read_vector`)."""
    if bounds is not None and not gdf.empty:
        box = bounds
        if crs is not None and gdf.crs is not None and CRS.from_user_input(gdf.crs) != crs:
            from rasterio.warp import transform_bounds

            box = transform_bounds(crs, CRS.from_user_input(gdf.crs), *bounds, densify_pts=21)
        gdf = gdf.iloc[np.sort(gdf.sindex.query(shapely.box(*box)))]
    if crs is not None and gdf.crs is not None and not gdf.empty:
        gdf = gdf.to_crs(crs)
    return gdf


def is_vector_path(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names a vector file (by extension), as opposed to a raster."""
    return Path(str(path)).suffix.lower() in {
        ".gpkg",
        ".geojson",
        ".json",
        ".shp",
        ".fgb",
        ".parquet",
        ".gml",
        ".kml",
        ".sqlite",
    }


# -- atomic outputs ---------------------------------------------------------------------------

GEOSEG_TAG = "GEOSEG_PRODUCT"
"""GeoTIFF tag that marks a raster geoseg wrote (its value names the product)."""

# the tags by which a GeoTIFF shows that geoseg wrote it (the older ones first)
_GEOSEG_TIFF_TAGS = (CLASSES_TAG, "GEOSEG_SCALE", "GEOSEG_BUNDLE_HASH", GEOSEG_TAG)
# the attributes of every polygon file geoseg writes
POLYGON_FIELDS = ("class_id", "class_name", "area_m2", "perimeter_m")
SAMPLE_FIELDS = ("sample_id", "stratum", "stratum_name", "map_class", "map_class_name")
DESIGN_MARK = "geoseg:sample_design"
REPORT_MARK = "geoseg evaluation"
"""Words that every report geoseg writes holds (its title, or the JSON's ``miou_definition``)."""


def same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Whether two paths name one file (links and hard links included)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def written_by_geoseg(path: str | os.PathLike[str]) -> bool:
    """Whether the file at ``path`` is one geoseg writes: a class map or probabilities raster
    (geoseg's tags), a bundle or checkpoint, a training log, a polygon file with geoseg's
    attributes, or a report. Only such files are ever replaced, ``--overwrite`` or not."""
    p = Path(path)
    suffix = p.suffix.lower()
    try:
        if suffix in (".tif", ".tiff"):
            with rasterio.open(p) as src:
                return any(t in src.tags() for t in _GEOSEG_TIFF_TAGS)
        if suffix in (".bundle", ".checkpoint"):
            import torch

            raw = torch.load(p, map_location="cpu", weights_only=True)
            return isinstance(raw, dict) and ("format" in raw or "meta" in raw)
        if p.name.endswith(".log.jsonl"):
            with open(p, encoding="utf-8") as f:
                first = f.readline()
            return not first.strip() or "epoch" in json.loads(first)
        if suffix in (".json", ".csv", ".html", ".md"):
            with open(p, encoding="utf-8", errors="replace") as f:
                head = f.read(4096)
            return (
                REPORT_MARK in head
                or "miou_definition" in head
                or '"geoseg:product"' in head
                or f'"{DESIGN_MARK}"' in head
                or head.startswith("region,class_id,")
            )
        if is_vector_path(p):
            import pyogrio

            fields = set(pyogrio.read_info(p)["fields"])
            return set(POLYGON_FIELDS) <= fields or set(SAMPLE_FIELDS) <= fields
    except Exception:  # unreadable, or not what its name says: not geoseg's
        return False
    return False


def _nearest_folder(p: Path) -> Path:
    """The deepest ancestor of ``p`` that exists."""
    parent = p.parent if str(p.parent) else Path(".")
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    return parent


def check_output(
    path: str | os.PathLike[str],
    overwrite: bool,
    *,
    inputs: Sequence[str | os.PathLike[str] | None] = (),
    what: str = "output",
) -> Path:
    """Check, before any work, that ``path`` may be written; return it as a Path.

    Refused, each in one line: an output that is one of ``inputs`` (with or without
    ``overwrite``); a folder where a file is meant; an existing file unless ``overwrite``, and
    even then a file geoseg did not write (:func:`written_by_geoseg`); a path under a file, or
    in a folder that cannot be written. Missing folders are not made here (see
    :func:`atomic_output`), so a refused run leaves none behind.
    """
    p = Path(path)
    for given in inputs:
        if given is not None and not is_url(given) and same_file(p, given):
            raise OutputError(
                f"{what} {str(p)!r} is also an input ({str(given)!r}); geoseg never writes over "
                "its inputs: choose another -o"
            )
    if p.is_dir():
        raise OutputError(
            f"{what} {str(p)!r} is a folder; give a file name inside it, such as "
            f"{str(p / ('x' + (p.suffix or '.tif')))!r}"
        )
    if p.exists() or p.is_symlink():
        if not written_by_geoseg(p):
            raise OutputError(
                f"{what} {str(p)!r} exists and is not a file geoseg wrote; geoseg replaces only "
                "its own outputs: move that file or choose another -o"
            )
        if not overwrite:
            raise OutputExistsError(
                f"{what} {str(p)!r} exists; pass {option('--overwrite')} to replace it",
                filename=str(p),
            )
    check_writable(_nearest_folder(p), what, p)
    return p


def check_writable(folder: Path, what: str = "output", target: Path | None = None) -> None:
    """Raise unless ``folder`` is a folder in which files can be created (tried for real: a
    permission check alone says yes to root on a read-only file system)."""
    target = target or folder
    if not folder.is_dir():
        raise OutputError(
            f"{what} {str(target)!r} cannot be written: {str(folder)!r} is a file, not a folder; "
            "choose an output in a folder"
        )
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise OutputError(
            f"{what} {str(target)!r} cannot be written: no file can be created in "
            f"{str(folder)!r} ({exc.strerror or exc}); choose an output in a folder you can "
            "write to"
        ) from None


def make_parents(path: str | os.PathLike[str]) -> list[Path]:
    """Make the missing folders above ``path``; return them, deepest first, so that a failed
    run can remove them again (:func:`remove_empty`)."""
    made = []
    parent = Path(path).parent
    while str(parent) and not parent.exists():
        made.append(parent)
        parent = parent.parent
    for folder in reversed(made):
        folder.mkdir(exist_ok=True)
    return made


def remove_empty(folders: Sequence[Path]) -> None:
    """Remove those of ``folders`` (deepest first) that are empty."""
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


@contextlib.contextmanager
def folders_for(*paths: str | os.PathLike[str]) -> Iterator[None]:
    """Make the missing folders above ``paths`` for the block; if it fails, remove those of
    them that are still empty, so that a failed run leaves no empty folder behind."""
    made: list[Path] = []
    try:
        for path in paths:
            made += make_parents(path)
        yield
    except BaseException:
        remove_empty(made)
        raise


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    The temporary name keeps the extension, so drivers chosen by extension still work. On any
    error the temporary file is removed, ``path`` is left as it was, and folders made for it
    are removed again. ``path`` is checked with :func:`check_output` first.
    """
    final = check_output(path, overwrite)
    made = make_parents(final)
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{final.stem}.", suffix=f".tmp{final.suffix}", dir=final.parent
    )
    os.close(fd)
    os.unlink(tmp_name)
    tmp = Path(tmp_name)
    done = False
    try:
        yield tmp
        check_output(final, overwrite)  # nothing else took the name meanwhile
        os.replace(tmp, final)
        done = True
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
        # GDAL may leave side-car files next to the temporary name
        for side in tmp.parent.glob(tmp.name + ".*"):
            side.unlink(missing_ok=True)
        if not done:
            remove_empty(made)


@contextlib.contextmanager
def exclusive(lock: Path, what: str) -> Iterator[None]:
    """Hold an OS lock on the file ``lock`` (made if missing) for the duration of the block, or
    raise :class:`OutputLockedError` naming the process that holds it. The lock goes with the
    process, so a killed run leaves nothing to clean up by hand."""
    import fcntl
    import socket
    import time

    while True:
        lock.parent.mkdir(exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 512).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise OutputLockedError(
                f"{what} is being written by another geoseg run ({holder}); wait for it to "
                "finish, or stop it and run the command again (finished blocks are kept)"
            ) from None
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder removed the file as we opened it: lock the new one
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    os.ftruncate(fd, 0)
    os.write(fd, f"process {os.getpid()} on {socket.gethostname()}, since {started}".encode())
    try:
        yield
    finally:
        os.close(fd)
