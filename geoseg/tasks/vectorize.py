"""Worker side of vectorizing: one block's polygons, in integer pixel coordinates of the whole
raster (so the edges two blocks share have identical coordinates), after sieving patches under
``min_area`` with a halo wide enough that every core pixel gets the whole raster's answer, and
simplified as one coverage. Also the areas and perimeters of polygons (planar or geodesic).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

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


def _shapes(
    data: np.ndarray, valid: np.ndarray, transform: Affine
) -> tuple[np.ndarray, np.ndarray]:
    """GDAL's polygons of ``data`` (4-connected) and their values, built in one call from the
    rings' coordinates (4.5x faster than one ``shapely.Polygon`` each)."""
    found = list(shapes(data, mask=valid, connectivity=4, transform=transform))
    if not found:
        return np.empty(0, dtype=object), np.empty(0, dtype=np.int64)
    rings = [r for g, _ in found for r in g["coordinates"]]
    ring_offsets = np.r_[0, np.cumsum([len(r) for r in rings])]
    geom_offsets = np.r_[0, np.cumsum([len(g["coordinates"]) for g, _ in found])]
    coords = np.array([xy for r in rings for xy in r], dtype=np.float64)
    geoms = shapely.from_ragged_array(
        shapely.GeometryType.POLYGON, coords, (ring_offsets, geom_offsets)
    )
    return geoms, np.array([int(v) for _, v in found], dtype=np.int64)


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
    geoms, values = _shapes(data, valid, Affine.translation(c0, r0))
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


# -- merging polygons cut by block edges ------------------------------------------------------


def _left_turn(a: np.ndarray, b: np.ndarray) -> int:
    """How far left the turn from direction ``a`` to ``b`` is: 2 left, 1 straight, 0 right."""
    c = a[0] * b[1] - a[1] * b[0]
    return 2 if c > 0 else (1 if c == 0 else 0)


def _without_straight_vertices(ring: np.ndarray) -> np.ndarray:
    """A ring (open: the first vertex not repeated) without the vertices that lie on a straight
    line between their neighbours: where two pieces' edges were joined."""
    before, after = np.roll(ring, 1, axis=0), np.roll(ring, -1, axis=0)
    straight = ((before[:, 0] == ring[:, 0]) & (ring[:, 0] == after[:, 0])) | (
        (before[:, 1] == ring[:, 1]) & (ring[:, 1] == after[:, 1])
    )
    return ring[~straight]


def _simple_rings(ring: np.ndarray) -> list[np.ndarray]:
    """An open ring that passes one vertex twice, as the rings between the visits (a shell and
    the hole that touches it there), so that every ring is simple, as GEOS wants."""
    key = ring[:, 0] * (1 << 32) + ring[:, 1]
    ordered = np.sort(key)
    if not (ordered[1:] == ordered[:-1]).any():
        return [ring]
    twice = np.flatnonzero(np.isin(key, ordered[1:][ordered[1:] == ordered[:-1]]))
    j = int(twice[0])
    i = int(twice[key[twice] == key[j]][1])
    return _simple_rings(ring[j:i]) + _simple_rings(np.concatenate([ring[:j], ring[i:]]))


def _polygons(shells: list[np.ndarray], holes: list[list[np.ndarray]]) -> np.ndarray:
    """Polygons from open rings, built in one call."""
    rings = [np.concatenate([r, r[:1]]) for sh, hs in zip(shells, holes) for r in (sh, *hs)]
    if not rings:
        return np.empty(0, dtype=object)
    ring_offsets = np.r_[0, np.cumsum([len(r) for r in rings])]
    geom_offsets = np.r_[0, np.cumsum([1 + len(hs) for hs in holes])]
    coords = np.concatenate(rings).astype(np.float64)
    return shapely.from_ragged_array(
        shapely.GeometryType.POLYGON, coords, (ring_offsets, geom_offsets)
    )


