import numpy as np
import pytest
import rasterio
from rasterio.features import rasterize
from sklearn.metrics import confusion_matrix

from geoseg.errors import ConfigError, LabelError
from geoseg.io import ClassInfo, read_vector
from geoseg.metrics import evaluate, scores

from .conftest import EAST, LABELS, REGIONS


def _arrays(classes_path):
    with rasterio.open(classes_path) as c, rasterio.open(LABELS) as t:
        return c.read(1), t.read(1), c.transform, c.crs


def _inside(path, shape, transform, crs):
    gdf = read_vector(path, "x", crs)
    return [
        rasterize([(g, 1)], out_shape=shape, transform=transform).astype(bool) for g in gdf.geometry
    ]


def test_confusion_equals_sklearn_overall_and_per_region(nc_run, tmp_path):
    report = evaluate(
        nc_run["classes"],
        LABELS,
        tmp_path / "r.json",
        within=EAST,
        regions=REGIONS,
        block=128,
        workers=2,
    )
    pred, truth, transform, crs = _arrays(nc_run["classes"])
    ids = [c["id"] for c in report["classes"]]
    east = _inside(EAST, pred.shape, transform, crs)[0]
    valid = (pred != 255) & (truth != 0) & east
    expected = confusion_matrix(truth[valid], pred[valid], labels=ids)
    np.testing.assert_array_equal(report["overall"]["confusion_matrix"], expected)
    masks = _inside(REGIONS, pred.shape, transform, crs)
    assert [r["name"] for r in report["regions"]] == [
        "north-west",
        "north-east",
        "south-west",
        "south-east",
    ]
    for region, m in zip(report["regions"], masks):
        exp = confusion_matrix(truth[valid & m], pred[valid & m], labels=ids)
        np.testing.assert_array_equal(region["confusion_matrix"], exp)
    assert (tmp_path / "r.json").exists()


def test_block_size_changes_no_number(nc_run):
    a = evaluate(nc_run["classes"], LABELS, regions=REGIONS, block=100, workers=1)
    b = evaluate(nc_run["classes"], LABELS, regions=REGIONS, block=4096, workers=1)
    assert a == b


def test_scores_by_hand():
    classes = [
        ClassInfo(1, "a", "#000000"),
        ClassInfo(2, "b", "#000000"),
        ClassInfo(3, "c", "#000000"),
    ]
    cm = np.array([[3, 1, 0], [2, 4, 0], [0, 0, 0]])  # class c absent from truth and prediction
    s = scores(cm, classes)
    iou_a, iou_b = 3 / (4 + 5 - 3), 4 / (6 + 5 - 4)
    assert s["per_class"][0]["iou"] == pytest.approx(iou_a, abs=1e-6)
    assert s["per_class"][1]["iou"] == pytest.approx(iou_b, abs=1e-6)
    assert s["per_class"][2]["present"] is False and s["per_class"][2]["iou"] is None
    assert s["miou"] == pytest.approx((iou_a + iou_b) / 2, abs=1e-6)
    assert s["overall_accuracy"] == pytest.approx(0.7)
    pe = (4 * 5 + 6 * 5) / 100
    assert s["kappa"] == pytest.approx((0.7 - pe) / (1 - pe), abs=1e-6)


def test_truth_codes_missing_from_the_class_map_are_listed(nc_run, make_raster):
    with rasterio.open(LABELS) as t:
        truth = t.read(1)
        prof = {"crs": t.crs, "transform": t.transform, "nodata": 0}
    truth = truth.copy()
    truth[200:210, 200:210] = 42
    path = make_raster("t.tif", truth[None], **prof)
    with pytest.raises(LabelError, match=r"codes \[42\].*--ignore 42"):
        evaluate(nc_run["classes"], path, workers=1)
    ok = evaluate(nc_run["classes"], path, ignore=[42], workers=1)
    assert ok["overall"]["pixels"] > 0


def test_region_field_missing_lists_the_fields(nc_run):
    with pytest.raises(ConfigError, match="columns: name"):
        evaluate(nc_run["classes"], LABELS, regions=REGIONS, region_field="county", workers=1)
