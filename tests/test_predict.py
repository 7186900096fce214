import os

import numpy as np
import pytest
import rasterio

from geoseg.classes import NODATA
from geoseg.io import read_class_metadata
from geoseg.stages.predict import predict_scene

from .conftest import SCENE, external_cluster


def _scene_valid() -> np.ndarray:
    with rasterio.open(SCENE) as src:
        return np.all(src.read() != 0, axis=0)


def test_class_map_is_on_the_scene_grid_with_nodata_and_classes(
    random_bundle, tmp_path, dask_client
):
    out = tmp_path / "classes.tif"
    result = predict_scene(random_bundle, SCENE, out, window=64, block=200, client=dask_client)
    assert result.path == out and result.blocks == 9
    with rasterio.open(out) as c, rasterio.open(SCENE) as s:
        assert (c.crs, c.transform, c.width, c.height) == (s.crs, s.transform, s.width, s.height)
        assert c.dtypes[0] == "uint8" and c.nodata == NODATA
        assert c.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        a = c.read(1)
        assert [x.name for x in read_class_metadata(c)] == ["one", "five", "nine"]
        assert c.colormap(1)[5][:3] == (0, 255, 0)
    valid = _scene_valid()
    np.testing.assert_array_equal(a == NODATA, ~valid)
    assert set(np.unique(a[valid])) <= {1, 5, 9}  # the users' codes, not indices
    assert not list(tmp_path.glob(".*"))  # no parts or temporary files left


def test_class_map_does_not_depend_on_block_size_or_workers(random_bundle, tmp_path, dask_client):
    from geoseg.tiling import WindowGrid

    a_path, b_path = tmp_path / "a.tif", tmp_path / "b.tif"
    a = predict_scene(random_bundle, SCENE, a_path, window=64, block=96, client=dask_client)
    b = predict_scene(random_bundle, SCENE, b_path, window=64, block=1024, workers=1)
    # trim blending (the overlap covers the field): every window runs once, in one block
    n_windows = WindowGrid(443, 489, 64, 20).n_windows  # the bundle's window and overlap
    assert a.windows_run + a.windows_skipped == n_windows == b.windows_run + b.windows_skipped
    with rasterio.open(a_path) as a, rasterio.open(b_path) as b:
        np.testing.assert_array_equal(a.read(1), b.read(1))


@pytest.mark.parametrize("blend", ["gaussian", "cosine"])
def test_weighted_blends_run_every_window_once_whatever_the_blocks(
    random_bundle, tmp_path, blend, dask_client
):
    """Blocks run only the windows they own and hand the sums that fall on neighbours over,
    so small blocks compute what one block over the whole scene computes, window for window."""
    from geoseg.tiling import WindowGrid

    small, whole = tmp_path / "small.tif", tmp_path / "whole.tif"
    a = predict_scene(
        random_bundle, SCENE, small, window=64, block=96, client=dask_client, blend=blend
    )
    b = predict_scene(random_bundle, SCENE, whole, window=64, block=1024, workers=1, blend=blend)
    n_windows = WindowGrid(443, 489, 64, 20).n_windows  # the bundle's window and overlap
    assert a.windows_run + a.windows_skipped == n_windows == b.windows_run + b.windows_skipped
    assert a.blocks == 30 and b.blocks == 1
    with rasterio.open(small) as x, rasterio.open(whole) as y:
        ca, cb = x.read(1), y.read(1)
    # the sums are added in another order: only exact ties could fall the other way
    assert (ca != cb).sum() <= 3
    assert ((ca == 255) == (cb == 255)).all()


def test_scene_larger_than_a_block_gets_mode_overviews(
    random_bundle, tmp_path, make_raster, dask_client
):
    rng = np.random.default_rng(0)
    data = rng.integers(1, 255, size=(6, 1100, 1300), dtype=np.uint8)
    scene = make_raster("big.tif", data, nodata=0)
    out = tmp_path / "big_classes.tif"
    predict_scene(random_bundle, scene, out, window=128, overlap=20, block=1024, client=dask_client)
    with rasterio.open(out) as c:
        assert c.overviews(1)[:2] == [2, 4]
        ov = c.read(1, out_shape=(550, 650))
        assert set(np.unique(ov)) <= {1, 5, 9, NODATA}  # categorical, never averaged


