import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely

from geoseg.errors import ConfigError, NotARasterError
from geoseg.vectorize import vectorize


def _pixel_counts(path):
    with rasterio.open(path) as src:
        a = src.read(1)
        area = abs(src.transform.a * src.transform.e)
    ids, counts = np.unique(a[a != 255], return_counts=True)
    return {int(i): int(c) * area for i, c in zip(ids, counts)}


def test_polygon_areas_equal_pixel_areas_and_never_overlap(nc_run):
    gdf = gpd.read_file(nc_run["polygons"])
    assert gdf.crs is not None and gdf.is_valid.all()
    expected = _pixel_counts(nc_run["classes"])
    by_class = gdf.groupby("class_id")["area_m2"].sum().to_dict()
    assert by_class.keys() == expected.keys()
    for k, v in expected.items():
        assert by_class[k] == pytest.approx(v, rel=1e-9)
        assert gdf[gdf.class_id == k].geometry.area.sum() == pytest.approx(v, rel=1e-9)
    union = shapely.union_all(gdf.geometry.values)
    assert union.area == pytest.approx(gdf.geometry.area.sum(), rel=1e-9)
    assert set(gdf.class_name) <= {
        "developed",
        "agriculture",
        "herbaceous",
        "shrubland",
        "forest",
        "water",
        "sediment",
    }


def test_polygons_do_not_depend_on_block_size(nc_run, tmp_path):
    small = tmp_path / "small.gpkg"
    vectorize(nc_run["classes"], small, block=100, workers=2)
    a, b = gpd.read_file(small), gpd.read_file(nc_run["polygons"])
    assert len(a) == len(b)
    key = lambda g: sorted((int(c), round(x, 3)) for c, x in zip(g.class_id, g.geometry.area))  # noqa: E731
    assert key(a) == key(b)


def test_geojson_is_lon_lat_with_right_hand_rings(nc_run, tmp_path):
    out = tmp_path / "p.geojson"
    vectorize(nc_run["classes"], out, workers=1)
    gdf = gpd.read_file(out)
    assert gdf.crs.to_epsg() == 4326
    minx, miny, maxx, maxy = gdf.total_bounds
    assert -79.0 < minx < maxx < -78.0 and 35.0 < miny < maxy < 36.5  # Raleigh, NC
    ext = [shapely.get_exterior_ring(g) for g in gdf.geometry]
    assert all(shapely.is_ccw(r) for r in ext)  # RFC 7946: exteriors counter-clockwise


def test_bad_rasters_and_formats_are_refused(make_raster, tmp_path, nc_run):
    floats = make_raster("f.tif", np.zeros((1, 4, 4), "float32"))
    with pytest.raises(NotARasterError, match="integer class raster"):
        vectorize(floats, tmp_path / "a.gpkg", workers=1)
    no_crs = make_raster("n.tif", np.zeros((1, 4, 4), "uint8"), crs=None)
    with pytest.raises(NotARasterError, match="no CRS"):
        vectorize(no_crs, tmp_path / "b.gpkg", workers=1)
    with pytest.raises(ConfigError, match=r"\.geojson"):
        vectorize(nc_run["classes"], tmp_path / "c.shp", workers=1)


def test_all_nodata_writes_a_valid_empty_file(make_raster, tmp_path):
    empty = make_raster("e.tif", np.full((1, 8, 8), 255, "uint8"), nodata=255)
    out = tmp_path / "e.gpkg"
    with pytest.warns(UserWarning, match="no polygons"):
        assert vectorize(empty, out, workers=1) == 0
    assert len(gpd.read_file(out)) == 0
