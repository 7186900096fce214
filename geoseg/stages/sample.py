"""Reference samples and the estimates made from them: ``geoseg sample`` draws a stratified
random sample of points from a class map for reference labelling, and :func:`point_accuracy`
turns labelled points into the good-practice estimates of :mod:`geoseg.accuracy`.

Both stream over blocks. The strata's pixel counts and areas are tallied on the workers
(:mod:`geoseg.tasks.strata`), exact: pixel counts times pixel area, geodesic per row in a
geographic CRS. A sample's design (its strata, their pixel counts and areas, the allocation,
the seed and the class map's hash) is written beside it as ``SAMPLE.design.json``, so the
estimate can be made once the points are labelled, and is refused against another map.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.windows import Window

from geoseg.accuracy import ALLOCATIONS, MIN_PER_CLASS, SampleAccuracy, allocate, estimate
from geoseg.classes import NODATA, ClassInfo
from geoseg.cluster import run_tasks, session
from geoseg.errors import ConfigError, GridMismatchError, LabelError, check_range, option
from geoseg.io import (
    DESIGN_MARK,
    SceneProfile,
    atomic_output,
    check_class_map,
    check_input,
    check_output,
    check_same_grid,
    is_vector_path,
    read_profile,
    read_vector,
    resolve_path,
)
from geoseg.labels import check_regions
from geoseg.tasks.strata import CROSS, TILE, BlockTally, StrataSpec, block_draw, block_tally
from geoseg.tiling import MIN_BLOCK, block_windows

log = logging.getLogger("geoseg")

REFERENCE_FIELD = "reference"
DESIGNS = ("stratified", "simple")


def design_path(sample: str | os.PathLike[str]) -> Path:
    """``SAMPLE.gpkg`` -> ``SAMPLE.design.json``."""
    p = Path(sample)
    return p.with_name(p.stem + ".design.json")


def map_hash(path: str | os.PathLike[str]) -> str:
    """SHA-256 of the class map's bytes: a design names the map it was drawn from."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class SampleResult:
    """What :func:`sample` wrote: the points, the design file, points per stratum."""

    points: Path
    design: Path
    allocation: dict[str, int]


def _classes(profile: SceneProfile) -> list[ClassInfo]:
    classes = check_class_map(profile)
    if classes is None:
        raise LabelError(
            f"class map {profile.path!r} has no class metadata; sample a class map geoseg "
            "wrote (geoseg predict), or one with category names"
        )
    return classes


def _regions(
    path: str | None, field: str | None, profile: SceneProfile
) -> tuple[list[str], tuple[int, ...]]:
    if path is None:
        return [], ()
    return check_regions(path, field, profile)


def _tally(
    client: Any,
    blocks: list[Window],
    class_map: str,
    spec: StrataSpec,
    regions: str | None,
    positions: tuple[int, ...],
    within: str | None,
    *,
    tiles: bool = False,
) -> list[BlockTally]:
    """Every block's strata and map classes, counted and measured on the workers."""
    args = (class_map, spec, regions, positions, within, tiles)
    return run_tasks(client, block_tally, blocks, "strata", *args, cpu_only=True)


def _sum(parts: Sequence[BlockTally]) -> BlockTally:
    total = parts[0]
    for p in parts[1:]:
        total = total + p
    return total


