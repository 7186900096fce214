import json

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.windows import Window

from geoseg.errors import (
    GridMismatchError,
    InputNotFoundError,
    NotARasterError,
    OutputError,
    OutputExistsError,
)
from geoseg.io import (
    Grid,
    atomic_output,
    check_same_grid,
    open_raster,
    read_profile,
    read_scene,
    read_window,
    standardize,
)

from .conftest import LABELS, SCENE


def test_read_window_marks_nodata_and_outside_pixels_invalid(make_raster):
    data = np.arange(2 * 10 * 12, dtype="uint16").reshape(2, 10, 12) + 1
    data[1, 3, 4] = 0  # nodata in one band only: the pixel is invalid
    path = make_raster("s.tif", data, nodata=0)
    with rasterio.open(path) as src:
        d, valid = read_window(src, Window(-2, -1, 8, 6))
    assert d.shape == (2, 6, 8) and d.dtype == np.float32
    assert not valid[0].any() and not valid[:, :2].any()  # outside the scene
    assert not valid[4, 6]  # scene pixel (3, 4), nodata in band 2
    assert valid[1:, 2:].sum() == 5 * 6 - 1
    with rasterio.open(path) as src:
        d, valid = read_window(src, Window(0, 0, 12, 10))
    assert not valid[3, 4] and valid.sum() == 119
    np.testing.assert_array_equal(d, data.astype(np.float32))


@pytest.mark.parametrize("kind", ["nodata", "no nodata", "internal mask", "float nan"])
def test_read_window_past_the_edge_reads_what_a_boundless_read_does(make_raster, kind):
    """Blocks at a scene's edge read only the part inside (no VRT): the values and validity
    must be those of rasterio's boundless read, for every way a file marks its nodata."""
    rng = np.random.default_rng(3)
    data = rng.integers(1, 500, size=(3, 20, 17)).astype("uint16")
    profile: dict = {}
    if kind == "nodata":
        data[1, 4, 5] = 7
        profile["nodata"] = 7
    elif kind == "float nan":
        data = data.astype("float32")
        data[0, 2, 3] = np.nan
        profile["nodata"] = float("nan")
    path = make_raster("s.tif", data, **profile)
    if kind == "internal mask":
        with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(path, "r+") as dst:
            mask = np.full((20, 17), 255, dtype="uint8")
            mask[6:9, 2:4] = 0
            dst.write_mask(mask)
    windows = [Window(-3, -4, 10, 9), Window(10, 15, 12, 8), Window(-5, -5, 30, 30),
               Window(17, 0, 4, 4), Window(2, 3, 5, 5)]  # fmt: skip
    with rasterio.open(path) as src:
        for w in windows:
            d, valid = read_window(src, w)
            ref = src.read(window=w, boundless=True).astype(np.float32)
            masks = src.read_masks(window=w, boundless=True)
            r, c = np.mgrid[: int(w.height), : int(w.width)]
            inside = (r + w.row_off >= 0) & (r + w.row_off < 20)
            inside &= (c + w.col_off >= 0) & (c + w.col_off < 17)
            want = inside & np.all(masks > 0, axis=0) & np.all(np.isfinite(ref), axis=0)
            np.testing.assert_array_equal(valid, want)
            np.testing.assert_array_equal(d[:, valid], ref[:, valid])


def test_read_window_nodata_override_for_undeclared_fill(make_raster):
    data = np.ones((1, 4, 4), dtype="uint16")
    data[0, 0, 0] = 0
    path = make_raster("s.tif", data)  # no nodata declared
    with rasterio.open(path) as src:
        assert read_window(src, Window(0, 0, 4, 4))[1].all()
        assert read_window(src, Window(0, 0, 4, 4), nodata=0)[1].sum() == 15


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "float32", "float64"])
def test_standardize_scales_each_band_and_zeroes_invalid_pixels(dtype):
    # the model's input at training and prediction: (x - mean) / std per band, 0 where invalid
    rng = np.random.default_rng(0)
    data = rng.integers(1, 200, (3, 40, 50)).astype(dtype)
    valid = rng.random((40, 50)) > 0.3
    mean, std = [10.0, 50.0, 120.0], [2.0, 8.0, 40.0]
    expected = (data.astype(np.float64) - np.array(mean)[:, None, None]) / np.array(std)[
        :, None, None
    ]
    expected[:, ~valid] = 0
    for inplace in (False, True):
        given = data.copy()
        out = standardize(given, valid, mean, std, inplace=inplace)
        assert out.dtype == np.float32
        np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
        assert (out is given) == (inplace and dtype == "float32")
    # a float32 view that is not contiguous is not written over: a new array, still right
    wide = np.zeros((3, 40, 100), np.float32)
    wide[:, :, ::2] = data
    out = standardize(wide[:, :, ::2], valid, mean, std, inplace=True)
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
    assert not np.shares_memory(out, wide)


