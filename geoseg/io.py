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
from rasterio.crs import CRS
from rasterio.enums import MaskFlags
from rasterio.errors import RasterioIOError
from rasterio.windows import Window

from geoseg.errors import (
    GridMismatchError,
    InputNotFoundError,
    NotARasterError,
    NotAVectorError,
    OutputExistsError,
)

NODATA_CLASS = 255
"""Value of nodata pixels in every class map geoseg writes."""

CLASSES_TAG = "GEOSEG_CLASSES"
"""GeoTIFF tag holding the class list (JSON: id, name, colour) of a class raster."""

_GDAL_URL_PREFIXES = ("/vsi", "http://", "https://", "s3://", "gs://")


@dataclass(frozen=True)
class ClassInfo:
    """One class: the user's code, a name and a colour (``#rrggbb``)."""

    id: int
    name: str
    color: str

    def rgba(self) -> tuple[int, int, int, int]:
        h = self.color.lstrip("#")
        return (int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16), 255)


@dataclass(frozen=True)
class SceneProfile:
    """What geoseg needs to know about a scene before reading pixels."""

    path: str
    crs: CRS | None
    transform: Affine
    width: int
    height: int
    count: int
    dtype: str
    nodata: float | None
    descriptions: tuple[str | None, ...]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.height, self.width)

    @property
    def res(self) -> tuple[float, float]:
        return (abs(self.transform.a), abs(self.transform.e))


def raster_bounds(profile: SceneProfile) -> tuple[float, float, float, float]:
    """(left, bottom, right, top) of a scene in its CRS."""
    from rasterio.windows import bounds

    return bounds(Window(0, 0, profile.width, profile.height), profile.transform)


def is_url(path: str | os.PathLike[str]) -> bool:
    return str(path).startswith(_GDAL_URL_PREFIXES)


def check_input(path: str | os.PathLike[str], what: str = "input") -> str:
    """Return ``path`` as a string, raising a clear error if a local file is missing."""
    p = str(path)
    if not is_url(p) and not Path(p).exists():
        raise InputNotFoundError(f"{what} {p!r} does not exist; check the path")
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
    r0, c0 = int(window.row_off), int(window.col_off)
    h, w = int(window.height), int(window.width)
    inside = window_inside(src, window)
    # boundless reads go through a VRT and cost several times more: only where needed
    # no fill_value: rasterio would write it over the nodata pixels too, hiding them
    data = src.read(indexes, window=window, boundless=not inside)
    flags = [src.mask_flag_enums[i - 1] for i in indexes]
    if nodata is not None:
        valid = np.all(data != np.asarray(nodata).astype(data.dtype), axis=0)
    elif all(MaskFlags.all_valid in f for f in flags):
        valid = np.ones((h, w), dtype=bool)
    elif all(MaskFlags.nodata in f for f in flags):
        fills = np.asarray([src.nodatavals[i - 1] for i in indexes], dtype=data.dtype)
        valid = np.all(data != fills[:, None, None], axis=0)
    else:  # internal masks or alpha bands
        valid = np.all(src.read_masks(indexes, window=window, boundless=not inside) > 0, axis=0)
    if not inside:
        valid[: max(0, -r0)] = False
        valid[:, : max(0, -c0)] = False
        valid[max(0, src.height - r0) :] = False
        valid[:, max(0, src.width - c0) :] = False
    if data.dtype.kind == "f":
        valid &= np.all(np.isfinite(data), axis=0)
    return data.astype("float32", copy=False), valid


def standardize(
    data: np.ndarray, valid: np.ndarray, mean: Sequence[float], std: Sequence[float]
) -> np.ndarray:
    """Bands scaled to zero mean and unit deviation as float32, band by band in place of a copy;
    invalid pixels become 0 (the mean). Training and prediction both scale this way."""
    out = data.astype(np.float32, copy=True)
    invalid = ~valid
    for band, m, s in zip(out, mean, std):
        band -= np.float32(m)
        band /= np.float32(s)
        np.copyto(band, 0, where=invalid)
    return out


def check_same_grid(a: SceneProfile, b: SceneProfile, what: str) -> None:
    """Raise unless ``b`` lies on ``a``'s pixel grid (same shape, transform and, in effect, CRS).

    CRSs that differ only in name or datum realisation (NAD83 versus NAD83(HARN)) are accepted
    when they place the scene's centre within a tenth of a pixel of each other.
    """
    if a.shape != b.shape or not a.transform.almost_equals(b.transform, precision=1e-6):
        raise GridMismatchError(
            f"{what} {b.path!r} is not on the scene's grid: it is {b.width}x{b.height} px with "
            f"transform {tuple(b.transform)[:6]}, the scene {a.width}x{a.height} px with "
            f"{tuple(a.transform)[:6]}; resample it onto the scene's grid (gdalwarp -tr -te) "
            "or pass vector labels"
        )
    if a.crs and b.crs and a.crs != b.crs and not _crs_equivalent(a, b.crs):
        raise GridMismatchError(
            f"{what} {b.path!r} is in {b.crs.to_string()!r}, the scene in {a.crs.to_string()!r}; "
            "reproject it onto the scene's grid or pass vector labels"
        )


def _crs_equivalent(profile: SceneProfile, other: CRS) -> bool:
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


def read_class_metadata(src: rasterio.DatasetReader) -> list[ClassInfo] | None:
    """The class list stored in a class raster by geoseg, or ``None`` if there is none."""
    raw = src.tags().get(CLASSES_TAG)
    if not raw:
        return None
    return [ClassInfo(int(c["id"]), str(c["name"]), str(c["color"])) for c in json.loads(raw)]


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


def check_output(path: str | os.PathLike[str], overwrite: bool) -> Path:
    """Refuse an existing output unless ``overwrite``; make sure its folder exists."""
    p = Path(path)
    if p.exists() and not overwrite:
        raise OutputExistsError(f"output {str(p)!r} exists; pass --overwrite to replace it")
    if p.parent and not p.parent.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
    return p


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    The temporary name keeps the extension, so drivers chosen by extension still work. On any
    error the temporary file (or folder) is removed and ``path`` is left as it was.
    """
    final = check_output(path, overwrite)
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{final.stem}.", suffix=f".tmp{final.suffix}", dir=final.parent
    )
    os.close(fd)
    os.unlink(tmp_name)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if final.is_dir():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
        # GDAL may leave side-car files next to the temporary name
        for side in tmp.parent.glob(tmp.name + ".*"):
            side.unlink(missing_ok=True)