def sample(
    class_map: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    size: int = 600,
    allocation: str = "proportional",
    min_per_class: int = MIN_PER_CLASS,
    expected_accuracy: dict[int, float] | None = None,
    regions: str | os.PathLike[str] | None = None,
    region_field: str | None = None,
    within: str | os.PathLike[str] | None = None,
    seed: int = 0,
    block: int = 2048,
    client: Any = None,
    workers: int | None = None,
    scheduler: str | None = None,
    overwrite: bool = False,
) -> SampleResult:
    """Draw a stratified random sample of ``size`` points from ``class_map`` for reference
    labelling; write them to ``output`` (any OGR vector format) and the design beside them.

    The strata are the map classes, crossed with ``regions`` when given (a pixel belongs to
    the first region, in file order, that holds it; pixels in none form strata of their own).
    ``allocation``: ``proportional`` (to the strata's areas), ``equal`` or ``neyman`` (with the
    ``expected_accuracy`` of each class, 0.8 by default), each with at least ``min_per_class``
    points per stratum. Each point lies at the centre of a pixel drawn uniformly inside its
    stratum; ``seed`` makes the sample reproducible, for any block size or worker count (the
    block is rounded up to a multiple of 64 px).

    Each point carries ``sample_id``, its stratum (``stratum``, ``stratum_name``), the map class
    under it (``map_class``, ``map_class_name``) and an empty ``reference`` column to fill in.
    """
    check_range("--size", size, 1)
    check_range("--min-per-class", min_per_class, 0)
    check_range("--block", block, MIN_BLOCK)
    if allocation not in ALLOCATIONS:
        raise ConfigError(
            f"unknown {option('--allocation', None)} {allocation!r}; expected one of "
            f"{', '.join(ALLOCATIONS)}"
        )
    class_map = resolve_path(class_map)
    regions = None if regions is None else resolve_path(regions)
    within = None if within is None else resolve_path(within)
    if not is_vector_path(output):
        raise ConfigError(
            f"sample {str(output)!r}: expected a vector file (.gpkg, .geojson, .shp, .parquet)"
        )
    out = check_output(output, overwrite, inputs=[class_map, regions, within], what="sample")
    dpath = check_output(design_path(out), overwrite, inputs=[class_map], what="sample design")
    profile = read_profile(class_map, "class map")
    classes = _classes(profile)
    names = {c.id: c.name for c in classes}
    region_names, positions = _regions(regions, region_field, profile)
    if within is not None:
        check_input(within, "area")
    spec = StrataSpec("classes x regions", regions, positions) if regions else StrataSpec("classes")
    block = -(-block // TILE) * TILE  # whole tiles: the sample does not depend on the block
    blocks = block_windows(profile.height, profile.width, block)
    with session(workers, scheduler, client=client) as client:
        parts = _tally(client, blocks, class_map, spec, None, (), within, tiles=True)
        total = _sum(parts).strata[0]
        codes = sorted(c for c in total if total[c][0] > 0)
        if not codes:
            raise LabelError(f"class map {class_map!r} has no valid pixel to sample")

        def stratum_name(code: int) -> str:
            if spec.kind == "classes":
                return names.get(code, f"class {code}")
            slot, cid = divmod(code, CROSS)
            where = region_names[slot - 1] if slot else "(no region)"
            return f"{where} / {names.get(cid, f'class {cid}')}"

        exp = expected_accuracy or {}
        counts = allocate(
            size,
            [total[c][1] for c in codes],
            allocation=allocation,
            min_per_class=min_per_class,
            expected_accuracy=[exp.get(c % CROSS, 0.8) for c in codes],
            pixels=[int(total[c][0]) for c in codes],
        )
        picks = _picks(parts, codes, counts, seed)
        todo = [i for i, p in enumerate(picks) if p]
        drawn = run_tasks(
            client,
            _draw_one,
            todo,
            "sample",
            blocks,
            class_map,
            spec,
            within,
            picks,
            cpu_only=True,
        )
    rows = [p for part in drawn for p in part]
    rows.sort(key=lambda t: (t[2], t[0], t[1]))
    _write_points(out, rows, profile, names, stratum_name, overwrite)
    design = {
        DESIGN_MARK: 1,
        "class_map": class_map,
        "class_map_sha256": map_hash(class_map),
        "crs": profile.crs.to_wkt() if profile.crs else None,
        "size": size,
        "allocation": allocation,
        "min_per_class": min_per_class,
        "seed": seed,
        "strata_by": spec.kind,
        "regions": regions,
        "region_field": region_field if regions else None,
        "region_names": region_names,
        "region_features": list(positions),
        "within": within,
        "classes": [vars(c) for c in classes],
        "strata": [
            {
                "code": c,
                "name": stratum_name(c),
                "map_class": c % CROSS,
                "pixels": int(total[c][0]),
                "area_m2": float(total[c][1]),
                "points": k,
            }
            for c, k in zip(codes, counts)
        ],
    }
    with atomic_output(dpath, overwrite) as tmp:
        tmp.write_text(json.dumps(design, indent=1) + "\n", encoding="utf-8")
    log.info("drew %d points in %d strata: %s", len(rows), len(codes), out)
    return SampleResult(out, dpath, {stratum_name(c): k for c, k in zip(codes, counts)})


def _picks(
    parts: Sequence[BlockTally], codes: Sequence[int], counts: Sequence[int], seed: int
) -> list[dict[int, list[tuple[int, int]]]]:
    """Each block's share of the sample: per stratum, ``counts`` ranks drawn uniformly without
    replacement among its pixels in the fixed tile order (a random stream per stratum, from
    ``seed``), each found as the ``k``-th pixel of a tile."""
    tile_ids = np.concatenate([p.tile_index for p in parts if p.tile_index is not None])
    owner = np.concatenate(
        [np.full(len(p.tile_index), b) for b, p in enumerate(parts) if p.tile_index is not None]
    )
    order = np.argsort(tile_ids, kind="stable")
    tile_ids, owner = tile_ids[order], owner[order]
    picks: list[dict[int, list[tuple[int, int]]]] = [{} for _ in parts]
    for code, k in zip(codes, counts):
        if k <= 0:
            continue
        per_tile = np.concatenate(
            [
                (p.tile_counts or {}).get(code, np.zeros(len(p.tile_index), np.int64))
                for p in parts
                if p.tile_index is not None
            ]
        )[order]
        ends = np.cumsum(per_tile)
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(code,)))
        ranks = np.sort(rng.choice(int(ends[-1]), size=k, replace=False))
        at = np.searchsorted(ends, ranks, side="right")
        starts = ends - per_tile
        for rank, t in zip(ranks.tolist(), at.tolist()):
            b = int(owner[t])
            picks[b].setdefault(code, []).append((int(tile_ids[t]), rank - int(starts[t])))
    return picks