def test_atomic_output_leaves_nothing_behind_on_error(tmp_path):
    target = tmp_path / "out.tif"
    with pytest.raises(RuntimeError), atomic_output(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_output_refuses_existing_unless_overwrite(tmp_path):
    target = tmp_path / "out.md"
    target.write_text("# geoseg evaluation\nold")  # a report geoseg wrote
    with pytest.raises(OutputExistsError, match="overwrite=True") as e, atomic_output(target):
        pass
    assert e.value.filename == str(target) and "--overwrite" not in str(e.value)
    with atomic_output(target, overwrite=True) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and len(list(tmp_path.iterdir())) == 1
    theirs = tmp_path / "theirs.md"  # a file geoseg did not write is never replaced
    theirs.write_text("mine")
    with (
        pytest.raises(OutputError, match="not a file geoseg wrote"),
        atomic_output(theirs, overwrite=True) as tmp,
    ):
        tmp.write_text("new")
    assert theirs.read_text() == "mine"


def test_missing_and_non_raster_inputs_are_named(tmp_path):
    with pytest.raises(InputNotFoundError, match=r"nope\.tif"):
        open_raster(tmp_path / "nope.tif")
    bad = tmp_path / "bad.tif"
    bad.write_text("not a raster")
    with pytest.raises(NotARasterError, match="not a raster"):
        open_raster(bad)


def test_nad83_and_harn_labels_share_the_scene_grid():
    # the NC labels are EPSG:3358 on the EPSG:32119-like grid of the scene: sub-metre apart
    scene, labels = read_profile(SCENE), read_profile(LABELS)
    assert scene.crs.to_wkt() != labels.crs.to_wkt()
    check_same_grid(scene, labels, "labels")


def test_grid_mismatch_is_explained(make_raster):
    scene = read_profile(SCENE)
    shifted = make_raster(
        "l.tif",
        np.zeros((1, scene.height, scene.width), "uint8"),
        crs=scene.crs,
        transform=scene.transform * Affine.translation(3, 0),
    )
    with pytest.raises(GridMismatchError, match="not on the scene's grid"):
        check_same_grid(scene, read_profile(shifted), "labels")
    other_crs = make_raster(
        "g.tif",
        np.zeros((1, scene.height, scene.width), "uint8"),
        crs="EPSG:32617",
        transform=scene.transform,
    )
    with pytest.raises(GridMismatchError, match="EPSG:32617"):
        check_same_grid(scene, read_profile(other_crs), "labels")


def test_read_window_sees_a_negative_nodata_value(make_raster):
    # a fill value that is not 0 must survive the read (rasterio's fill_value would hide it)
    data = np.full((1, 6, 6), 500, dtype="int16")
    data[0, :, :2] = -9999
    path = make_raster("neg.tif", data, nodata=-9999)
    with rasterio.open(path) as src:
        d, valid = read_window(src, Window(0, 0, 6, 6))
        assert valid.sum() == 24 and not valid[:, :2].any() and (d[0, :, :2] == -9999).all()
        d, valid = read_window(src, Window(-2, 0, 6, 6))  # boundless as well
        assert valid.sum() == 12 and (d[0][valid] == 500).all()


def test_hints_name_options_as_the_caller_sets_them():
    from geoseg.errors import command_line, option

    assert option("--overwrite") == "overwrite=True"
    assert option("--ignore", [1, 2]) == "ignore=[1, 2]"
    assert option("--class-map", None) == "code_map"  # the Python keyword, not the flag's name
    with command_line():
        assert option("--overwrite") == "--overwrite"
        assert option("--ignore", [1, 2]) == "--ignore 1,2"
        assert option("--class-map", None) == "--class-map"
    assert option("--block", 256) == "block=256"  # outside the command line again


def test_the_epsg_code_of_a_crs_without_one_is_found_once_and_kept(tmp_path, monkeypatch):
    """The NC scene's CRS names no code; GDAL identifies it (EPSG 32119) in about 60 ms that
    hold the GIL, so the answer is kept in geoseg's cache folder for the next run. A damaged
    cache is only a cache."""
    import rasterio.crs

    from geoseg import provenance

    monkeypatch.setenv("GEOSEG_CACHE", str(tmp_path))
    with rasterio.open(SCENE) as src:
        crs = src.crs
    provenance._epsg_of_wkt.cache_clear()
    assert provenance.epsg_code(crs) == 32119
    assert list(json.loads((tmp_path / "epsg.json").read_text()).values()) == [32119]
    provenance._epsg_of_wkt.cache_clear()  # a new process: the file answers, not GDAL

    class NoLookup:
        @staticmethod
        def from_wkt(wkt: str) -> None:
            raise AssertionError("looked up again")

    monkeypatch.setattr(rasterio.crs, "CRS", NoLookup)
    assert provenance.epsg_code(crs) == 32119
    monkeypatch.undo()
    monkeypatch.setenv("GEOSEG_CACHE", str(tmp_path))
    (tmp_path / "epsg.json").write_text("{not json")
    provenance._epsg_of_wkt.cache_clear()
    assert provenance.epsg_code(crs) == 32119
    provenance._epsg_of_wkt.cache_clear()


@pytest.mark.parametrize("warped", [False, True], ids=["own grid", "warped onto another"])
def test_a_block_read_in_several_threads_is_the_same_block(warped):
    """A GPU worker has GDAL decode a block's tiles in several threads: the values and the
    validity are those of one thread's read, past the scene's edges and where the scene is
    warped onto another grid too."""
    scene = read_profile(SCENE)  # 443 x 489 px in tiles of 256, nodata 0
    onto = None
    if warped:  # a finer grid, shifted by a fraction of a pixel
        g = scene.grid
        fine = g.transform * Affine.translation(0.3, 0.3) * Affine.scale(0.8)
        onto = Grid(g.crs, fine, int(g.width * 1.25), int(g.height * 1.25))
    window = Window(-40, 100, 560, 480)  # past the left, right and bottom edges
    one = read_scene(scene, window, range(1, 7), 0, onto=onto)
    several = read_scene(scene, window, range(1, 7), 0, onto=onto, threads=4)
    np.testing.assert_array_equal(several[0], one[0])
    np.testing.assert_array_equal(several[1], one[1])
    assert one[1].any() and not one[1].all()
