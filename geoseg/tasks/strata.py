"""Worker side of sampling and of estimates from samples: one block's strata, counted and
measured, and one block's share of a stratified random sample, drawn.

A pixel's stratum is a code (:class:`StrataSpec`): its map class, the value of another raster
on the class map's grid, or its map class crossed with the first region that holds it. Each
block tallies the pixels and the area (m², per row in a geographic CRS) of every stratum and of
every map class, over the whole map and per region; the driver adds the blocks up.

Drawing a sample, the pixels of a stratum are numbered in one fixed order (tile by tile, tiles
of ``TILE`` px in row-major order, row-major inside a tile), the driver draws each stratum's
ranks uniformly without replacement from one random stream per stratum, and each block finds
the pixels of the ranks that fall in its tiles. The sample depends on the seed alone: not on
the block size (a multiple of ``TILE``) or the workers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.windows import Window

from geoseg.classes import NODATA
from geoseg.io import read_profile
from geoseg.labels import area_mask
from geoseg.tasks.evaluate import region_masks

CROSS = 1 << 16  # stratum code of class c in region slot s (0: no region): (s + 1) * CROSS + c
TILE = 64  # px: the unit of the sample's fixed pixel order


@dataclass(frozen=True)
class StrataSpec:
    """How a pixel's stratum is found: ``kind`` ``"classes"`` (its map class), ``"raster"``
    (the value of the raster ``path``, on the class map's grid) or ``"classes x regions"`` (its
    class in the first of the regions of ``path`` at ``positions`` that holds it)."""

    kind: str = "classes"
    path: str | None = None
    positions: tuple[int, ...] = ()


def pixel_areas(transform: Affine, crs: CRS | None, row_off: int, height: int) -> np.ndarray:
    """The area (m²) of a pixel in each of ``height`` rows from ``row_off``: one figure in a
    projected CRS, geodesic per row in a geographic one (a north-up grid's pixels in one row
    have one area)."""
    if crs is not None and crs.is_geographic:
        from pyproj import CRS as ProjCRS
        from pyproj import Geod

        geod = ProjCRS.from_user_input(crs.to_wkt()).get_geod() or Geod(ellps="WGS84")
        rows = np.arange(row_off, row_off + height, dtype=np.float64)
        out = np.empty(height)
        for i, r in enumerate(rows):
            xs, ys = zip(
                *(transform * (c, rr) for c, rr in ((0, r), (1, r), (1, r + 1), (0, r + 1)))
            )
            out[i] = abs(geod.polygon_area_perimeter(xs, ys)[0])
        return out
    factor = crs.linear_units_factor[1] if crs is not None and crs.is_projected else 1.0
    return np.full(height, abs(transform.determinant) * factor**2)


def stratum_codes(
    spec: StrataSpec, window: Window, profile: Any, pred: np.ndarray, valid: np.ndarray
) -> np.ndarray:
    """Each pixel's stratum code in ``window``; -1 where the map is not ``valid`` or the strata
    raster has no value."""
    if spec.kind == "classes":
        codes = pred.copy()
    elif spec.kind == "raster":
        assert spec.path is not None
        with rasterio.open(spec.path) as src:
            masked = src.read(1, window=window, masked=True)
        codes = np.where(np.ma.getmaskarray(masked), -1, masked.filled(0)).astype(np.int64)
    else:
        slot = np.zeros(pred.shape, dtype=np.int64)
        masks = region_masks(spec.path, window, profile, spec.positions)
        for i in range(len(masks) - 1, -1, -1):  # the first region that holds a pixel wins
            slot[masks[i]] = i + 1
        codes = slot * CROSS + pred
    return np.where(valid, codes, -1)


@dataclass
class BlockTally:
    """One block's pixel counts and areas (m²): ``strata[r]`` and ``classes[r]`` map a code to
    ``[pixels, m²]``, ``r`` 0 for the whole map and ``i + 1`` for the ``i``-th report region."""

    strata: list[dict[int, list[float]]]
    classes: list[dict[int, list[float]]]
    # with tiles: the block's tiles (index in the map's row-major tile order) and each
    # stratum's pixels in each of them (not added up)
    tile_index: np.ndarray | None = None
    tile_counts: dict[int, np.ndarray] | None = None

    def __add__(self, other: BlockTally) -> BlockTally:
        def add(a: list[dict[int, list[float]]], b: list[dict[int, list[float]]]) -> list[Any]:
            out = []
            for x, y in zip(a, b):
                z = {k: list(v) for k, v in x.items()}
                for k, (px, m2) in y.items():
                    cur = z.setdefault(k, [0, 0.0])
                    cur[0] += px
                    cur[1] += m2
                out.append(z)
            return out

        return BlockTally(add(self.strata, other.strata), add(self.classes, other.classes))


def _compact(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct codes (>= 0) of ``codes`` and each pixel's index among them (-1 for none),
    by a lookup table: far faster than sorting a block's pixels."""
    top = int(codes.max(initial=-1))
    if top < 0:
        return np.zeros(0, np.int64), np.full(codes.shape, -1, np.int64)
    seen = np.zeros(top + 1, bool)
    seen[codes[codes >= 0]] = True
    values = np.flatnonzero(seen)
    lut = np.full(top + 1, -1, np.int64)
    lut[values] = np.arange(len(values))
    return values, np.where(codes >= 0, lut[np.maximum(codes, 0)], -1)