def _draw_one(
    i: int,
    blocks: list[Window],
    class_map: str,
    spec: StrataSpec,
    within: str | None,
    picks: list[dict[int, list[tuple[int, int]]]],
) -> list[tuple[int, int, int, int]]:
    return block_draw(blocks[i], class_map, spec, within, picks[i])


def _write_points(
    out: Path,
    rows: list[tuple[int, int, int, int]],
    profile: SceneProfile,
    names: dict[int, str],
    stratum_name: Any,
    overwrite: bool,
) -> None:
    import geopandas as gpd
    import pandas as pd

    r = np.array([t[0] for t in rows], dtype=np.float64)
    c = np.array([t[1] for t in rows], dtype=np.float64)
    t = profile.transform
    xs = t.a * (c + 0.5) + t.b * (r + 0.5) + t.c
    ys = t.d * (c + 0.5) + t.e * (r + 0.5) + t.f
    gdf = gpd.GeoDataFrame(
        {
            "sample_id": np.arange(1, len(rows) + 1),
            "stratum": [t[2] for t in rows],
            "stratum_name": [stratum_name(t[2]) for t in rows],
            "map_class": [t[3] for t in rows],
            "map_class_name": [names.get(t[3], f"class {t[3]}") for t in rows],
            REFERENCE_FIELD: pd.Series([None] * len(rows), dtype="string"),
        },
        geometry=gpd.points_from_xy(xs, ys),
        crs=profile.crs,
    )
    layer = re.sub(r"\W", "_", out.stem)  # the final file's name, not the temporary one's
    with atomic_output(out, overwrite) as tmp:
        if tmp.suffix.lower() == ".parquet":
            gdf.to_parquet(tmp)
        else:
            gdf.to_file(tmp, engine="pyogrio", layer=layer)


