"""Worker side of vectorizing: one block's polygons, in integer pixel coordinates of the whole
raster (so the edges two blocks share have identical coordinates), after sieving patches under
``min_area`` with a halo wide enough that every core pixel gets the whole raster's answer, and
simplified as one coverage. Also the areas and perimeters of polygons (planar or geodesic).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import rasterio
import shapely
from affine import Affine
from rasterio.crs import CRS
from rasterio.features import shapes
from rasterio.windows import Window

SIEVE_PASSES = 4  # rounds of merging small patches; a patch surrounded by small ones waits a round


MAX_SIEVE_HALO = 1024  # px; the exact halo (2 x passes x min pixels) is capped here (see sieve)


def _components(data: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """4-connected patches of one class: a label per pixel (0 for invalid) and each label's
    class (index 0 unused)."""
    from scipy import ndimage

    labels = np.zeros(data.shape, dtype=np.int64)
    classes = [0]
    for value in np.unique(data[valid]):
        lab, n = ndimage.label((data == value) & valid)  # the default structure is 4-connected
        hit = lab > 0
        labels[hit] = lab[hit] + (len(classes) - 1)
        classes.extend([int(value)] * n)
    return labels, np.asarray(classes, dtype=np.int64)


def sieve(
    data: np.ndarray,
    valid: np.ndarray,
    min_pixels: int,
    *,
    open_edges: tuple[bool, bool, bool, bool] = (False, False, False, False),
    passes: int = SIEVE_PASSES,
) -> np.ndarray:
    """Merge patches of fewer than ``min_pixels`` pixels into a neighbouring patch.

    In each pass, every small patch with at least one neighbour that is not small takes the class
    of the one with which it shares the most pixel edges (ties: the lower class id); all small
    patches are decided on the same labelling, so the result does not depend on any order.
    Patches whose neighbours are all small wait for the next pass; a patch bordered only by
    nodata is kept. ``open_edges`` (top, bottom, left, right) marks sides where ``data`` is cut
    out of a larger raster: a patch touching one is never taken as small, since it may go on.

    Why a block gives the whole raster's answer: a patch of fewer than ``n`` pixels spans fewer
    than ``n`` px, so for a pixel of the core one pass looks at most ``2n`` px away (the patch and
    its neighbours' smallness), and a halo of ``2 n passes`` px makes every pass exact there. The
    halo is capped at :data:`MAX_SIEVE_HALO`; beyond it only long, thin patches could differ.
    """
    out = data.copy()
    for _ in range(passes):
        labels, cls = _components(out, valid)
        n = len(cls)
        sizes = np.bincount(labels.ravel(), minlength=n)
        small = sizes < min_pixels
        small[0] = False
        edges = (labels[0], labels[-1], labels[:, 0], labels[:, -1])
        for is_open, line in zip(open_edges, edges):
            if is_open:
                small[line] = False
        if not small.any():
            break
        a = np.concatenate([labels[:, :-1].ravel(), labels[:-1, :].ravel()])
        b = np.concatenate([labels[:, 1:].ravel(), labels[1:, :].ravel()])
        keep = (a != b) & (a > 0) & (b > 0)
        src = np.concatenate([a[keep], b[keep]])
        dst = np.concatenate([b[keep], a[keep]])
        take = small[src] & ~small[dst]
        pair, shared = np.unique(src[take] * n + dst[take], return_counts=True)
        if not len(pair):
            break
        s, d = pair // n, pair % n
        order = np.lexsort((cls[d], -shared, s))  # per small patch: most shared edges first
        s, d = s[order], d[order]
        first = np.r_[True, s[1:] != s[:-1]]
        new = cls.copy()
        new[s[first]] = cls[d[first]]
        out = np.where(labels > 0, new[labels], out).astype(data.dtype)
    return out


@dataclass
class BlockPolygons:
    """Polygons of one block in pixel coordinates (WKB) with their class ids, split by whether
    they touch an inner block edge (and so may continue in a neighbour)."""

    interior: list[bytes]
    interior_values: np.ndarray
    edge: list[bytes]
    edge_values: np.ndarray


def polygonize_block(
    core: Window,
    path: str,
    nodata: int,
    keep: tuple[int, ...] | None,
    min_pixels: int = 0,
    simplify_px: float = 0.0,
) -> BlockPolygons:
    """Sieve, polygonize and simplify one block (a Dask task)."""
    halo = min(2 * min_pixels * SIEVE_PASSES, MAX_SIEVE_HALO) if min_pixels > 1 else 0
    with rasterio.open(path) as src:
        height, width = src.height, src.width
        r0, c0 = int(core.row_off), int(core.col_off)
        h, w = int(core.height), int(core.width)
        top, left = max(0, r0 - halo), max(0, c0 - halo)
        bottom, right = min(height, r0 + h + halo), min(width, c0 + w + halo)
        data = src.read(1, window=Window(left, top, right - left, bottom - top))
    valid = data != nodata
    if halo:
        opened = (top > 0, bottom < height, left > 0, right < width)
        data = sieve(data, valid, min_pixels, open_edges=opened)
    data = data[r0 - top : r0 - top + h, c0 - left : c0 - left + w]
    valid = valid[r0 - top : r0 - top + h, c0 - left : c0 - left + w]
    found = [
        (shapely.Polygon(g["coordinates"][0], g["coordinates"][1:]), int(v))
        for g, v in shapes(data, mask=valid, connectivity=4, transform=Affine.translation(c0, r0))
    ]
    geoms = np.array([g for g, _ in found], dtype=object)
    values = np.array([v for _, v in found], dtype=np.int64)
    if simplify_px > 0 and len(geoms):
        # shared edges must have the same vertices: put one on every pixel corner first
        geoms = shapely.coverage_simplify(
            shapely.segmentize(geoms, 1.0), simplify_px, simplify_boundary=False
        )
    if keep is not None:
        mine = np.isin(values, keep)
        geoms, values = geoms[mine], values[mine]
    if not len(geoms):
        return BlockPolygons([], values, [], values)
    # pixel polygons reach an edge of their block along a whole pixel side, so their bounds
    # tell whether they touch it; the block's outline is never simplified
    b = shapely.bounds(geoms)
    edge = np.zeros(len(geoms), dtype=bool)
    if c0 > 0:
        edge |= b[:, 0] <= c0
    if r0 > 0:
        edge |= b[:, 1] <= r0
    if c0 + w < width:
        edge |= b[:, 2] >= c0 + w
    if r0 + h < height:
        edge |= b[:, 3] >= r0 + h
    wkb = shapely.to_wkb(geoms)
    return BlockPolygons(list(wkb[~edge]), values[~edge], list(wkb[edge]), values[edge])


def areas(geoms: np.ndarray, crs: CRS | None, step: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Area (m²) and perimeter (m) of each polygon, geodesic in a geographic CRS.

    Geodesic edges between far vertices bulge away from the parallels that bound pixels, so in a
    geographic CRS edges are first cut into pieces of at most ``step`` degrees (a pixel)."""
    if crs is not None and crs.is_geographic:
        from pyproj import CRS as ProjCRS
        from pyproj import Geod

        geod = ProjCRS.from_user_input(crs.to_wkt()).get_geod() or Geod(ellps="WGS84")
        if step > 0:
            geoms = shapely.segmentize(geoms, step)
        ap = [geod.geometry_area_perimeter(g) for g in geoms]
        return np.abs([a for a, _ in ap]), np.array([p for _, p in ap])
    factor = crs.linear_units_factor[1] if crs is not None and crs.is_projected else 1.0
    return shapely.area(geoms) * factor**2, shapely.length(geoms) * factor


def pixel_area_m2(transform: Affine, crs: CRS | None, height: int, width: int) -> float:
    """Area of one pixel in m² (of the centre pixel, in a geographic CRS)."""
    if crs is not None and crs.is_geographic:
        r, c = height // 2, width // 2
        corners = [transform * (c + dc, r + dr) for dc, dr in ((0, 0), (1, 0), (1, 1), (0, 1))]
        return float(areas(np.array([shapely.Polygon(corners)], dtype=object), crs)[0][0])
    factor = crs.linear_units_factor[1] if crs is not None and crs.is_projected else 1.0
    return abs(transform.determinant) * factor**2
