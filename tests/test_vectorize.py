"""Polygons from real class maps (NC, Iguazu): areas equal pixel areas, no overlaps, no
dependence on the block size, RFC 7946 GeoJSON, the sieve and coverage simplification."""

from __future__ import annotations

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely
from pyproj import Geod

from geoseg.cli import cli
from geoseg.errors import ConfigError, NoCRSError, NotARasterError
from geoseg.stages.vectorize import vectorize
from geoseg.tasks.vectorize import sieve

from .conftest import LABELS, SCENE, assert_same_polygons

NC_NAMES = {"developed", "agriculture", "herbaceous", "shrubland", "forest", "water", "sediment"}


def _pixel_areas(path) -> dict[int, float]:
    with rasterio.open(path) as src:
        a = src.read(1)
        area = abs(src.transform.a * src.transform.e)
        nodata = src.nodata
    ids, counts = np.unique(a[a != nodata], return_counts=True)
    return {int(i): int(c) * area for i, c in zip(ids, counts)}


def _read(path) -> gpd.GeoDataFrame:
    return gpd.read_parquet(path) if str(path).endswith(".parquet") else gpd.read_file(path)


def _key(gdf: gpd.GeoDataFrame) -> list[tuple[int, float]]:
    return sorted((int(c), round(a, 3)) for c, a in zip(gdf.class_id, gdf.geometry.area))


def assert_exact_polygons(gdf: gpd.GeoDataFrame, class_map) -> None:
    """Per class, polygon area is pixel count times pixel area; no two polygons overlap."""
    assert gdf.crs is not None and gdf.is_valid.all()
    expected = _pixel_areas(class_map)
    assert set(gdf.class_id) == set(expected)
    by_class = gdf.groupby("class_id")["area_m2"].sum().to_dict()
    for k, v in expected.items():
        assert by_class[k] == pytest.approx(v, rel=1e-9)
        assert gdf[gdf.class_id == k].geometry.area.sum() == pytest.approx(v, rel=1e-9)
    union = shapely.union_all(gdf.geometry.values)
    assert union.area == pytest.approx(gdf.geometry.area.sum(), rel=1e-9)


def test_nc_polygon_areas_equal_pixel_areas_and_never_overlap(nc_run):
    gdf = gpd.read_file(nc_run["polygons"])
    assert_exact_polygons(gdf, nc_run["classes"])
    assert set(gdf.class_name) <= NC_NAMES


def test_nc_polygons_do_not_depend_on_block_size(nc_run, tmp_path, dask_client):
    small = tmp_path / "small.gpkg"
    vectorize(nc_run["classes"], small, block=100, client=dask_client)
    # vertex for vertex: merging across block edges leaves no vertex on a straight edge
    assert_same_polygons(small, nc_run["polygons"])


@pytest.mark.slow
def test_iguazu_polygons_are_exact_in_every_format_and_block_size(
    iguazu_classes, tmp_path, dask_client
):
    ref = tmp_path / "p.gpkg"
    vectorize(iguazu_classes, ref, client=dask_client)
    gdf = gpd.read_file(ref)
    assert len(gdf) > 1000
    assert_exact_polygons(gdf, iguazu_classes)
    assert (gdf.geom_type == "Polygon").all()
    for name, block in (("p.parquet", 300), ("p.fgb", 700)):
        assert vectorize(
            iguazu_classes, tmp_path / name, block=block, client=dask_client
        ).polygons == len(gdf)
        other = _read(tmp_path / name)
        assert other.crs == gdf.crs
        assert _key(other) == _key(gdf)
        assert other["area_m2"].sum() == pytest.approx(gdf["area_m2"].sum(), rel=1e-12)


def test_geojson_is_lon_lat_with_right_hand_rings(nc_run, iguazu_classes, tmp_path, dask_client):
    for classes, (west, east, south, north) in (
        (nc_run["classes"], (-79.0, -78.0, 35.0, 36.5)),  # Raleigh, NC
        (iguazu_classes, (-55.5, -54.0, -26.5, -25.0)),  # Foz do Iguaçu
    ):
        out = tmp_path / "p.geojson"
        result = vectorize(classes, out, client=dask_client, overwrite=True)
        gdf = gpd.read_file(out)
        assert result.path == out and result.crs == "EPSG:4326"
        assert len(gdf) == result.polygons and gdf.crs.to_epsg() == 4326
        minx, miny, maxx, maxy = gdf.total_bounds
        assert west < minx < maxx < east and south < miny < maxy < north
        ext = [shapely.get_exterior_ring(g) for g in gdf.geometry]
        assert all(shapely.is_ccw(r) for r in ext)  # RFC 7946: exteriors counter-clockwise
        holes = [shapely.get_interior_ring(g, 0) for g in gdf.geometry if g.interiors]
        assert holes and not any(shapely.is_ccw(r) for r in holes)  # holes clockwise
        assert "crs" not in out.read_text()[:200]  # RFC 7946 has no crs member