def merge_pieces(
    pieces: Sequence[Any],
    group: np.ndarray,
    seam_rows: Sequence[int],
    seam_cols: Sequence[int],
) -> tuple[np.ndarray, np.ndarray]:
    """The union of each group of pixel polygons cut apart by block edges, by their linework.

    ``pieces`` are polygons in pixel coordinates, each from one block, as polygonizing the block
    gives them (not simplified: every vertex on a pixel corner); ``group[i]`` says which union
    piece ``i`` belongs to (pieces of one class that meet). Block edges run along the rows
    ``seam_rows`` and columns ``seam_cols``. Returns the polygons and the group of each: a group
    whose pieces meet only at a corner comes apart into its 4-connected parts, as polygonizing
    the whole raster would give.

    Pixel polygons are made of horizontal and vertical edges between pixel corners, and two
    pieces of one group meet only along a block edge. So their union needs no geometry engine:
    with every ring turned so that the polygon lies to its left, the edges along a block edge
    cancel where two pieces face each other (their directions sum to zero along the line); the
    edges that are left join end to start into the union's rings, taking the leftmost turn where
    two could follow (pixels that touch only at a corner stay apart). A ring turning
    counter-clockwise is a shell; a hole goes to the smallest shell of its group around it.
    On the 2,153 groups of a 16384² map this took 2.7 s against 14.3 s for
    ``shapely.union_all`` (GEOS nodes every edge again), with the same polygons.
    """
    oriented = shapely.orient_polygons(np.asarray(pieces, dtype=object), exterior_cw=False)
    group = np.asarray(group, dtype=np.int64)
    _, coords, (ring_offsets, geom_offsets) = shapely.to_ragged_array(oriented)
    xy = np.rint(coords).astype(np.int64)
    n_rings = len(ring_offsets) - 1
    ring_group = np.repeat(group, np.diff(geom_offsets))
    is_hole = np.ones(n_rings, dtype=bool)
    is_hole[geom_offsets[:-1]] = False
    # edge k - r of ring r runs from coordinate k to k + 1
    closing = np.zeros(len(xy), dtype=bool)
    closing[ring_offsets[1:] - 1] = True
    k = np.flatnonzero(~closing)
    edge_ring = np.repeat(np.arange(n_rings), np.diff(ring_offsets) - 1)
    x0, y0, x1, y1 = xy[k, 0], xy[k, 1], xy[k + 1, 0], xy[k + 1, 1]
    across = y0 == y1
    on_seam = np.where(across, np.isin(y0, seam_rows), np.isin(x0, seam_cols))
    s = np.flatnonzero(on_seam)

    # along each block edge, per group: the sum of the edges' directions, interval by interval
    ev_group = np.tile(ring_group[edge_ring[s]], 2)
    ev_axis = np.tile((~across[s]).astype(np.int64), 2)
    ev_line = np.tile(np.where(across[s], y0[s], x0[s]), 2)
    a = np.where(across[s], x0[s], y0[s])
    b = np.where(across[s], x1[s], y1[s])
    forward = np.where(b > a, 1, -1)
    ev_pos = np.concatenate([np.minimum(a, b), np.maximum(a, b)])
    ev_dir = np.concatenate([forward, -forward])
    order = np.lexsort((ev_pos, ev_line, ev_axis, ev_group))
    ev_group, ev_axis, ev_line, ev_pos, ev_dir = (
        v[order] for v in (ev_group, ev_axis, ev_line, ev_pos, ev_dir)
    )
    total = np.cumsum(ev_dir)  # each line's directions sum to 0: this is the sum within a line
    same_line = (
        (ev_group[:-1] == ev_group[1:])
        & (ev_axis[:-1] == ev_axis[1:])
        & (ev_line[:-1] == ev_line[1:])
    )
    left = np.flatnonzero(same_line & (ev_pos[1:] > ev_pos[:-1]) & (total[:-1] != 0))
    chain_group: list[int] = []
    chains: list[np.ndarray] = []  # open paths of vertices, start to end
    if len(left):
        # one edge per run of intervals left over along a line, in one direction
        new = np.ones(len(left), dtype=bool)
        nxt, cur = left[1:], left[:-1]
        new[1:] = (
            (ev_group[nxt] != ev_group[cur])
            | (ev_axis[nxt] != ev_axis[cur])
            | (ev_line[nxt] != ev_line[cur])
            | (total[nxt] != total[cur])
            | (ev_pos[nxt] != ev_pos[cur + 1])
        )
        first = np.flatnonzero(new)
        start = left[first]
        end = left[np.r_[first[1:], len(left)] - 1] + 1
        p, q = ev_pos[start], ev_pos[end]
        back = total[start] < 0
        p, q = np.where(back, q, p), np.where(back, p, q)
        line, down = ev_line[start], ev_axis[start] == 1
        seg = np.stack(
            [
                np.stack([np.where(down, line, p), np.where(down, p, line)], 1),
                np.stack([np.where(down, line, q), np.where(down, q, line)], 1),
            ],
            1,
        )
        chain_group.extend(ev_group[start].tolist())
        chains.extend(seg)
    # the rings' other edges, in ring order, cut where an edge along a block edge was
    cut = np.zeros(n_rings, dtype=bool)
    cut[edge_ring[s]] = True
    for r in np.flatnonzero(cut):
        ring = xy[ring_offsets[r] : ring_offsets[r + 1] - 1]
        flags = on_seam[ring_offsets[r] - r : ring_offsets[r + 1] - r - 1]
        n = len(ring)
        idx = (np.arange(n) + int(np.argmax(flags)) + 1) % n  # start after a seam edge
        path = np.concatenate([ring[idx], ring[idx[-1:] + 1 - n]])
        cuts = np.flatnonzero(flags[idx])
        for b0, b1 in zip(np.r_[0, cuts + 1], np.r_[cuts, n]):
            if b1 > b0:
                chain_group.append(int(ring_group[r]))
                chains.append(path[b0 : b1 + 1])

    # join each path's end to the path that starts there
    starting: dict[tuple[int, int, int], list[int]] = {}
    for c, (g, path) in enumerate(zip(chain_group, chains)):
        starting.setdefault((g, int(path[0, 0]), int(path[0, 1])), []).append(c)
    following = np.empty(len(chains), dtype=np.int64)
    for c, (g, path) in enumerate(zip(chain_group, chains)):
        there = starting[(g, int(path[-1, 0]), int(path[-1, 1]))]
        if len(there) == 1:
            following[c] = there[0]
        else:
            d = path[-1] - path[-2]
            following[c] = max(there, key=lambda o: _left_turn(d, chains[o][1] - chains[o][0]))
    rings: list[np.ndarray] = []
    rings_group: list[int] = []
    done = np.zeros(len(chains), dtype=bool)
    for c in range(len(chains)):
        if done[c]:
            continue
        parts = []
        j = c
        while not done[j]:
            done[j] = True
            parts.append(chains[j][:-1])
            j = following[j]
        for ring in _simple_rings(_without_straight_vertices(np.concatenate(parts))):
            rings.append(ring)
            rings_group.append(chain_group[c])

    # shells turn counter-clockwise; holes are the new clockwise rings and the pieces' own holes
    area2 = np.array(
        [
            np.dot(r[:, 0], np.roll(r[:, 1], -1)) - np.dot(r[:, 1], np.roll(r[:, 0], -1))
            for r in rings
        ]
    )
    is_shell = area2 > 0
    shells = [r for r, yes in zip(rings, is_shell) if yes]
    shell_group = np.asarray(rings_group, dtype=np.int64)[is_shell]
    holes = [r for r, yes in zip(rings, is_shell) if not yes]
    hole_group = [g for g, yes in zip(rings_group, is_shell) if not yes]
    for r in np.flatnonzero(is_hole & ~cut):  # a piece's hole never reaches its block's edge
        holes.append(xy[ring_offsets[r] : ring_offsets[r + 1] - 1])
        hole_group.append(int(ring_group[r]))
    owner = _hole_owners(shells, shell_group, area2[is_shell], holes, np.asarray(hole_group))
    if (owner < 0).any():
        raise RuntimeError("merging polygons across block edges left a hole without a shell")
    holes_of: list[list[np.ndarray]] = [[] for _ in shells]
    for h, o in enumerate(owner):
        holes_of[o].append(holes[h])
    return _polygons(shells, holes_of), shell_group


