"""The prediction window chosen for throughput (``--window auto``, the default): the count it
makes, the measurement on a worker, its cache, and what a resumed run keeps."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio

from geoseg.tiling import WindowGrid
from geoseg.tuning import Rate, cache_path, cached_rates, choose, measured_windows, windows_needed
from tests.conftest import SCENE
from tests.test_cli import assert_one_line_error, invoke

# speeds shaped like the default U-Net's on a 2-core CPU (benchmarks/README.md): per pixel the
# model slows as the window grows
CPU_LIKE = [Rate(256, 4, 1.09e6), Rate(512, 1, 0.98e6), Rate(1024, 1, 0.72e6)]


def test_windows_needed_is_the_window_grid_of_each_scene():
    for h, w, win, ovl in ((443, 489, 64, 20), (4096, 4096, 512, 120), (608, 608, 640, 120)):
        assert windows_needed([(h, w)], win, ovl) == WindowGrid(h, w, win, ovl).n_windows
    assert windows_needed([(443, 489), (100, 100)], 64, 20) == (
        WindowGrid(443, 489, 64, 20).n_windows + WindowGrid(100, 100, 64, 20).n_windows
    )


def test_a_large_scene_gets_the_window_with_the_least_model_time():
    """Counted by hand for a 4096 px scene, overlap 120: 256 px runs 30² windows at 1.09 Mpx/s
    (about 54 s), 512 px 11² at 0.98 (32 s), 1024 px 5² at 0.72 (36 s)."""
    choice = choose(CPU_LIKE, [(4096, 4096)], overlap_for=lambda w: 120, slots=1)
    seconds = {
        w: windows_needed([(4096, 4096)], w, 120) * w * w / r
        for w, r in ((256, 1.09e6), (512, 0.98e6), (1024, 0.72e6))
    }
    assert min(seconds, key=seconds.__getitem__) == 512
    # an interpolated window may beat the measured ones; never by choosing one that costs more
    assert choice.seconds <= seconds[512] + 1e-9 and 448 <= choice.window <= 768
    assert choice.batch >= 1 and choice.windows == windows_needed(
        [(4096, 4096)], choice.window, 120
    )


def test_a_small_scene_gets_one_window_that_holds_it_not_four():
    """A 608 px crop (as in a mosaic of 16): at 512 px it needs four windows, at 640 one."""
    choice = choose(CPU_LIKE, [(608, 608)], overlap_for=lambda w: 120, slots=1)
    assert choice.windows == 1 and 608 <= choice.window <= 704


def test_a_scene_smaller_than_every_measured_window_gets_a_window_of_its_size():
    """A 100 px scene: the smallest measured window (256 px) is 85 % padding, 6.5x the model
    time of the 112 px window (a multiple of the model's stride 16) that holds it; that one is
    costed at the smallest measured window's speed."""
    choice = choose(
        CPU_LIKE, [(100, 100)], overlap_for=lambda w: min(120, w // 2), slots=1, step=16
    )
    assert (choice.window, choice.windows) == (112, 1)
    assert choice.batch >= 1 and choice.seconds == pytest.approx(112 * 112 / 1.09e6)


def test_no_window_larger_than_the_one_that_holds_the_scene():
    """A 500 px scene, overlap 120, one worker: one 504 px window (the model's stride 8) holds
    it; 512 px, the measured window that holds it, costs 3 % more for the same one window."""
    choice = choose(CPU_LIKE, [(500, 500)], overlap_for=lambda w: 120, slots=1, step=8)
    assert (choice.window, choice.windows) == (504, 1)


def test_more_workers_than_windows_favour_smaller_windows():
    """One 1024 px window keeps one of eight workers busy; 512 px windows keep four."""
    flat = [Rate(256, 4, 1e6), Rate(512, 1, 1e6), Rate(1024, 1, 1e6)]
    one = choose(flat, [(1000, 1000)], overlap_for=lambda w: 64, slots=1)
    eight = choose(flat, [(1000, 1000)], overlap_for=lambda w: 64, slots=8)
    assert one.windows == 1 and eight.window < one.window and eight.seconds < one.seconds


def test_windows_measured_stop_at_the_one_that_holds_the_largest_scene():
    assert measured_windows([(443, 489)], 20) == [256, 384, 512]
    assert measured_windows([(4096, 4096)], 120) == [256, 384, 512, 768, 1024, 1536, 2048]
    assert measured_windows([(4096, 4096)], 150) == [384, 512, 768, 1024, 1536, 2048]
    assert measured_windows([(443, 489)], 1500) == [2048]  # none twice the overlap
    assert measured_windows([(443, 489)], 2048) == []


def _wide_classes(batch: np.ndarray) -> np.ndarray:
    """A stand-in model whose every pixel sees a 33 px square around it (zero padding at the
    window's edges, as a network's layers have): the sign of its mean."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(batch[:, :1], dtype=np.float32))
    pooled = torch.nn.functional.avg_pool2d(x, 33, stride=1, padding=16)
    return (pooled[:, 0] > 0).numpy().astype(np.int64)


def test_the_effective_overlap_is_not_made_up_on_a_scene_too_small_for_a_seam():
    """A 50 px training scene reported "effective overlap 0 px": the measuring window held the
    whole crop, so no seam was ever made and any overlap looked enough; ``--overlap
    effective`` would then tile a large scene with none. A crop whose middle holds no window
    edge gives no figure."""
    from geoseg.tuning import effective_overlap

    rng = np.random.default_rng(0)
    small = rng.standard_normal((1, 50, 50)).astype(np.float32)
    assert effective_overlap(_wide_classes, small, 256, 1, 34).overlap is None
    # where seams fall inside the crop it is found as before: 32, a 16 px half-field each side
    # of the middle of the overlap, where trim cuts
    large = rng.standard_normal((1, 256, 256)).astype(np.float32)
    assert effective_overlap(_wide_classes, large, 128, 1, 34).overlap == 32
    # the NC scene's crop (443 x 489) at the bundle's 256 px window, margins of the default
    # U-Net's exact overlap (120): the middle is narrower than a window, yet the window edges
    # the overlaps tried put there fall inside it
    nc_like = rng.standard_normal((1, 443, 489)).astype(np.float32)
    assert effective_overlap(_wide_classes, nc_like, 256, 8, 120).overlap == 32


def test_window_auto_measures_on_a_worker_once_and_keeps_the_speeds(
    random_bundle, tmp_path, dask_client, monkeypatch, caplog
):
    """The first call measures the model on a worker and caches its speeds; the next reads
    them (the cache is not written again) and picks the same window: the one the count gives
    for the cached speeds, reported in the plan."""
    import logging

    from geoseg.stages.predict import default_overlap, predict_scene

    cache = tmp_path / "cache"
    monkeypatch.setenv("GEOSEG_CACHE", str(cache))
    # the workers of the shared cluster read the cache folder from their own environment
    dask_client.run(lambda: __import__("os").environ.__setitem__("GEOSEG_CACHE", str(cache)))
    try:
        with caplog.at_level(logging.INFO, logger="geoseg"):
            a = predict_scene(random_bundle, SCENE, tmp_path / "a.tif", client=dask_client)
        entries = json.loads(cache_path().read_text())
        assert len(entries) == 1
        [key] = entries
        tried = cached_rates(cache_path(), key)
        # up to one that holds the scene; those not worth measuring are kept as tried (0)
        assert {r.window for r in tried} == {256, 384, 512}
        rates = [r for r in tried if r.px_per_s > 0]
        assert 256 in {r.window for r in rates}
        stamp = cache_path().stat().st_mtime_ns
        b = predict_scene(random_bundle, SCENE, tmp_path / "b.tif", client=dask_client)
        assert cache_path().stat().st_mtime_ns == stamp  # read, not measured again
    finally:
        dask_client.run(lambda: __import__("os").environ.pop("GEOSEG_CACHE", None))
    from geoseg.bundle import load_bundle

    bundle = load_bundle(random_bundle)
    expected = choose(
        rates, [(443, 489)], overlap_for=lambda w: default_overlap(bundle, w), slots=2
    )
    assert a.window == b.window == expected.window
    assert f"window auto: {expected.window} px" in caplog.text
    with rasterio.open(a.path) as x, rasterio.open(b.path) as y:
        assert np.array_equal(x.read(1), y.read(1))
    # the same map as the window asked for by hand
    c = predict_scene(
        random_bundle, SCENE, tmp_path / "c.tif", window=expected.window, client=dask_client
    )
    with rasterio.open(a.path) as x, rasterio.open(c.path) as y:
        assert np.array_equal(x.read(1), y.read(1))


def test_a_retrained_model_of_the_same_shape_is_not_measured_again(
    random_bundle, tmp_path, dask_client, monkeypatch
):
    """The speeds were kept by the bundle's content hash, so every retraining (another seed,
    more epochs, mended labels) measured the model again, 7-10 s for a large scene. A model's
    speed depends on its shape (architecture, its arguments, channels, classes), not on its
    weights: another bundle of the same shape reads the speeds kept."""
    from geoseg.bundle import load_bundle
    from geoseg.stages.predict import predict_scene
    from tests.conftest import make_random_bundle

    other = make_random_bundle(tmp_path / "other.bundle", 6, 80.0, 30.0, seed=1)
    assert load_bundle(other).hash != load_bundle(random_bundle).hash
    cache = tmp_path / "cache"
    monkeypatch.setenv("GEOSEG_CACHE", str(cache))
    dask_client.run(lambda: __import__("os").environ.__setitem__("GEOSEG_CACHE", str(cache)))
    try:
        a = predict_scene(random_bundle, SCENE, tmp_path / "a.tif", client=dask_client)
        stamp = cache_path().stat().st_mtime_ns
        b = predict_scene(other, SCENE, tmp_path / "b.tif", client=dask_client)
        assert cache_path().stat().st_mtime_ns == stamp  # read, not measured again
        assert len(json.loads(cache_path().read_text())) == 1 and a.window == b.window
    finally:
        dask_client.run(lambda: __import__("os").environ.pop("GEOSEG_CACHE", None))


def test_the_first_measurement_is_said_before_it_starts(
    random_bundle, tmp_path, monkeypatch, geoseg_log
):
    """The first run of a model shape on a machine spent 6.5 s (a 4096² scene, the default
    U-Net) measuring it, with nothing on the screen between "small enough to run in this
    process" and the window chosen; a run that reads the speeds kept says nothing of it."""
    from geoseg.stages.predict import predict_scene

    monkeypatch.setenv("GEOSEG_CACHE", str(tmp_path / "cache"))
    predict_scene(random_bundle, SCENE, tmp_path / "a.tif")
    first = list(geoseg_log.messages)
    geoseg_log.messages.clear()
    predict_scene(random_bundle, SCENE, tmp_path / "b.tif")
    measuring = [i for i, m in enumerate(first) if m.startswith("window auto: measuring")]
    chosen = [i for i, m in enumerate(first) if m.startswith("window auto: ") and " px, batch" in m]
    assert measuring and chosen and measuring[0] < chosen[0], first
    assert "256, 384, 512 px" in first[measuring[0]]  # up to the window that holds the scene
    assert not any(m.startswith("window auto: measuring") for m in geoseg_log.messages)


def test_window_auto_counts_the_threads_of_an_in_process_worker(
    random_bundle, tmp_path, monkeypatch, caplog
):
    """A small scene's worker in the calling process runs a block on each of its threads (one
    per core, one torch thread each, as the speeds are measured), but window auto counted
    workers: it chose for one slot and said "about 4.7 s of model time on 1 worker(s)" for a
    2048² scene that took 2.4 s on 2 threads."""
    import logging

    from geoseg.bundle import load_bundle
    from geoseg.cluster import in_process, workers_info
    from geoseg.stages.predict import default_overlap, predict_scene

    monkeypatch.setenv("GEOSEG_CACHE", str(tmp_path / "cache"))
    with in_process() as client, caplog.at_level(logging.INFO, logger="geoseg"):
        threads = sum(w["nthreads"] for w in workers_info(client).values())
        r = predict_scene(random_bundle, SCENE, tmp_path / "c.tif", client=client)
    [key] = json.loads(cache_path().read_text())
    rates = [x for x in cached_rates(cache_path(), key) if x.px_per_s > 0]
    bundle = load_bundle(random_bundle)
    expected = choose(
        rates, [(443, 489)], overlap_for=lambda w: default_overlap(bundle, w), slots=threads
    )
    assert r.window == expected.window
    assert f"s of model time on {threads} worker thread(s)" in caplog.text


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--window", "big"], ["--window must be a number of pixels or auto, got 'big'"]),
        (["--overlap", "5000"], ["--overlap 5000 needs a window larger than it", "--window"]),
    ],
)
def test_bad_window_settings_get_one_line(args, needles, random_bundle, tmp_path, dask_client):
    out = tmp_path / "c.tif"
    r = invoke(
        "predict", random_bundle, SCENE, "-o", out, *args,
        "--scheduler", dask_client.scheduler.address,
    )  # fmt: skip
    assert_one_line_error(r, *needles)
    assert not out.exists() and not list(tmp_path.iterdir())
