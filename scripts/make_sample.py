"""Derive the demo sample in ``geoseg/sample/`` from ``../shared/data/nc-landsat7-landclass96``.

Format conversions only (no resampling): the 6-band scene is re-encoded as a tiled, deflate-
compressed GeoTIFF; the dense labels (``strata.tif``, float32) become uint8 with nodata 0 and an
embedded colour table and class names; three polygon layers describe the demo's split (the
western 60 % for training, the eastern 40 % held out) and a 2 x 2 grid of regions over the
held-out part; the 1000 reference points keep their id and class name. Run from the repository
root: ``python scripts/make_sample.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import geopandas as gpd
import numpy as np
import rasterio
from rasterio.windows import Window, bounds
from shapely.geometry import box

SRC = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "nc-landsat7-landclass96"
DST = Path(__file__).resolve().parents[1] / "geoseg" / "sample"

# GRASS landclass96 legend; colours follow the usual land-cover palette.
CLASSES = [
    (1, "developed", "#e31a1c"),
    (2, "agriculture", "#ffd92f"),
    (3, "herbaceous", "#b2df8a"),
    (4, "shrubland", "#a6761d"),
    (5, "forest", "#1b7837"),
    (6, "water", "#1f78b4"),
    (7, "sediment", "#bababa"),
]


def main() -> None:
    DST.mkdir(parents=True, exist_ok=True)
    with rasterio.open(SRC / "lsat7_2000_6band_DERIVED.tif") as src:
        profile = src.profile
        data = src.read()
        descriptions = src.descriptions
    profile.update(tiled=True, blockxsize=256, blockysize=256, compress="deflate", predictor=2)
    with rasterio.open(DST / "nc_landsat7_2000.tif", "w", **profile) as dst:
        dst.write(data)
        for i, d in enumerate(descriptions, start=1):
            dst.set_band_description(i, d)

    with rasterio.open(SRC / "strata.tif") as src:
        labels = src.read(1)
        lprofile = src.profile
        nodata = src.nodata
    out = np.where(labels == nodata, 0, labels).astype("uint8")
    lprofile.update(
        dtype="uint8", nodata=0, tiled=True, blockxsize=256, blockysize=256, compress="deflate"
    )
    with rasterio.open(DST / "nc_landclass96.tif", "w", **lprofile) as dst:
        dst.write(out, 1)
        dst.write_colormap(
            1, {c: (*(int(h[i : i + 2], 16) for i in (1, 3, 5)), 255) for c, _, h in CLASSES}
        )
        dst.update_tags(
            GEOSEG_CLASSES=json.dumps([{"id": c, "name": n, "color": h} for c, n, h in CLASSES])
        )

    height, width = out.shape
    split = round(0.6 * width)
    transform, crs = profile["transform"], profile["crs"]

    def poly(col_off: int, row_off: int, w: int, h: int):  # pixel-aligned rectangle
        return box(*bounds(Window(col_off, row_off, w, h), transform))

    for name, geom in [
        ("nc_train_west60", poly(0, 0, split, height)),
        ("nc_holdout_east40", poly(split, 0, width - split, height)),
    ]:
        gpd.GeoDataFrame({"name": [name]}, geometry=[geom], crs=crs).to_file(
            DST / f"{name}.gpkg", driver="GPKG"
        )
    half_w, half_h = (width - split) // 2, height // 2
    cells = [
        ("north-west", split, 0, half_w, half_h),
        ("north-east", split + half_w, 0, width - split - half_w, half_h),
        ("south-west", split, half_h, half_w, height - half_h),
        ("south-east", split + half_w, half_h, width - split - half_w, height - half_h),
    ]
    gpd.GeoDataFrame(
        {"name": [c[0] for c in cells]}, geometry=[poly(*c[1:]) for c in cells], crs=crs
    ).to_file(DST / "nc_regions_2x2.gpkg", driver="GPKG")
    write_points()


def write_points() -> None:
    """The 1000 reference points (``id``: class code, ``label``: class name), as they are."""
    points = gpd.read_file(SRC / "landsat96_points.shp")[["id", "label", "geometry"]]
    points.to_file(DST / "nc_points96.gpkg", driver="GPKG")


if __name__ == "__main__":
    main()
