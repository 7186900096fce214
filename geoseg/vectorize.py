"""Polygons from a class map, block by block on Dask, merged across block edges.

Each block is polygonized in integer pixel coordinates, so the edges two blocks share have
identical coordinates; polygons that touch an inner block edge are unioned per class in the client
and split into their connected parts again. The result equals polygonizing the whole raster at
once. Pixel coordinates are mapped to the scene's CRS at the end.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import shapely
from affine import Affine
from rasterio.features import shapes
from rasterio.windows import Window

from geoseg.cluster import run_tasks, session
from geoseg.errors import ConfigError, NotARasterError
from geoseg.io import NODATA_CLASS, atomic_output, check_output, open_raster, read_class_metadata
from geoseg.tiling import block_windows

log = logging.getLogger("geoseg")

FORMATS = {
    ".geojson": "GeoJSON",
    ".json": "GeoJSON",
    ".gpkg": "GPKG",
    ".parquet": "Parquet",
    ".fgb": "FlatGeobuf",
}


def output_format(path: str | os.PathLike[str]) -> str:
    ext = Path(path).suffix.lower()
    if ext not in FORMATS:
        raise ConfigError(
            f"unknown polygon format {ext or '(none)'!r} for {str(path)!r}; expected one of "
            f"{', '.join(FORMATS)}"
        )
    return FORMATS[ext]


@dataclass
class BlockPolygons:
    """Polygons of one block in pixel coordinates (WKB), split by whether they touch an
    inner block edge (and so may continue in a neighbour)."""

    interior: list[tuple[bytes, int]]
    edge: list[tuple[bytes, int]]


def polygonize_block(
    core: Window, path: str, nodata: int, keep: tuple[int, ...] | None
) -> BlockPolygons:
    """Polygonize one block (a Dask task)."""
    with rasterio.open(path) as src:
        data = src.read(1, window=core)
        height, width = src.height, src.width
    r0, c0 = int(core.row_off), int(core.col_off)
    h, w = data.shape
    mask = data != nodata
    if keep is not None:
        mask &= np.isin(data, keep)
    inner = []  # inner edges as lines in pixel coordinates
    if r0 > 0:
        inner.append(shapely.LineString([(c0, r0), (c0 + w, r0)]))
    if r0 + h < height:
        inner.append(shapely.LineString([(c0, r0 + h), (c0 + w, r0 + h)]))
    if c0 > 0:
        inner.append(shapely.LineString([(c0, r0), (c0, r0 + h)]))
    if c0 + w < width:
        inner.append(shapely.LineString([(c0 + w, r0), (c0 + w, r0 + h)]))
    border = shapely.union_all(inner) if inner else None
    out = BlockPolygons([], [])
    for geom, value in shapes(
        data, mask=mask, connectivity=4, transform=Affine.translation(c0, r0)
    ):
        poly = shapely.geometry.shape(geom)
        touches = border is not None and poly.boundary.intersection(border).length > 0
        (out.edge if touches else out.interior).append((shapely.to_wkb(poly), int(value)))
    return out


def _merge_edges(edge: list[tuple[bytes, int]]) -> list[tuple[Any, int]]:
    by_class: dict[int, list[Any]] = {}
    for wkb, value in edge:
        by_class.setdefault(value, []).append(shapely.from_wkb(wkb))
    merged: list[tuple[Any, int]] = []
    for value, geoms in by_class.items():
        union = shapely.union_all(geoms)
        merged.extend((g, value) for g in shapely.get_parts(union))
    return merged


def _areas(gdf: Any) -> tuple[np.ndarray, np.ndarray]:
    """Area (m²) and perimeter (m) of each polygon, geodesic in a geographic CRS."""
    crs = gdf.crs
    if crs is not None and crs.is_geographic:
        from pyproj import Geod

        geod = crs.get_geod() or Geod(ellps="WGS84")
        ap = [geod.geometry_area_perimeter(g) for g in gdf.geometry]
        return np.abs([a for a, _ in ap]), np.array([p for _, p in ap])
    factor = 1.0
    if crs is not None and crs.axis_info:
        factor = crs.axis_info[0].unit_conversion_factor
    return gdf.geometry.area.to_numpy() * factor**2, gdf.geometry.length.to_numpy() * factor


def vectorize(
    classes: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    block: int = 2048,
    only: list[int] | None = None,
    crs: str | None = None,
    workers: int | None = None,
    scheduler: str | None = None,
    overwrite: bool = False,
) -> int:
    """Turn the class map ``classes`` into polygons at ``output``; return how many.

    The format follows the extension: ``.geojson`` (WGS84 lon/lat, RFC 7946), ``.gpkg``,
    ``.parquet`` (GeoParquet) or ``.fgb``; the last three keep the raster's CRS unless ``crs`` is
    given. Attributes: ``class_id``, ``class_name``, ``area_m2``, ``perimeter_m``.
    """
    import geopandas as gpd

    driver = output_format(output)
    out = check_output(output, overwrite)
    with open_raster(classes, "class map") as src:
        if src.dtypes[0] not in ("uint8", "uint16", "int8", "int16", "int32", "uint32"):
            raise NotARasterError(
                f"class map {str(classes)!r} has {src.dtypes[0]} values; expected an integer class "
                "raster such as the output of 'geoseg predict'"
            )
        if src.crs is None:
            raise NotARasterError(
                f"class map {str(classes)!r} has no CRS; assign one (gdal_edit.py -a_srs) first"
            )
        meta = read_class_metadata(src) or []
        nodata = int(src.nodata) if src.nodata is not None else NODATA_CLASS
        height, width, transform, src_crs = src.height, src.width, src.transform, src.crs
    if not meta:
        warnings.warn(
            f"class map {str(classes)!r} has no class names; using the class ids", stacklevel=2
        )
    names = {c.id: c.name for c in meta}
    cores = block_windows(height, width, block)
    path = str(Path(classes).resolve())
    with session(workers, scheduler) as client:
        parts = run_tasks(
            client,
            polygonize_block,
            cores,
            "vectorize",
            path,
            nodata,
            tuple(only) if only else None,
        )
    polys = [(shapely.from_wkb(w), v) for p in parts for w, v in p.interior]
    polys += _merge_edges([e for p in parts for e in p.edge])
    a, b, c, d, e, f = transform[:6]
    geoms = shapely.transform(  # pixel (col, row) -> scene CRS, all polygons at once
        np.array([g for g, _ in polys], dtype=object),
        lambda xy: np.column_stack(
            [a * xy[:, 0] + b * xy[:, 1] + c, d * xy[:, 0] + e * xy[:, 1] + f]
        ),
    )
    values = np.array([v for _, v in polys], dtype=np.int32)
    gdf = gpd.GeoDataFrame(
        {"class_id": values, "class_name": [names.get(int(v), str(v)) for v in values]},
        geometry=list(geoms),
        crs=src_crs,
    )
    gdf["area_m2"], gdf["perimeter_m"] = _areas(gdf)
    if len(gdf):
        b = gdf.geometry.bounds
        gdf = (
            gdf.assign(_x=b.minx, _y=-b.maxy)
            .sort_values(["class_id", "_y", "_x"])
            .drop(columns=["_x", "_y"])
            .reset_index(drop=True)
        )
    else:
        warnings.warn(
            f"class map {str(classes)!r} gave no polygons (all nodata?); writing an empty file",
            stacklevel=2,
        )
    if driver == "GeoJSON":
        gdf = gdf.to_crs("EPSG:4326")
    elif crs:
        gdf = gdf.to_crs(crs)
    with atomic_output(out, overwrite) as tmp:
        if driver == "Parquet":
            gdf.to_parquet(tmp)
        elif driver == "GeoJSON":
            gdf.to_file(tmp, driver=driver, engine="pyogrio", layer_options={"RFC7946": "YES"})
        else:  # name the layer after the final file, not the temporary one
            gdf.to_file(tmp, driver=driver, engine="pyogrio", layer=re.sub(r"\W", "_", out.stem))
    log.info("wrote %d polygons to %s", len(gdf), out)
    return len(gdf)
