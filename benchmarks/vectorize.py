"""Polygonizing class maps: geoseg vectorize at its defaults and on 1 and 2 workers against one
call of rasterio.features.shapes on the whole raster, time and peak memory.

    python benchmarks/vectorize.py [--sizes 4096 16384] [--block 2048]

The class maps are a real one, the NC 1996 land-cover map shipped in geoseg/sample, upsampled 4x
(nearest, as if mapped at 7 m) and tiled to the size. geoseg writes a GeoPackage; the alternative
reads the whole raster, calls ``rasterio.features.shapes`` once, builds a GeoDataFrame with the
same attributes and writes it with geopandas, which is what a user would write by hand. Peak
memory is the summed RSS of this process and its children (the Dask workers), sampled every
50 ms. Prints a table and appends it to benchmarks/results/vectorize.json.
"""

from __future__ import annotations

import gc
import tempfile
import time
from pathlib import Path

import geopandas as gpd
import numpy as np
import rasterio
import shapely
from _results import PeakMemory, finish, make_class_map, size_arguments
from rasterio.features import shapes

from geoseg.stages.vectorize import vectorize


def whole_raster(path: Path, out: Path) -> int:
    """The obvious alternative: one rasterio.features.shapes call over the whole raster."""
    with rasterio.open(path) as src:
        data, transform, crs, nodata = src.read(1), src.transform, src.crs, src.nodata
    found = list(shapes(data, mask=data != nodata, connectivity=4, transform=transform))
    geoms = [shapely.geometry.shape(g) for g, _ in found]
    gdf = gpd.GeoDataFrame(
        {"class_id": np.array([int(v) for _, v in found], dtype=np.int32)},
        geometry=geoms,
        crs=crs,
    )
    gdf["area_m2"] = gdf.geometry.area
    gdf["perimeter_m"] = gdf.geometry.length
    gdf.to_file(out, driver="GPKG", engine="pyogrio")
    return len(gdf)


def main() -> None:
    args = size_arguments(__doc__)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        for size in args.sizes:
            classes = d / f"classes_{size}.tif"
            make_class_map(classes, size)
            mpx = size * size / 1e6
            row: dict[str, object] = {"size": size, "block": args.block}
            # "default": what `geoseg vectorize` gives with no options (no --workers, the default
            # block): a map up to 8192² px runs in this process, a larger one on a local cluster
            for workers in ("default", 1, 2):
                gc.collect()
                chosen = {} if workers == "default" else {"block": args.block, "workers": workers}
                name = workers if workers == "default" else f"{workers}w"
                with PeakMemory() as mem:
                    t = time.perf_counter()
                    n = vectorize(
                        classes, d / f"g{workers}.gpkg", overwrite=True, **chosen
                    ).polygons
                    wall = time.perf_counter() - t
                row["polygons"] = n
                row[f"geoseg_{name}_s"] = round(wall, 2)
                row[f"geoseg_{name}_mpx_s"] = round(mpx / wall, 2)
                row[f"geoseg_{name}_peak_gb"] = round(mem.peak / 1e9, 2)
            gc.collect()
            with PeakMemory() as mem:
                t = time.perf_counter()
                n_whole = whole_raster(classes, d / f"whole_{size}.gpkg")
                wall = time.perf_counter() - t
            row["shapes_polygons"] = n_whole
            row["shapes_s"] = round(wall, 2)
            row["shapes_mpx_s"] = round(mpx / wall, 2)
            row["shapes_peak_gb"] = round(mem.peak / 1e9, 2)
            for name in ("default", "2w"):
                row[f"geoseg_{name}_speedup"] = round(wall / row[f"geoseg_{name}_s"], 2)  # type: ignore[operator]
            rows.append(row)
            print(row, flush=True)
    finish("vectorize", rows)


if __name__ == "__main__":
    main()