def _tally(codes: np.ndarray, row_area: np.ndarray, where: np.ndarray) -> dict[int, list[float]]:
    values, index = _compact(np.where(where, codes, -1))
    if len(values) == 0:
        return {}
    k = len(values)
    if np.all(row_area == row_area[0]):  # a projected CRS: one pixel area
        px = np.bincount(index[index >= 0], minlength=k)
        m2 = px * float(row_area[0])
    else:  # per row: count each row's codes, weigh by its pixel area
        rows = np.broadcast_to(np.arange(len(row_area))[:, None], codes.shape)
        ok = index >= 0
        per_row = np.bincount(rows[ok] * k + index[ok], minlength=len(row_area) * k)
        per_row = per_row.reshape(len(row_area), k)
        px = per_row.sum(0)
        m2 = (per_row * row_area[:, None]).sum(0)
    return {int(v): [int(p), float(a)] for v, p, a in zip(values, px, m2) if p}


def _read_map(
    window: Window, class_map: str, within: str | None
) -> tuple[Any, np.ndarray, np.ndarray]:
    profile = read_profile(class_map, "class map")
    with rasterio.open(class_map) as src:
        pred = src.read(1, window=window).astype(np.int64)
        nodata = src.nodata if src.nodata is not None else NODATA
    valid = (pred != nodata) & area_mask(within, window, profile)
    return profile, pred, valid


def _tiles(window: Window, width: int) -> list[tuple[int, slice, slice]]:
    """The ``TILE`` px tiles of a block whose edges lie on the tile grid: each one's index in
    the map's row-major tile order, and its rows and columns in the block."""
    ntx = -(-width // TILE)
    r0, c0 = int(window.row_off), int(window.col_off)
    h, w = int(window.height), int(window.width)
    return [
        ((r0 + y) // TILE * ntx + (c0 + x) // TILE, slice(y, y + TILE), slice(x, x + TILE))
        for y in range(0, h, TILE)
        for x in range(0, w, TILE)
    ]


def block_tally(
    window: Window,
    class_map: str,
    strata: StrataSpec,
    regions: str | None,
    positions: tuple[int, ...],
    within: str | None,
    tiles: bool = False,
) -> BlockTally:
    """Count and measure one block's strata and map classes (a Dask task); with ``tiles``,
    each stratum's pixels per tile as well."""
    profile, pred, valid = _read_map(window, class_map, within)
    codes = stratum_codes(strata, window, profile, pred, valid)
    row_area = pixel_areas(profile.transform, profile.crs, int(window.row_off), int(window.height))
    counted = codes >= 0
    same = strata.kind == "classes"  # the strata are the map classes: one tally for both
    out_s, out_c = [_tally(codes, row_area, counted)], []
    out_c.append(out_s[0] if same else _tally(pred, row_area, valid))
    for m in region_masks(regions, window, profile, positions):
        out_s.append(_tally(codes, row_area, counted & m))
        out_c.append(out_s[-1] if same else _tally(pred, row_area, valid & m))
    if not tiles:
        return BlockTally(out_s, out_c)
    grid = _tiles(window, profile.width)
    values, index = _compact(codes)
    h, w = codes.shape
    tiles_x = -(-w // TILE)
    tile = (np.arange(h)[:, None] // TILE) * tiles_x + np.arange(w)[None, :] // TILE
    ok = index >= 0
    k = max(len(values), 1)
    counts = np.bincount(tile[ok] * k + index[ok], minlength=len(grid) * k).reshape(len(grid), k)
    per_tile = {int(v): counts[:, i].astype(np.int64) for i, v in enumerate(values)}
    return BlockTally(out_s, out_c, np.array([t for t, _, _ in grid], np.int64), per_tile)


def block_draw(
    window: Window,
    class_map: str,
    strata: StrataSpec,
    within: str | None,
    picks: dict[int, list[tuple[int, int]]],
) -> list[tuple[int, int, int, int]]:
    """The sample's pixels in one block (a Dask task): ``picks[code]`` lists ``(tile, k)``,
    the ``k``-th pixel (row-major) of that stratum in that tile; only the tiles picked are
    read. Returns ``(row, col, stratum, map class)`` of each, rows and columns of the whole
    map."""
    profile = read_profile(class_map, "class map")
    tiles_x = -(-profile.width // TILE)
    by_tile: dict[int, list[tuple[int, int]]] = {}
    for code, wanted in picks.items():
        for tile, k in wanted:
            by_tile.setdefault(tile, []).append((code, k))
    out: list[tuple[int, int, int, int]] = []
    for tile in sorted(by_tile):
        ty, tx = divmod(tile, tiles_x)
        r0, c0 = ty * TILE, tx * TILE
        part = Window(c0, r0, min(TILE, profile.width - c0), min(TILE, profile.height - r0))
        _, pred, valid = _read_map(part, class_map, within)
        codes = stratum_codes(strata, part, profile, pred, valid)
        for code, k in sorted(by_tile[tile]):
            hits = np.argwhere(codes == code)
            if k >= len(hits):  # the tally counted these pixels: the map changed meanwhile
                raise RuntimeError(
                    f"class map {class_map!r} changed while it was sampled: tile {tile} holds "
                    f"{len(hits)} pixels of stratum {code}, not {k + 1} or more"
                )
            r, c = int(hits[k][0]), int(hits[k][1])
            out.append((r0 + r, c0 + c, code, int(pred[r, c])))
    return out