def _hole_owners(
    shells: list[np.ndarray],
    shell_group: np.ndarray,
    shell_area: np.ndarray,
    holes: list[np.ndarray],
    hole_group: np.ndarray,
) -> np.ndarray:
    """For each hole, the index of its shell: the only shell of its group, or the smallest
    shell of its group around a point inside the hole (a shell can lie in another's
    hole, as an island in a lake in a forest, and in the shell's own hole where it touches the
    shell at a corner)."""
    owner = np.full(len(holes), -1, dtype=np.int64)
    if not len(holes):
        return owner
    n_groups = int(max(shell_group.max(initial=0), hole_group.max(initial=0))) + 1
    per_group = np.bincount(shell_group, minlength=n_groups)
    some_shell = np.full(n_groups, -1, dtype=np.int64)
    some_shell[shell_group] = np.arange(len(shell_group))
    alone = per_group[hole_group] == 1
    owner[alone] = some_shell[hole_group[alone]]
    rest = np.flatnonzero(~alone)
    if len(rest):
        p0 = np.array([holes[h][0] for h in rest], dtype=np.float64)
        d = np.array([holes[h][1] for h in rest], dtype=np.float64) - p0
        # a hole turns clockwise with the polygon on its left: just right of the middle of its
        # first edge is inside the hole, and not on an island in it (an island of the same
        # class touching that edge would be part of the polygon)
        right = np.stack([d[:, 1], -d[:, 0]], 1) / np.hypot(d[:, 0], d[:, 1])[:, None]
        inside = shapely.points(p0 + d / 2 + 1e-3 * right)
        polygons = _polygons(shells, [[] for _ in shells])
        # each shell prepared once: query the points' tree with the shells
        si, pi = shapely.STRtree(inside).query(polygons, predicate="contains")
        mine = shell_group[si] == hole_group[rest[pi]]
        si, pi = si[mine], pi[mine]
        order = np.lexsort((shell_area[si], pi))
        si, pi = si[order], pi[order]
        smallest = np.r_[True, pi[1:] != pi[:-1]]
        owner[rest[pi[smallest]]] = si[smallest]
    return owner
