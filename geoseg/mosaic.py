"""The grid of a map made from many scenes, and where each scene falls on it.

A mosaic's grid is chosen once, on the client: its CRS (default the first scene's), its pixel
size (default the finest of the scenes in that CRS) and its extent (the union of the scenes,
or an area, or bounds), aligned to the first scene's pixel grid when they share CRS and pixel
size. Every block of that grid then reads, warps and predicts only the scenes that fall on it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from affine import Affine
from rasterio.coords import BoundingBox
from rasterio.crs import CRS
from rasterio.errors import CRSError
from rasterio.windows import Window

from geoseg.errors import ConfigError, NoCRSError, option
from geoseg.io import Grid, SceneProfile, raster_bounds, read_vector

_EPS = 1e-6


def parse_bounds(text: str | Sequence[float] | BoundingBox | None) -> BoundingBox | None:
    """``W,S,E,N`` (or four numbers) as a BoundingBox, checked."""
    if text is None:
        return None
    try:
        values = [float(v) for v in (text.split(",") if isinstance(text, str) else text)]
    except ValueError:
        values = []
    if len(values) != 4 or not (values[0] < values[2] and values[1] < values[3]):
        raise ConfigError(
            f"{option('--bounds', None)} {text!r}: expected W,S,E,N with W < E and S < N, in the "
            "output CRS, such as 717345,-2832795,778575,-2766615"
        )
    return BoundingBox(*values)


def parse_crs(text: str | CRS | None) -> CRS | None:
    if text is None or isinstance(text, CRS):
        return text
    try:
        return CRS.from_user_input(text)
    except CRSError:
        raise ConfigError(
            f"{option('--crs', None)} {text!r} is not a CRS; expected EPSG:32621, a WKT or a "
            "PROJ string"
        ) from None


def parse_resolution(value: float | Sequence[float] | str | None) -> tuple[float, float] | None:
    if value is None:
        return None
    try:
        parts = [float(v) for v in (value.split(",") if isinstance(value, str) else
                                    (value if isinstance(value, Sequence) else [value]))]  # fmt: skip
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or not all(p > 0 and math.isfinite(p) for p in parts):
        raise ConfigError(
            f"{option('--resolution', None)} {value}: expected a pixel size greater than 0 in "
            "the output CRS's units (30, or 30,30 for x,y)"
        )
    return parts[0], parts[1]


def scene_bounds(profile: SceneProfile, crs: CRS) -> BoundingBox:
    """A scene's bounds in ``crs`` (its edges densified, so a reprojected edge is covered)."""
    from rasterio.warp import transform_bounds

    b = raster_bounds(profile)
    if profile.crs == crs:
        return b
    return BoundingBox(*transform_bounds(profile.crs, crs, *b, densify_pts=51))


def area_geometry(within: str | None, bounds: BoundingBox | None, crs: CRS) -> Any:
    """The area to map, in ``crs``: the union of ``within``'s features, or ``bounds``."""
    import shapely

    if within is not None:
        gdf = read_vector(within, "area", crs)
        if gdf.empty:
            raise ConfigError(f"area {within!r} has no features; expected polygons to map")
        return shapely.union_all(gdf.geometry.values)
    if bounds is not None:
        return shapely.box(*bounds)
    return None


def mosaic_grid(
    profiles: Sequence[SceneProfile],
    *,
    crs: CRS | None,
    resolution: tuple[float, float] | None,
    extent: BoundingBox | None,
) -> Grid:
    """The output grid over ``extent`` (default: the union of the scenes)."""
    for p in profiles:
        if p.crs is None:
            raise NoCRSError(
                f"scene {p.name!r} has no CRS, so it cannot be placed in a mosaic; assign one "
                "(gdal_edit.py -a_srs)",
                filename=p.path,
            )
    first = profiles[0]
    out_crs = crs or first.crs
    assert out_crs is not None
    if resolution is None:
        same = [p.res for p in profiles if p.crs == out_crs]
        if same:
            resolution = min(same, key=lambda r: r[0] * r[1])
        else:
            from rasterio.warp import calculate_default_transform

            t, _, _ = calculate_default_transform(
                first.crs, out_crs, first.width, first.height, *raster_bounds(first)
            )
            resolution = (abs(t.a), abs(t.e))
    rx, ry = resolution
    if extent is None:
        boxes = [scene_bounds(p, out_crs) for p in profiles]
        extent = BoundingBox(
            min(b.left for b in boxes),
            min(b.bottom for b in boxes),
            max(b.right for b in boxes),
            max(b.top for b in boxes),
        )
    ax, ay = 0.0, 0.0  # the pixel corners lie on multiples of the resolution...
    if first.crs == out_crs and abs(first.res[0] - rx) < _EPS * rx:
        ax, ay = first.transform.c, first.transform.f  # ...or on the first scene's
    col0 = math.floor((extent.left - ax) / rx + _EPS)
    col1 = math.ceil((extent.right - ax) / rx - _EPS)
    row0 = math.floor((ay - extent.top) / ry + _EPS)
    row1 = math.ceil((ay - extent.bottom) / ry - _EPS)
    return Grid(out_crs, Affine(rx, 0, ax + col0 * rx, 0, -ry, ay - row0 * ry),
                col1 - col0, row1 - row0)  # fmt: skip


def footprint(profile: SceneProfile, grid: Grid) -> Window | None:
    """The pixels of ``grid`` a scene may cover (its bounds, a pixel more each side), or None."""
    assert grid.crs is not None
    b = scene_bounds(profile, grid.crs)
    inv = ~grid.transform
    c0, r0 = inv * (b.left, b.top)
    c1, r1 = inv * (b.right, b.bottom)
    col0, row0 = max(0, math.floor(min(c0, c1)) - 1), max(0, math.floor(min(r0, r1)) - 1)
    col1 = min(grid.width, math.ceil(max(c0, c1)) + 1)
    row1 = min(grid.height, math.ceil(max(r0, r1)) + 1)
    if col1 <= col0 or row1 <= row0:
        return None
    return Window(col0, row0, col1 - col0, row1 - row0)