# -- estimates from labelled points ---------------------------------------------------------


@dataclass(frozen=True)
class PointCounts:
    """What happened to the reference points: used, and each reason one was not."""

    given: int
    used: int
    outside_map: int
    on_nodata: int
    outside_area: int
    unlabelled: int
    no_stratum: int

    def note(self) -> str:
        left = [
            f"{v} {k}"
            for k, v in (
                ("outside the map", self.outside_map),
                ("on nodata", self.on_nodata),
                ("outside the scored area", self.outside_area),
                ("without a reference label", self.unlabelled),
                ("in no stratum", self.no_stratum),
            )
            if v
        ]
        return f"{self.used} of {self.given} points used" + (
            f"; not used: {', '.join(left)}" if left else ""
        )


def load_design(path: str | os.PathLike[str], class_map: str) -> dict[str, Any]:
    """Read a design file and check that it belongs to ``class_map`` (by its hash)."""
    p = check_input(path, "sample design")
    try:
        design = json.loads(Path(p).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"sample design {p!r} is not JSON ({exc})") from None
    if not isinstance(design, dict) or DESIGN_MARK not in design:
        raise ConfigError(
            f"sample design {p!r} is not a design geoseg sample wrote (no {DESIGN_MARK!r} key)"
        )
    if design.get("class_map_sha256") != map_hash(class_map):
        raise ConfigError(
            f"sample design {p!r} belongs to another map ({design.get('class_map')!r}, whose "
            f"bytes differ from {class_map!r}); estimate with the map the sample was drawn from"
        )
    return design


def reference_ids(
    values: Sequence[Any],
    classes: Sequence[ClassInfo],
    code_map: dict[Any, int],
    path: str,
    field: str,
) -> np.ndarray:
    """Reference labels -> class ids (-1: no label): class names (any case) or ids, with
    ``code_map`` for the rest. Labels that match no class are refused, listed."""
    by_name = {c.name.casefold(): c.id for c in classes}
    ids = {c.id for c in classes}
    cmap = {str(k).casefold(): int(v) for k, v in code_map.items()}
    out = np.full(len(values), -1, dtype=np.int64)
    bad: set[str] = set()
    for i, v in enumerate(values):
        if v is None or (isinstance(v, float) and math.isnan(v)) or str(v).strip() == "":
            continue
        key = str(v).strip()
        if isinstance(v, float) and v.is_integer():
            key = str(int(v))
        k = key.casefold()
        if k in cmap:
            out[i] = cmap[k]
        elif k in by_name:
            out[i] = by_name[k]
        elif key.lstrip("-").isdigit() and int(key) in ids:
            out[i] = int(key)
        else:
            bad.add(key)
    if bad:
        listed = ", ".join(f"{c.id} {c.name}" for c in classes)
        raise LabelError(
            f"reference {path!r}, field {field!r}: labels {sorted(bad)} match no class of the "
            f"class map ({listed}); use class names or ids, or map them with "
            f"{option('--class-map', None)} (e.g. {sorted(bad)[0]}:{classes[0].id})"
        )
    return out


