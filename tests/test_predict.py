import numpy as np
import rasterio

from geoseg.io import NODATA_CLASS, read_class_metadata
from geoseg.predict import predict_scene

from .conftest import SCENE


def _scene_valid() -> np.ndarray:
    with rasterio.open(SCENE) as src:
        return np.all(src.read() != 0, axis=0)


def test_class_map_is_on_the_scene_grid_with_nodata_and_classes(random_bundle, tmp_path):
    out = tmp_path / "classes.tif"
    result = predict_scene(random_bundle, SCENE, out, block=200, workers=1)
    assert result.path == out and result.blocks == 9
    with rasterio.open(out) as c, rasterio.open(SCENE) as s:
        assert (c.crs, c.transform, c.width, c.height) == (s.crs, s.transform, s.width, s.height)
        assert c.dtypes[0] == "uint8" and c.nodata == NODATA_CLASS
        assert c.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        a = c.read(1)
        assert [x.name for x in read_class_metadata(c)] == ["one", "five", "nine"]
        assert c.colormap(1)[5][:3] == (0, 255, 0)
    valid = _scene_valid()
    np.testing.assert_array_equal(a == NODATA_CLASS, ~valid)
    assert set(np.unique(a[valid])) <= {1, 5, 9}  # the users' codes, not indices
    assert not list(tmp_path.glob(".*"))  # no parts or temporary files left


def test_class_map_does_not_depend_on_block_size_or_workers(random_bundle, tmp_path):
    a_path, b_path = tmp_path / "a.tif", tmp_path / "b.tif"
    predict_scene(random_bundle, SCENE, a_path, block=96, workers=2)
    predict_scene(random_bundle, SCENE, b_path, block=1024, workers=1)
    with rasterio.open(a_path) as a, rasterio.open(b_path) as b:
        np.testing.assert_array_equal(a.read(1), b.read(1))


def test_scene_larger_than_a_block_gets_mode_overviews(random_bundle, tmp_path, make_raster):
    rng = np.random.default_rng(0)
    data = rng.integers(1, 255, size=(6, 1100, 1300), dtype=np.uint8)
    scene = make_raster("big.tif", data, nodata=0)
    out = tmp_path / "big_classes.tif"
    predict_scene(random_bundle, scene, out, window=128, overlap=16, block=1024, workers=2)
    with rasterio.open(out) as c:
        assert c.overviews(1)[:2] == [2, 4]
        ov = c.read(1, out_shape=(550, 650))
        assert set(np.unique(ov)) <= {1, 5, 9, NODATA_CLASS}  # categorical, never averaged