@pytest.mark.slow
def test_simplified_polygons_keep_the_coverage(iguazu_classes, tmp_path, dask_client):
    plain, simple = tmp_path / "plain.gpkg", tmp_path / "simple.gpkg"
    vectorize(iguazu_classes, plain, block=512, client=dask_client)
    vectorize(iguazu_classes, simple, block=512, simplify=45.0, client=dask_client)
    a, b = gpd.read_file(plain), gpd.read_file(simple)
    assert b.is_valid.all() and len(b) == len(a)
    verts = lambda g: shapely.get_num_coordinates(g.geometry.values).sum()  # noqa: E731
    assert verts(b) < 0.6 * verts(a)
    union_a, union_b = shapely.union_all(a.geometry.values), shapely.union_all(b.geometry.values)
    # no overlaps: the areas add up to the union's
    assert union_b.area == pytest.approx(b.geometry.area.sum(), rel=1e-9)
    # no gaps: the union is the valid pixels' footprint, unchanged
    assert union_b.symmetric_difference(union_a).area == pytest.approx(0, abs=1e-3)
    # holes kept
    holes = lambda g: shapely.get_num_interior_rings(g.geometry.values).sum()  # noqa: E731
    assert holes(b) == holes(a) > 0


def test_min_area_merges_small_patches_whatever_the_block(tmp_path, dask_client):
    out, small_blocks = tmp_path / "s.gpkg", tmp_path / "b.gpkg"
    vectorize(LABELS, out, min_area=10_000, client=dask_client)
    vectorize(LABELS, small_blocks, min_area=10_000, block=97, client=dask_client)
    a, b = gpd.read_file(out), gpd.read_file(small_blocks)
    plain_total = sum(_pixel_areas(LABELS).values())
    assert a["area_m2"].sum() == pytest.approx(plain_total, rel=1e-9)  # nothing lost
    assert a["area_m2"].min() >= 10_000
    assert _key(a) == _key(b)
    union = shapely.union_all(a.geometry.values)
    assert union.area == pytest.approx(a.geometry.area.sum(), rel=1e-9)


def test_sieve_takes_the_neighbour_with_the_longest_shared_edge():
    data = np.array(
        [
            [1, 1, 1, 3, 3],
            [1, 2, 1, 3, 3],
            [1, 1, 4, 3, 3],
            [1, 1, 3, 3, 3],
        ],
        dtype=np.uint8,
    )
    valid = np.ones_like(data, dtype=bool)
    # 2 is enclosed by 1; 4 shares two edges with 1 and two with 3: the lower id wins
    assert (sieve(data, valid, 2) == np.where((data == 2) | (data == 4), 1, data)).all()
    # a patch on an edge that continues beyond the array is never taken as small
    cut = data[:, :2]
    assert sieve(cut, valid[:, :2], 2, open_edges=(False, False, False, True))[1, 1] == 2
    assert sieve(cut, valid[:, :2], 2)[1, 1] == 1
    # nodata is no neighbour: a patch bordered only by nodata stays
    lonely = np.array([[0, 0, 0], [0, 7, 0], [0, 0, 0]], dtype=np.uint8)
    assert sieve(lonely, lonely > 0, 5)[1, 1] == 7


def test_shapes_cut_at_block_corners_merge_as_the_whole_raster_gives_them(
    make_raster, tmp_path, dask_client
):
    """Pieces that meet across block edges only at a corner, a ring of one class that touches
    itself at a corner on a block edge, an island in a hole touching its shell at a corner, and a
    checkerboard across a block corner: vertex for vertex what one block gives."""
    data = np.full((192, 192), 1, "uint8")
    data[60:68, 60:68] = 2  # a square across the block corner at (64, 64)...
    data[62:66, 62:66] = 3  # ...with a hole of class 3...
    data[63, 63] = data[64, 64] = 2  # ...holding two 1 px islands that touch its shell
    data[63:65, 63:65] = 3
    data[63, 63] = 2
    data[120:136, 60:70] = 4  # a C of class 4 across the block edge at x = 64...
    data[124:132, 62:70] = 1
    data[123, 63] = 1  # ...whose tips touch at a corner
    data[100:108, 120:136] = np.indices((8, 16)).sum(0) % 2 + 5  # a checkerboard across x = 128
    data[127:129, 127:129] = [[6, 5], [5, 6]]  # diagonal pixels at the corner (128, 128)
    data[0:3, 62:67] = 255  # nodata across a block edge
    path = make_raster("corners.tif", data, nodata=255)
    whole, blocks = tmp_path / "whole.gpkg", tmp_path / "blocks.gpkg"
    one = vectorize(path, whole, block=256, client=dask_client)
    cut = vectorize(path, blocks, block=64, client=dask_client)
    assert one.blocks == 1 and cut.blocks == 9 and cut.polygons == one.polygons
    assert_same_polygons(blocks, whole)
    assert gpd.read_file(blocks).is_valid.all()