@pytest.mark.slow
@pytest.mark.parametrize("blend", ["trim", "gaussian", "cosine"])
def test_a_stopped_run_resumes_and_recomputes_only_missing_blocks(
    random_bundle, tmp_path, dask_client, blend
):
    """Kill a real `geoseg predict` (client and workers) mid-run, then run it again; with
    weighted blending too, where blocks hand their neighbours the sums that fall on them."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    out = tmp_path / "classes.tif"
    parts = tmp_path / ".classes.tif.parts"
    cmd = [
        str(Path(sys.executable).parent / "geoseg"),
        "predict",
        str(random_bundle),
        str(SCENE),
        "-o",
        str(out),
        "--window",
        "64",
        "--block",
        "64",
        "--blend",
        blend,
        "--workers",
        "1",
        "-q",
    ]
    proc = subprocess.Popen(cmd, start_new_session=True, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    # a block is done once its record is written, after its part file
    while time.monotonic() < deadline and len(list(parts.glob("block_*.done"))) < 8:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = {p.name for p in parts.glob("block_*.done")}
    assert len(done_before) >= 8 and not out.exists()  # stopped part-way, nothing half-written

    # the window is the stopped run's, found in its parts
    result = predict_scene(random_bundle, SCENE, out, block=64, blend=blend, client=dask_client)
    assert result.resumed == len(done_before)
    assert 0 < result.resumed < result.blocks
    assert not parts.exists()  # cleaned up once complete
    fresh = tmp_path / "fresh.tif"
    predict_scene(random_bundle, SCENE, fresh, window=64, block=64, blend=blend, client=dask_client)
    with rasterio.open(out) as a, rasterio.open(fresh) as b:
        np.testing.assert_array_equal(a.read(1), b.read(1))


def test_parts_from_a_run_with_other_settings_are_not_reused(random_bundle, tmp_path, dask_client):
    out = tmp_path / "c.tif"
    parts = tmp_path / ".c.tif.parts"
    parts.mkdir()
    (parts / "run.json").write_text('{"window": 1}')
    (parts / "block_0_0.tif").write_text("stale")
    result = predict_scene(random_bundle, SCENE, out, block=1024, client=dask_client)
    assert result.resumed == 0 and rasterio.open(out).count == 1


def test_scene_smaller_than_a_window_is_padded(random_bundle, tmp_path, make_raster, dask_client):
    rng = np.random.default_rng(0)
    small = make_raster("small.tif", rng.integers(1, 255, (6, 20, 30), dtype=np.uint8), nodata=0)
    out = tmp_path / "small_classes.tif"
    predict_scene(random_bundle, small, out, client=dask_client)  # window 64 > 20 x 30
    with rasterio.open(out) as c:
        assert c.shape == (20, 30) and set(np.unique(c.read(1))) <= {1, 5, 9}


def test_bf16_and_fp32_agree_almost_everywhere(random_bundle, tmp_path, dask_client):
    maps = {}
    for p in ("fp32", "bf16"):
        out = tmp_path / f"{p}.tif"
        predict_scene(random_bundle, SCENE, out, precision=p, client=dask_client)
        with rasterio.open(out) as c:
            maps[p] = c.read(1)
    valid = maps["fp32"] != NODATA
    agreement = (maps["fp32"] == maps["bf16"])[valid].mean()
    assert agreement > 0.99


@pytest.mark.gpu
@pytest.mark.parametrize("blend", ["trim", "gaussian"])
def test_a_gpu_worker_two_blocks_at_once_gives_the_map_of_one_at_a_time(
    random_bundle, tmp_path, monkeypatch, blend
):
    """On a GPU a worker runs two blocks at once, their models taking turns: the map is the
    one its blocks give one at a time, to the pixel, and the CPU's at fp32 almost everywhere."""
    import geoseg.cluster

    maps = {}
    for blocks in (2, 1):
        monkeypatch.setattr(geoseg.cluster, "GPU_BLOCKS", blocks)
        out = tmp_path / f"gpu{blocks}.tif"
        predict_scene(
            random_bundle, SCENE, out, device="cuda", precision="fp32", block=128, blend=blend
        )
        with rasterio.open(out) as c:
            maps[blocks] = c.read(1)
    out = tmp_path / "cpu.tif"
    predict_scene(random_bundle, SCENE, out, device="cpu", precision="fp32", block=128, blend=blend)
    with rasterio.open(out) as c:
        cpu = c.read(1)
    assert np.array_equal(maps[2], maps[1])
    valid = cpu != NODATA
    assert (maps[2] == cpu)[valid].mean() > 0.99  # cuDNN may use TF32 at "fp32"