def point_accuracy(
    class_map: str,
    profile: SceneProfile,
    classes: Sequence[ClassInfo],
    points: str,
    field: str | None,
    *,
    code_map: dict[Any, int] | None = None,
    design: str = "stratified",
    design_file: str | None = None,
    strata: str | None = None,
    regions: str | None = None,
    positions: tuple[int, ...] = (),
    region_names: Sequence[str] = (),
    within: str | None = None,
    block: int = 2048,
    client: Any,
) -> tuple[SampleAccuracy, tuple[SampleAccuracy, ...], PointCounts, np.ndarray]:
    """The estimates from reference ``points`` (a vector file of points whose ``field`` holds
    reference labels) for the whole map and per region; how the points were used; and their
    ``(truth, map)`` class ids for a plain confusion matrix of the sample.

    The strata: those of ``design_file`` (checked against the map); else of ``strata``, a raster
    on the class map's grid (the class map itself by default); ``design="simple"``: one."""
    if design not in DESIGNS:
        raise ConfigError(
            f"unknown {option('--design', None)} {design!r}; expected one of {', '.join(DESIGNS)}"
        )
    gdf = read_vector(points, "reference points", profile.crs)
    if field is None or field not in gdf.columns:
        cols = ", ".join(c for c in gdf.columns if c != "geometry")
        raise ConfigError(
            f"reference {points!r} has no field {field!r}; say which field holds the reference "
            f"labels with {option('--truth-field', None)} (fields: {cols})"
        )
    given = len(gdf)
    ref = reference_ids(list(gdf[field]), classes, code_map or {}, points, field)
    xs, ys = gdf.geometry.x.to_numpy(), gdf.geometry.y.to_numpy()
    cols_f, rows_f = ~profile.transform * (xs, ys)
    rows, cols = np.floor(rows_f).astype(np.int64), np.floor(cols_f).astype(np.int64)
    inside = (rows >= 0) & (rows < profile.height) & (cols >= 0) & (cols < profile.width)
    mapped = np.full(given, -1, dtype=np.int64)
    with rasterio.open(class_map) as src:
        nodata = src.nodata if src.nodata is not None else NODATA
        mapped[inside] = _values_at(src, rows[inside], cols[inside])
    on_nodata = inside & (mapped == nodata)
    ok = inside & ~on_nodata
    in_area = np.ones(given, bool)
    if within is not None:
        area = read_vector(within, "area", profile.crs)
        in_area = gdf.geometry.intersects(area.union_all()).to_numpy()
    ok_area = ok & in_area
    labelled = ok_area & (ref >= 0)
    # strata
    spec, stratum, design_strata = _point_strata(
        design, design_file, strata, class_map, profile, gdf, mapped, rows, cols, inside
    )
    has_stratum = stratum >= 0
    use = labelled & has_stratum
    counts = PointCounts(
        given=given,
        used=int(use.sum()),
        outside_map=int((~inside).sum()),
        on_nodata=int(on_nodata.sum()),
        outside_area=int((ok & ~in_area).sum()),
        unlabelled=int((ok_area & (ref < 0)).sum()),
        no_stratum=int((labelled & ~has_stratum).sum()),
    )
    if counts.used == 0:
        raise LabelError(
            f"reference {points!r}: no point can be used ({counts.note()}); label the points in "
            f"field {field!r} first"
        )
    # the population: strata and map classes, tallied over blocks (per region too)
    blocks = block_windows(profile.height, profile.width, block)
    tally = _sum(_tally(client, blocks, class_map, spec, regions, positions, within))
    region_of = _point_regions(regions, positions, gdf) if regions else []
    pairs = [(c.id, c.name) for c in classes]
    label = {
        "stratified": "stratified random (strata: the map classes)",
        "simple": "simple random",
    }[design]
    if design_file:
        label = f"stratified random (strata of {design_file})"
    elif strata is not None and spec.kind == "raster":
        label = f"stratified random (strata: {strata})"
    names = {int(s["code"]): s["name"] for s in design_strata} if design_strata else None

    def one(r: int, mask: np.ndarray) -> SampleAccuracy:
        m = use & mask
        st = tally.strata[r]
        if design == "simple":
            area = {0: float(sum(v[1] for v in tally.classes[r].values()))}
            s = np.zeros(int(m.sum()), np.int64)
            px = {0: int(sum(v[0] for v in tally.classes[r].values()))}
        else:
            area = {int(k): float(v[1]) for k, v in st.items()}
            px = {int(k): int(v[0]) for k, v in st.items()}
            s = stratum[m]
            for k in set(s.tolist()) - set(area):  # points in a stratum with no mapped area
                area[k], px[k] = 0.0, 0
        return estimate(
            s,
            mapped[m],
            ref[m],
            area,
            pairs,
            {int(k): float(v[1]) for k, v in tally.classes[r].items()},
            design=label,
            strata_pixels=px,
            strata_names=names,
        )

    whole = one(0, np.ones(given, bool))
    per_region = tuple(
        _named(one(i + 1, region_of[i]), n, positions[i]) for i, n in enumerate(region_names)
    )
    return whole, per_region, counts, np.stack([ref[use], mapped[use]])