def test_areas_are_geodesic_in_a_geographic_crs(make_raster, tmp_path, dask_client):
    from affine import Affine

    data = np.full((1, 40, 60), 1, "uint8")
    data[0, :, 30:] = 2
    data[0, :5, :5] = 255
    t = Affine(0.01, 0, -100.0, 0, -0.01, 41.0)  # about 840 m x 1110 m pixels near 40.8 N
    path = make_raster("g.tif", data, crs="EPSG:4326", transform=t, nodata=255)
    out = tmp_path / "g.gpkg"
    vectorize(path, out, client=dask_client)
    gdf = gpd.read_file(out)
    geod = Geod(ellps="WGS84")

    def cells(cols: range, rows: range) -> float:
        total = 0.0
        for r in rows:
            for c in cols:
                xs = [t.c + t.a * x for x in (c, c + 1, c + 1, c)]
                ys = [t.f + t.e * y for y in (r, r, r + 1, r + 1)]
                total += abs(geod.polygon_area_perimeter(xs, ys)[0])
        return total

    expected_1 = cells(range(30), range(40)) - cells(range(5), range(5))
    expected_2 = cells(range(30, 60), range(40))
    got = gdf.groupby("class_id")["area_m2"].sum()
    assert got[1] == pytest.approx(expected_1, rel=1e-9)
    assert got[2] == pytest.approx(expected_2, rel=1e-9)
    assert got[2] > 3.5e7  # square metres, not square degrees


def test_predict_writes_polygons_in_the_same_run(tmp_path, random_bundle):
    from click.testing import CliRunner

    classes, polygons = tmp_path / "c.tif", tmp_path / "p.parquet"
    r = CliRunner().invoke(
        cli,
        [
            "predict",
            str(random_bundle),
            str(SCENE),
            "-o",
            str(classes),
            "--polygons",
            str(polygons),
            "--min-area",
            "5000",
            "--workers",
            "2",
            "-q",
        ],
        catch_exceptions=False,
    )
    assert r.exit_code == 0, r.output
    assert str(polygons) in r.output
    gdf = gpd.read_parquet(polygons)
    assert gdf["area_m2"].min() >= 5000
    assert gdf["area_m2"].sum() == pytest.approx(sum(_pixel_areas(classes).values()), rel=1e-9)
    assert set(gdf.class_name) <= {"one", "five", "nine"}


def test_bad_rasters_and_formats_are_refused(make_raster, tmp_path, nc_run, dask_client):
    floats = make_raster("f.tif", np.zeros((1, 4, 4), "float32"))
    with pytest.raises(NotARasterError, match="integer class raster"):
        vectorize(floats, tmp_path / "a.gpkg", client=dask_client)
    no_crs = make_raster("n.tif", np.zeros((1, 4, 4), "uint8"), crs=None)
    with pytest.raises(NoCRSError, match="no CRS") as e:
        vectorize(no_crs, tmp_path / "b.gpkg", client=dask_client)
    assert e.value.filename == str(no_crs)
    with pytest.raises(ConfigError, match=r"\.geojson"):
        vectorize(nc_run["classes"], tmp_path / "c.shp", client=dask_client)
    with pytest.raises(ConfigError, match="always WGS84"):
        vectorize(nc_run["classes"], tmp_path / "d.geojson", crs="EPSG:3857", client=dask_client)
    assert not list(tmp_path.glob("[abcd].*")) and not list(tmp_path.glob(".*tmp*"))


@pytest.mark.parametrize("ext", ["gpkg", "geojson", "parquet", "fgb"])
def test_all_nodata_writes_a_valid_empty_file(make_raster, tmp_path, ext, dask_client):
    empty = make_raster("e.tif", np.full((1, 8, 8), 255, "uint8"), nodata=255)
    out = tmp_path / f"e.{ext}"
    with pytest.warns(UserWarning, match="no polygons"):
        assert vectorize(empty, out, client=dask_client).polygons == 0
    assert len(_read(out)) == 0
