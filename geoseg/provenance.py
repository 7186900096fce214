"""Where a class map came from: GeoTIFF tags on the map and a STAC Item beside it.

Every class map geoseg writes carries tags with geoseg's version, the bundle's hash, the
window, overlap, blend, precision and composite rule, and its input scenes; and a STAC Item
(``classes.tif`` -> ``classes.json``) with the ``proj`` fields of its grid, its class table
(``classification:classes``) and its inputs as ``derived_from`` links, so that a catalog can
index the product.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from geoseg.classes import ClassInfo
from geoseg.io import Grid, atomic_output, is_url

STAC_VERSION = "1.0.0"
PROJ_SCHEMA = "https://stac-extensions.github.io/projection/v1.1.0/schema.json"
CLASSIFICATION_SCHEMA = "https://stac-extensions.github.io/classification/v1.1.0/schema.json"
PRODUCT_KEY = "geoseg:product"
"""The property by which a STAC Item shows that geoseg wrote it."""


def item_path(class_map: str | os.PathLike[str]) -> Path:
    """The STAC Item beside a class map: ``classes.tif`` -> ``classes.json``."""
    return Path(class_map).with_suffix(".json")


def provenance_tags(settings: dict[str, Any], scenes: Sequence[str]) -> dict[str, str]:
    """GeoTIFF tags naming how a class map was made."""
    from geoseg import __version__

    tags = {
        "GEOSEG_VERSION": __version__,
        "GEOSEG_BUNDLE_HASH": str(settings["bundle"]),
        "GEOSEG_SCENES": json.dumps(list(scenes)),
    }
    for key in ("window", "overlap", "blend", "precision", "tta", "composite", "resampling"):
        if settings.get(key) is not None:
            tags[f"GEOSEG_{key.upper()}"] = str(settings[key])
    return tags


def _footprint(grid: Grid) -> tuple[Any, list[float]] | None:
    """The grid's outline in WGS84 lon/lat (edges densified) and its bbox."""
    if grid.crs is None:
        return None
    import shapely
    from rasterio.warp import transform_geom

    t = grid.transform
    x0, y0 = t.c, t.f
    x1, y1 = t * (grid.width, grid.height)
    ring = shapely.box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))
    ring = shapely.segmentize(ring, max(abs(x1 - x0), abs(y1 - y0)) / 20)
    geom = transform_geom(grid.crs, "EPSG:4326", shapely.geometry.mapping(ring))
    return geom, list(shapely.geometry.shape(geom).bounds)


def epsg_code(crs: Any) -> int | None:
    """The EPSG code of ``crs`` (None if it has none), kept per CRS in this process and in
    geoseg's cache folder (:func:`geoseg.tuning.cache_path`): for a CRS whose file names no
    code (the NC scene's Lambert projection, found to be EPSG 32119) GDAL's lookup took
    55-63 ms and held the GIL throughout, so a thread beside the run could not hide it."""
    return _epsg_of_wkt(crs.to_wkt())


@functools.lru_cache(maxsize=64)
def _epsg_of_wkt(wkt: str) -> int | None:
    import rasterio
    from rasterio.crs import CRS

    from geoseg.tuning import cache_path, load_cache, update_cache

    path = cache_path("epsg.json")
    key = hashlib.sha256(f"{rasterio.__gdal_version__}\n{wkt}".encode()).hexdigest()[:32]
    known = load_cache(path)
    if key in known and (known[key] is None or isinstance(known[key], int)):
        return known[key]
    code = CRS.from_wkt(wkt).to_epsg()
    found = int(code) if code is not None else None
    update_cache(path, key, lambda _: found)
    return found


def stac_item(
    class_map: Path,
    grid: Grid,
    classes: Sequence[ClassInfo],
    settings: dict[str, Any],
    inputs: Sequence[str],
    *,
    probabilities: Path | None = None,
    datetimes: Sequence[str] = (),
) -> dict[str, Any]:
    """The STAC Item (a dict) describing ``class_map``; ``inputs``: the files or Items it was
    predicted from."""
    from geoseg import __version__

    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    props: dict[str, Any] = {PRODUCT_KEY: "class map", "created": now}
    if datetimes:
        start, end = min(datetimes), max(datetimes)
        if start == end:
            props["datetime"] = start
        else:
            props.update(datetime=None, start_datetime=start, end_datetime=end)
    else:
        props["datetime"] = now
    epsg = epsg_code(grid.crs) if grid.crs is not None else None
    props["proj:epsg"] = epsg
    if grid.crs is not None and epsg is None:
        props["proj:wkt2"] = grid.crs.to_wkt()
    t = grid.transform
    props["proj:shape"] = [grid.height, grid.width]
    props["proj:transform"] = [t.a, t.b, t.c, t.d, t.e, t.f]
    x1, y1 = t * (grid.width, grid.height)
    props["proj:bbox"] = [min(t.c, x1), min(t.f, y1), max(t.c, x1), max(t.f, y1)]
    props["geoseg:version"] = __version__
    props["geoseg:settings"] = {k: v for k, v in settings.items() if k != "scene_stamp"}
    table = [
        {"value": c.id, "name": c.name, "color_hint": c.color.lstrip("#").upper()} for c in classes
    ]
    assets: dict[str, Any] = {
        "classes": {
            "href": f"./{class_map.name}",
            "type": "image/tiff; application=geotiff; profile=cloud-optimized",
            "title": "class map",
            "roles": ["data"],
            "classification:classes": table,
        }
    }
    if probabilities is not None:
        assets["probabilities"] = {
            "href": f"./{probabilities.name}",
            "type": "image/tiff; application=geotiff; profile=cloud-optimized",
            "title": "class probabilities x 254 (255: nodata)",
            "roles": ["data"],
        }
    links = [{"rel": "derived_from", "href": s if is_url(s) else Path(s).as_uri()} for s in inputs]
    item: dict[str, Any] = {
        "type": "Feature",
        "stac_version": STAC_VERSION,
        "stac_extensions": [PROJ_SCHEMA, CLASSIFICATION_SCHEMA],
        "id": class_map.stem,
        "properties": props,
        "geometry": None,
        "links": links,
        "assets": assets,
    }
    fp = _footprint(grid)
    if fp is not None:
        item["geometry"], item["bbox"] = fp
    return item


def write_item(path: Path, item: dict[str, Any], overwrite: bool) -> None:
    """Write the Item under a temporary name, then rename it onto ``path``."""
    with atomic_output(path, overwrite) as tmp:
        Path(tmp).write_text(json.dumps(item, indent=1), encoding="utf-8")