def _named(a: SampleAccuracy, name: str, feature: int) -> SampleAccuracy:
    from dataclasses import replace

    return replace(a, name=name, feature=feature)


def _values_at(src: Any, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Band 1 at each (row, col), reading one small window per group of nearby points."""
    out = np.empty(len(rows), dtype=np.int64)
    if len(rows) == 0:
        return out
    tile = 512
    key = (rows // tile) * (src.width // tile + 1) + cols // tile
    for k in np.unique(key):
        sel = np.flatnonzero(key == k)
        r0, c0 = int(rows[sel].min()), int(cols[sel].min())
        r1, c1 = int(rows[sel].max()) + 1, int(cols[sel].max()) + 1
        a = src.read(1, window=Window(c0, r0, c1 - c0, r1 - r0))
        out[sel] = a[rows[sel] - r0, cols[sel] - c0]
    return out


def _point_strata(
    design: str,
    design_file: str | None,
    strata: str | None,
    class_map: str,
    profile: SceneProfile,
    gdf: Any,
    mapped: np.ndarray,
    rows: np.ndarray,
    cols: np.ndarray,
    inside: np.ndarray,
) -> tuple[StrataSpec, np.ndarray, list[dict[str, Any]]]:
    """The strata spec for the tally, each point's stratum code (-1: none) and the design's
    strata (from a design file)."""
    n = len(gdf)
    if design_file is not None:
        d = load_design(design_file, class_map)
        if "stratum" not in gdf.columns:
            raise ConfigError(
                f"the reference points have no 'stratum' field, which a sample drawn with "
                f"geoseg sample carries; pass the points of that sample with {design_file!r}"
            )
        s = np.array(
            [
                -1 if v is None or (isinstance(v, float) and math.isnan(v)) else int(v)
                for v in gdf["stratum"]
            ],
            dtype=np.int64,
        )
        if d["strata_by"] == "classes x regions":
            spec = StrataSpec("classes x regions", d["regions"], tuple(d["region_features"]))
        else:
            spec = StrataSpec("classes")
        known = {int(x["code"]) for x in d["strata"]}
        s[~np.isin(s, list(known))] = -1
        return spec, s, list(d["strata"])
    if design == "simple":
        return StrataSpec("classes"), np.where(inside, 0, -1), []
    if strata is None or os.path.abspath(strata) == os.path.abspath(class_map):
        return StrataSpec("classes"), np.where(inside, mapped, -1), []
    sprof = read_profile(strata, "strata")
    try:
        check_same_grid(profile, sprof, "strata", "class map")
    except GridMismatchError as exc:
        raise GridMismatchError(
            f"{exc}; the strata raster must lie on the class map's grid", filename=strata
        ) from None
    s = np.full(n, -1, dtype=np.int64)
    with rasterio.open(strata) as src:
        vals = _values_at(src, rows[inside], cols[inside])
        nd = src.nodata
    if nd is not None:
        vals = np.where(vals == nd, -1, vals)
    s[inside] = vals
    return StrataSpec("raster", strata), s, []


def _point_regions(regions: str, positions: tuple[int, ...], gdf: Any) -> list[np.ndarray]:
    """For each region (features of ``regions`` at ``positions``), which points lie in it."""
    reg = read_vector(regions, "regions", gdf.crs)
    out = []
    for pos in positions:
        geom = reg.geometry.loc[pos]
        out.append(gdf.geometry.intersects(geom).to_numpy())
    return out