def test_bad_prediction_inputs(random_bundle, tmp_path, make_raster, dask_client):
    import shutil

    from geoseg.errors import ConfigError, NoCRSError, NotARasterError

    rng = np.random.default_rng(0)
    data = rng.integers(1, 255, (6, 64, 64), dtype=np.uint8)
    with pytest.raises(NoCRSError, match=r"no CRS.*pass allow_no_crs=True") as no_crs:
        predict_scene(
            random_bundle,
            make_raster("nocrs.tif", data, crs=None),
            tmp_path / "a.tif",
            client=dask_client,
        )
    # a Python caller is told the keyword, and the error carries the file
    assert no_crs.value.filename == str(tmp_path / "nocrs.tif")
    assert not isinstance(no_crs.value, NotARasterError) and "--allow" not in str(no_crs.value)
    with pytest.raises(ConfigError, match="less than the window"):
        predict_scene(
            random_bundle, SCENE, tmp_path / "b.tif", window=64, overlap=64, client=dask_client
        )
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if not os.access(locked, os.W_OK):  # root may write anywhere
            with pytest.raises(ConfigError, match="cannot write"):
                predict_scene(random_bundle, SCENE, locked / "c.tif", client=dask_client)
    finally:
        locked.chmod(0o700)
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            predict_scene(random_bundle, SCENE, tmp_path / "d.tif", device="cuda", workers=1)
    # a truncated file: the header opens, the pixels do not
    tiled = make_raster(
        "big.tif",
        rng.integers(1, 255, (6, 512, 512), dtype=np.uint8),
        tiled=True,
        blockxsize=128,
        blockysize=128,
        compress="deflate",
    )
    cut = tmp_path / "cut.tif"
    shutil.copy(tiled, cut)
    with open(cut, "r+b") as f:
        f.truncate(cut.stat().st_size // 2)
    with pytest.raises(NotARasterError, match="truncated or damaged"):
        predict_scene(random_bundle, cut, tmp_path / "e.tif", client=dask_client)
    assert not list(tmp_path.glob("[a-e].tif"))


def _disagreement_at_window_edges(bundle, tmp_path, blend, dask_client):
    from geoseg import load_bundle
    from geoseg.stages.predict import default_overlap
    from geoseg.tiling import WindowGrid

    window = 64
    tiled, whole = tmp_path / f"tiled_{blend}.tif", tmp_path / f"whole_{blend}.tif"
    predict_scene(
        bundle,
        SCENE,
        tiled,
        window=window,
        blend=blend,
        precision="fp32",
        client=dask_client,
        overwrite=True,
    )
    # one window over the whole scene: every pixel with all the context the scene has
    predict_scene(
        bundle,
        SCENE,
        whole,
        window=512,
        overlap=0,
        precision="fp32",
        client=dask_client,
        overwrite=True,
    )
    with rasterio.open(tiled) as a, rasterio.open(whole) as b:
        t, w = a.read(1), b.read(1)
    grid = WindowGrid(*t.shape, window, default_overlap(load_bundle(bundle), window))
    edge = np.zeros(t.shape, dtype=bool)
    for s in grid.row_starts:
        for e in (s, s + window):
            edge[max(0, e - 2) : e + 2] = True
    for s in grid.col_starts:
        for e in (s, s + window):
            edge[:, max(0, e - 2) : e + 2] = True
    valid = t != NODATA
    differ = (t != w) & valid
    return differ[edge & valid].mean(), differ[~edge & valid].mean()


def test_no_seams_at_window_edges(nc_run, tmp_path, dask_client):
    # the default (trim: the overlap covers the receptive field) equals one whole-scene window
    at_edges, elsewhere = _disagreement_at_window_edges(
        nc_run["bundle"], tmp_path, "auto", dask_client
    )
    assert at_edges <= elsewhere and at_edges < 0.001
    # equal weights leave seams, and the test sees them
    raw_edges, raw_elsewhere = _disagreement_at_window_edges(
        nc_run["bundle"], tmp_path, "none", dask_client
    )
    assert raw_edges > raw_elsewhere and raw_edges > 0.01


def test_several_scenes_in_one_graph_with_probabilities_and_a_gdal_url(
    random_bundle, tmp_path, dask_client
):
    import zipfile

    from geoseg.errors import ConfigError
    from geoseg.stages.predict import predict_scenes

    archive = tmp_path / "scenes.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.write(SCENE, "nc_copy.tif")
    url = f"/vsizip/{archive}/nc_copy.tif"  # a GDAL URL, read by the workers through GDAL
    out = tmp_path / "maps"
    results = predict_scenes(
        random_bundle, [SCENE, url], out, block=256, probabilities=True, client=dask_client
    )
    assert [r.path.name for r in results] == ["nc_landsat7_2000.tif", "nc_copy.tif"]
    with rasterio.open(results[0].path) as a, rasterio.open(results[1].path) as b:
        classes = a.read(1)
        np.testing.assert_array_equal(classes, b.read(1))
    with rasterio.open(results[0].probabilities) as p:
        probs = p.read()
        assert p.count == 3 and p.descriptions[1].startswith("five")
    valid = classes != NODATA
    np.testing.assert_array_equal(probs[:, ~valid], NODATA)
    total = probs[:, valid].astype(int).sum(0)
    assert np.abs(total - 254).max() <= 2  # probabilities sum to one, up to rounding
    ids = np.array([1, 5, 9])
    assert (ids[probs[:, valid].argmax(0)] == classes[valid]).mean() > 0.99
    with pytest.raises(ConfigError, match="need an output folder"):
        predict_scenes(random_bundle, [SCENE, url], tmp_path / "one.tif", client=dask_client)


def test_nebraska_stripes_of_nodata_in_a_geographic_crs(tmp_path, dask_client):
    from .conftest import make_random_bundle, shared

    scene = shared("large-scenes/nebraska_landsat5_with_nodata_wgs84.tif")
    bundle = make_random_bundle(tmp_path / "one_band.bundle", 1, 8000.0, 3000.0)
    out = tmp_path / "nebraska.tif"
    result = predict_scene(bundle, scene, out, block=1024, window=128, client=dask_client)
    with rasterio.open(scene) as s, rasterio.open(out) as c:
        assert c.crs == s.crs and c.crs.is_geographic and c.transform == s.transform
        nodata = s.read_masks(1) == 0
        np.testing.assert_array_equal(c.read(1) == NODATA, nodata)
    assert 0.5 < nodata.mean() < 0.7  # the scene's 59 % nodata in stripes
    assert result.windows_skipped > 0  # all-nodata windows never reach the model


def test_default_block_gives_every_local_worker_two_blocks(make_raster, monkeypatch):
    from geoseg.io import read_profile
    from geoseg.stages.predict import default_block

    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    big = read_profile(make_raster("big.tif", np.zeros((1, 2048, 2048), "uint8")))
    assert default_block([big], 2, None) == 1024  # 4 blocks for 2 workers
    assert default_block([big], 1, None) == 1536  # 2 blocks: 1449 px rounded up to 256s
    assert default_block([read_profile(SCENE)], 2, None) == 256
    with external_cluster(2) as (address, _):  # an existing cluster's workers are counted
        assert default_block([big], None, address) == 1024


def test_the_effective_overlap_is_measured_at_training_and_offered(
    nc_run, random_bundle, tmp_path, dask_client, caplog
):
    """Training measures the smallest overlap at which tiles change fewer than 0.05 % of the
    pixels of a held-out crop; `--overlap effective` predicts with it, at fewer windows, and
    its map agrees with the exact one almost everywhere."""
    import logging

    from geoseg import load_bundle
    from geoseg.errors import ConfigError
    from geoseg.stages.predict import default_overlap

    b = load_bundle(nc_run["bundle"])
    measured = b.contract.training["effective_overlap"]
    effective = b.contract.effective_overlap
    exact = default_overlap(b, 64)
    step = int(getattr(b.model, "stride", 1))
    # without a validation split (as here), the crop is the middle of the scene
    assert measured["held_out"] is False and effective is not None
    assert effective % step == 0 and effective < exact
    shares = {int(k): v for k, v in measured["differing_share"].items()}
    assert shares[effective] < 5e-4
    assert all(v >= 5e-4 for k, v in shares.items() if k < effective)  # the smallest that does
    with caplog.at_level(logging.INFO, logger="geoseg"):
        eff = predict_scene(
            nc_run["bundle"], SCENE, tmp_path / "e.tif", window=64, overlap="effective",
            client=dask_client,
        )  # fmt: skip
    assert f"overlap {effective} (effective, measured at training; exact {exact})" in caplog.text
    full = predict_scene(
        nc_run["bundle"], SCENE, tmp_path / "x.tif", window=64, overlap="exact",
        client=dask_client,
    )  # fmt: skip
    assert eff.windows_run < full.windows_run
    with rasterio.open(tmp_path / "e.tif") as a, rasterio.open(tmp_path / "x.tif") as x:
        assert np.mean(a.read(1) != x.read(1)) < 0.005
    with pytest.raises(ConfigError, match="no measured effective overlap"):
        predict_scene(random_bundle, SCENE, tmp_path / "r.tif", overlap="effective")
    with pytest.raises(ConfigError, match="exact or effective"):
        predict_scene(nc_run["bundle"], SCENE, tmp_path / "r.tif", overlap="wide")


@pytest.mark.parametrize("tta", ["flips", "d4"])
def test_test_time_augmentation_averages_the_turned_windows(random_bundle, tmp_path, tta):
    """The probabilities of --tta are the mean of the model's over the flips and turns of the
    window, turned back: computed here by hand with numpy from the model's own outputs."""
    import torch

    from geoseg.bundle import load_bundle
    from geoseg.tasks.predict import _forward

    b = load_bundle(random_bundle)
    x = np.random.default_rng(0).normal(size=(2, 6, 64, 64)).astype(np.float32)
    turns = [np.rot90(x if not f else x[..., ::-1], q, axes=(-2, -1)) for q, f in _by_hand(tta)]
    with torch.inference_mode():
        outs = [b.model(torch.from_numpy(v.copy())).softmax(1).numpy() for v in turns]
    back = [
        (lambda p: p[..., ::-1] if f else p)(np.rot90(o, -q, axes=(-2, -1)))
        for o, (q, f) in zip(outs, _by_hand(tta))
    ]
    expected = np.mean(back, axis=0)
    with torch.inference_mode():
        got = _forward(b, torch.from_numpy(x), "cpu", "fp32", tta).softmax(1).numpy()
        plain = _forward(b, torch.from_numpy(x), "cpu", "fp32").softmax(1).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert np.abs(plain - expected).max() > 1e-3  # the random model is not flip-invariant


def _read(path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read()


def _by_hand(tta: str) -> list[tuple[int, bool]]:
    if tta == "flips":
        return [(0, False), (0, True), (2, False), (2, True)]
    return [(q, f) for q in range(4) for f in (False, True)]


def test_test_time_augmentation_on_the_command_line_is_tagged_and_tiles_seamlessly(
    random_bundle, tmp_path, dask_client
):
    from geoseg.provenance import item_path
    from geoseg.stages.predict import probabilities_path

    a, b, plain = tmp_path / "a.tif", tmp_path / "b.tif", tmp_path / "plain.tif"
    kw = {"window": 64, "probabilities": True, "client": dask_client}
    ra = predict_scene(random_bundle, SCENE, a, block=96, tta="d4", **kw)
    predict_scene(random_bundle, SCENE, b, block=1024, tta="d4", **kw)
    predict_scene(random_bundle, SCENE, plain, block=1024, **kw)
    with rasterio.open(a) as ra_, rasterio.open(b) as rb, rasterio.open(plain) as rp:
        assert ra_.tags()["GEOSEG_TTA"] == "d4" and rp.tags()["GEOSEG_TTA"] == "none"
        np.testing.assert_array_equal(ra_.read(1), rb.read(1))  # blocks change nothing
    pa, pb, pp = (_read(probabilities_path(p)) for p in (a, b, plain))
    np.testing.assert_array_equal(pa, pb)
    assert np.abs(pa.astype(int) - pp).max() > 2  # and they are not the plain probabilities
    assert '"tta": "d4"' in item_path(a).read_text().replace("'", '"')
    assert ra.windows_run > 0
    with pytest.raises(Exception, match="tta"):
        predict_scene(random_bundle, SCENE, tmp_path / "x.tif", tta="d8", client=dask_client)


@pytest.mark.parametrize("args", [["--blend", "gaussian"], ["--blend", "none", "--tta", "flips"]])
def test_weighted_blending_warns_the_user_of_nothing(random_bundle, tmp_path, args):
    """A weighted blend ran the model without a word of its own, yet the command printed
    torch's "The given NumPy array is not writable ..." (the blend's weights, a read-only
    array, given to torch). torch says it once per process: a fresh command shows it."""
    import subprocess
    import sys
    from pathlib import Path

    geoseg = str(Path(sys.executable).with_name("geoseg"))
    out = tmp_path / "c.tif"
    cmd = [geoseg, "predict", str(random_bundle), str(SCENE), "-o", str(out), "--window", "64"]
    r = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "warning" not in r.stderr.lower(), r.stderr
    assert out.exists()


def test_a_window_larger_than_the_scene_is_cut_to_one_that_holds_it(
    random_bundle, tmp_path, dask_client, caplog
):
    """``--window 4096`` on the 489 x 443 NC scene ran the model on one 4096² window, 77 times
    the scene's pixels (12.9 s against 0.1 s with a small model here): the window is cut to the
    smallest one, on the model's stride, that holds the scene, and the plan line says why the
    overlap no longer matters."""
    import logging

    from geoseg.bundle import load_bundle

    step = load_bundle(random_bundle).model.stride
    big, tiled = tmp_path / "big.tif", tmp_path / "tiled.tif"
    with caplog.at_level(logging.INFO, logger="geoseg"):
        r = predict_scene(
            random_bundle, SCENE, big, window=4096, precision="fp32", client=dask_client
        )
    assert r.window == -(-489 // step) * step < 512 and r.windows_run == 1
    assert f"window 4096 px is larger than the scene: predicting with {r.window} px" in caplog.text
    assert "a window holds each scene whole" in caplog.text
    # the map of windows that tile the scene at the exact overlap: the same, to the bf16-free bit
    predict_scene(random_bundle, SCENE, tiled, window=64, precision="fp32", client=dask_client)
    with rasterio.open(big) as a, rasterio.open(tiled) as b:
        x, y = a.read(1), b.read(1)
    valid = x != NODATA
    assert (x[valid] != y[valid]).mean() < 0.001


def test_the_plan_line_says_an_overlap_was_given(random_bundle, tmp_path, dask_client, caplog):
    """``--overlap 10`` was reported as "the bundle's 20, capped ..., raised so the stride is a
    multiple of the model's stride": an overlap the user gave is said to be theirs."""
    import logging

    seams = pytest.warns(UserWarning, match="less than the model's receptive field")
    with caplog.at_level(logging.INFO, logger="geoseg"), seams:
        predict_scene(random_bundle, SCENE, tmp_path / "c.tif", window=64, overlap=12,
                      client=dask_client)  # fmt: skip
    [line] = [m for m in caplog.messages if m.startswith("predict ")]
    assert "overlap 12 (as given; exact " in line and "the bundle's" not in line


def test_a_scene_one_window_holds_is_not_blended(random_bundle, tmp_path, dask_client, caplog):
    """A 30 px scene and a model whose receptive field is 20 px: the window cut to the scene
    has room for an overlap of 15 only, which made the blend Gaussian (sums of one window's
    probabilities, weighted, on the slower path) where nothing is blended."""
    import logging

    from rasterio.windows import Window

    crop = tmp_path / "crop.tif"
    with rasterio.open(SCENE) as src:
        w = Window(200, 200, 30, 30)
        profile = {**src.profile, "width": 30, "height": 30, "transform": src.window_transform(w)}
        profile.update(tiled=False, blockxsize=None, blockysize=None)
        with rasterio.open(crop, "w", **{k: v for k, v in profile.items() if v is not None}) as d:
            d.write(src.read(window=w))
    with caplog.at_level(logging.INFO, logger="geoseg"):
        r = predict_scene(random_bundle, crop, tmp_path / "c.tif", window=64, client=dask_client)
    [line] = [m for m in caplog.messages if m.startswith("predict ")]
    assert r.window == 30 and line.endswith("blend trim"), line


def test_a_scene_run_in_this_process_offers_no_dashboard_it_does_not_have(
    random_bundle, tmp_path, geoseg_log
):
    """A small scene's run in the calling process said "Dask dashboard:
    http://HOST:8787/status", a page that answered 404 (its cluster has no dashboard), and its
    web server took port 8787 from any Dask dashboard started beside it."""
    from distributed import get_client

    ports = []

    def note_port(message: str) -> None:
        if message.startswith("predict "):  # the run's cluster is up by then
            ports.append(get_client().scheduler_info()["services"].get("dashboard"))

    geoseg_log.hooks.append(note_port)
    predict_scene(random_bundle, SCENE, tmp_path / "c.tif", window=64)
    said = geoseg_log.messages
    assert any(m.startswith("small enough to run in this process") for m in said), said
    assert not any("dashboard" in m for m in said), said
    assert ports and ports[0] != 8787  # its web server took a free port
