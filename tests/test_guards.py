"""Nothing lost, nothing silent: outputs never replace inputs, folders or files geoseg did not
write; two runs on one output are refused; damaged parts are computed again; bad values are
refused before any work. Through the CLI: one line, a non-zero exit, no partial file, no input
touched."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio

from geoseg.io import read_profile

from .conftest import EAST, LABELS, SCENE, WEST
from .test_cli import assert_one_line_error, invoke

SHARED: tuple[str, ...] = ()  # --scheduler ADDRESS of the suite's shared cluster (below)


@pytest.fixture(autouse=True)
def _on_the_shared_cluster(dask_client):
    """The commands below run on the suite's shared cluster (``--scheduler``): they are about
    what geoseg refuses and writes, not about starting a cluster; the Ctrl-C tests keep their
    own local cluster."""
    global SHARED
    SHARED = ("--scheduler", dask_client.scheduler.address)


def digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with its checksum."""
    return {str(p.relative_to(folder)): digest(p) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def class_map(tmp_path_factory, random_bundle) -> Path:
    """A class map that geoseg wrote (from the random bundle)."""
    out = tmp_path_factory.mktemp("made") / "classes.tif"
    r = invoke("predict", random_bundle, SCENE, "-o", out, *SHARED, "-q")
    assert r.exit_code == 0, r.stderr
    return out


# -- 1. --overwrite replaces only a file geoseg wrote --------------------------------------------


def test_overwrite_never_deletes_a_folder(tmp_path, random_bundle):
    folder = tmp_path / "maps"
    (folder / "sub").mkdir(parents=True)
    (folder / "notes.txt").write_text("mine")
    (folder / "sub" / "other.tif").write_bytes(b"also mine")
    shutil.copy(random_bundle, folder / "model.bundle")
    before = tree(folder)
    r = invoke("predict", random_bundle, SCENE, "-o", folder, "--overwrite", *SHARED)
    assert_one_line_error(r, "is a folder", str(folder))
    assert tree(folder) == before


def test_overwrite_never_replaces_a_file_geoseg_did_not_write(tmp_path, random_bundle, class_map):
    theirs = tmp_path / "c.tif"
    theirs.write_bytes(b"keep me")
    for args in (
        ("predict", random_bundle, SCENE, "-o", theirs),
        ("vectorize", class_map, "-o", tmp_path / "west.gpkg"),
        ("evaluate", class_map, LABELS, "-o", tmp_path / "notes.md"),
        ("train", SCENE, LABELS, "-o", tmp_path / "model.bundle"),
    ):
        shutil.copy(WEST, tmp_path / "west.gpkg")
        (tmp_path / "notes.md").write_text("# my notes\n")
        (tmp_path / "model.bundle").write_bytes(b"not a bundle")
        before = tree(tmp_path)
        r = invoke(*args, "--overwrite", *SHARED)
        assert_one_line_error(r, "is not a file geoseg wrote")
        assert tree(tmp_path) == before


# -- 2. an output is never an input --------------------------------------------------------------


@pytest.mark.parametrize("overwrite", [False, True])
def test_an_output_that_is_an_input_is_refused(tmp_path, random_bundle, class_map, overwrite):
    scenes = tmp_path / "scenes"
    scenes.mkdir()
    a, b = scenes / "a.tif", scenes / "b.tif"
    shutil.copy(SCENE, a)
    shutil.copy(SCENE, b)
    labels = tmp_path / "labels.tif"
    shutil.copy(LABELS, labels)
    truth = tmp_path / "truth.gpkg"
    shutil.copy(EAST, truth)
    geojson = tmp_path / "truth.json"
    gpd.read_file(WEST).assign(code=1).to_file(geojson, driver="GeoJSON")
    flag = ["--overwrite"] if overwrite else []
    cases = [
        ("predict", random_bundle, a, "-o", a),
        ("predict", random_bundle, a, b, "-o", scenes),
        ("predict", random_bundle, class_map, "-o", class_map),
        ("train", a, labels, "-o", labels),
        ("vectorize", truth, "-o", truth),
        ("evaluate", class_map, geojson, "--truth-field", "code", "-o", geojson),
        ("evaluate", class_map, LABELS, "-o", geojson),
    ]
    before = tree(tmp_path) | {"class_map": digest(class_map)}
    for args in cases:
        r = invoke(*args, *flag, *SHARED)
        if args[-1] == geojson and args[2] == LABELS:  # not an input here, but not geoseg's
            assert_one_line_error(r, "is not a file geoseg wrote")
            continue
        assert_one_line_error(r, "is also an input")
        assert "--overwrite" not in r.stderr
    assert tree(tmp_path) | {"class_map": digest(class_map)} == before


# -- 3. one run per output -----------------------------------------------------------------------


def test_a_second_run_on_a_locked_output_is_refused(tmp_path, random_bundle):
    from geoseg.errors import OutputLockedError
    from geoseg.io import exclusive

    out = tmp_path / "c.tif"
    parts = tmp_path / ".c.tif.parts"
    with exclusive(parts / "lock", "test"):
        r = invoke("predict", random_bundle, SCENE, "-o", out, "--overwrite", *SHARED)
        assert_one_line_error(r, "being written by another geoseg run", f"process {os.getpid()}")
    assert not out.exists()
    with (
        exclusive(parts / "lock", "test"),
        pytest.raises(OutputLockedError, match="another"),
        exclusive(parts / "lock", "again"),
    ):
        pass


def test_a_killed_run_leaves_no_lock(tmp_path):
    from geoseg.errors import OutputLockedError
    from geoseg.io import exclusive

    lock = tmp_path / "parts" / "lock"
    code = textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        from geoseg.io import exclusive
        with exclusive(Path({str(lock)!r}), "x"):
            print("locked", flush=True)
            time.sleep(60)
        """
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    with pytest.raises(OutputLockedError, match=f"process {holder.pid}"), exclusive(lock, "y"):
        pass
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with exclusive(lock, "y"):
        pass


# -- 4. a damaged part is computed again ---------------------------------------------------------


def test_damaged_parts_are_computed_again(tmp_path, random_bundle, class_map, monkeypatch):
    import geoseg.stages.predict as predict

    out = tmp_path / "c.tif"

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:  # a run stopped after its blocks, before assembling
        m.setattr(predict, "assemble_class_map", stop)
        r = invoke("predict", random_bundle, SCENE, "-o", out, "--block", 256, *SHARED)
    assert r.exit_code == 130 and "blocks of" in r.stderr and "computes only the others" in r.stderr
    parts = sorted((tmp_path / ".c.tif.parts").glob("block_*.tif"))
    assert len(parts) == 4 and not out.exists()
    with open(parts[0], "r+b") as f:  # truncated
        f.truncate(parts[0].stat().st_size // 2)
    parts[1].write_bytes(bytes(parts[1].stat().st_size))  # zero-filled
    r = invoke("predict", random_bundle, SCENE, "-o", out, "--block", 256, *SHARED)
    assert r.exit_code == 0, r.stderr
    assert "2 part file(s)" in r.stderr and "2 already done" in r.stderr
    with rasterio.open(out) as got, rasterio.open(class_map) as want:
        np.testing.assert_array_equal(got.read(1), want.read(1))
    assert not (tmp_path / ".c.tif.parts").exists()


def test_overwrite_starts_clean(tmp_path, random_bundle, monkeypatch):
    import geoseg.stages.predict as predict

    out = tmp_path / "c.tif"

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(predict, "assemble_class_map", stop)
        invoke("predict", random_bundle, SCENE, "-o", out, "--block", 256, *SHARED)
    for part in (tmp_path / ".c.tif.parts").glob("block_*.tif"):
        part.write_bytes(b"\0" * 100)
    r = invoke("predict", random_bundle, SCENE, "-o", out, "--block", 256, "--overwrite")
    assert r.exit_code == 0, r.stderr
    assert "already done" not in r.stderr and "starting c.tif afresh" in r.stderr


# -- 7. the bundle's band indexes ---------------------------------------------------------------


def test_a_bundle_of_some_bands_reads_them_from_a_larger_scene(random_bundle, make_raster):
    from geoseg.bundle import BandInfo, load_bundle
    from geoseg.errors import BandMismatchError

    b = load_bundle(random_bundle)
    b.contract.bands = [BandInfo(i, f"b{i}") for i in (2, 3, 5)]
    b.check_scene(read_profile(SCENE))  # six bands: 2, 3 and 5 are there
    small = make_raster("four.tif", np.ones((4, 16, 16), "uint8"))
    with pytest.raises(BandMismatchError, match=r"has 4 bands, the bundle expects bands 2,3,5"):
        b.check_scene(read_profile(small))


# -- 10. checkpoints load no code ---------------------------------------------------------------


class _Payload:
    def __reduce__(self):
        return (os.mkdir, (os.environ["GEOSEG_TEST_MARK"],))


def test_a_checkpoint_runs_no_code(tmp_path, monkeypatch):
    import torch

    mark = tmp_path / "was-run"
    monkeypatch.setenv("GEOSEG_TEST_MARK", str(mark))
    ckpt = tmp_path / "m.bundle.checkpoint"
    torch.save({"meta": {}, "state": _Payload()}, ckpt)
    r = invoke(
        "train", SCENE, LABELS, "-o", tmp_path / "m.bundle", "--resume", ckpt, "--within", WEST
    )
    assert_one_line_error(r, "could not be read", "m.bundle.checkpoint")
    assert not mark.exists()


# -- 5. label values are never lost without a word ---------------------------------------------


@pytest.fixture
def nc_labels(make_raster):
    """The NC labels with some codes changed: ``nc_labels("x.tif", {5: -5}, dtype="int16")``."""

    def make(name: str, recode: dict, dtype: str = "int16", nodata=0):
        with rasterio.open(LABELS) as src:
            codes = src.read(1).astype(dtype)
            profile = src.profile
        for old, new in recode.items():
            codes[codes == old] = new
        return make_raster(
            name, codes, crs=profile["crs"], transform=profile["transform"], nodata=nodata
        )

    return make


@pytest.mark.parametrize(
    ("recode", "dtype", "needles"),
    [
        ({5: -5}, "int16", ["negative codes -5", "--ignore -5"]),
        ({5: 5.5}, "float32", ["not whole numbers 5.5"]),
        ({5: 300}, "int16", ["codes above 254 300", "--ignore 300"]),
    ],
)
def test_label_codes_that_cannot_be_classes_are_refused_first(
    tmp_path, nc_labels, recode, dtype, needles, monkeypatch
):
    import geoseg.stages.train

    def no_cluster(*args, **kwargs):
        raise AssertionError("a cluster was started before the labels were checked")

    monkeypatch.setattr(geoseg.stages.train, "session", no_cluster)
    labels = nc_labels("bad.tif", recode, dtype)
    out = tmp_path / "m.bundle"
    r = invoke("train", SCENE, labels, "-o", out, "--within", WEST, "--epochs", 1)
    assert_one_line_error(r, "bad.tif", *needles)
    assert not out.exists() and not list(tmp_path.glob("m.bundle*"))


def test_ignored_negative_codes_and_float_labels_train(tmp_path, nc_labels):
    from geoseg.labels import LabelSpec, check_codes, raster_values

    labels = nc_labels("ok.tif", {5: -5}, "float32")
    values = raster_values(str(labels))
    assert -5.0 in values and 0.0 not in values  # nodata stays out
    check_codes(LabelSpec(str(labels), ignore=(-5,)), values)  # ignored: fine


def test_the_class_field_taken_is_said(tmp_path):
    ids = tmp_path / "ids.gpkg"
    gdf = gpd.read_file(WEST)
    gdf[["geometry"]].assign(ID=range(1, len(gdf) + 1)).to_file(ids)
    r = invoke("train", SCENE, ids, "-o", tmp_path / "m.bundle", "--window", 4096)
    assert "geoseg: warning:" in r.stderr and "'ID'" in r.stderr and "--label-field" in r.stderr
    codes = tmp_path / "codes.gpkg"
    gdf[["geometry"]].assign(code=1).to_file(codes)
    r = invoke("train", SCENE, codes, "-o", tmp_path / "m.bundle", "--window", 4096)
    assert "class codes from column 'code'" in r.stderr


def test_vector_codes_are_checked_with_their_field(tmp_path):
    bad = tmp_path / "bad.gpkg"
    gpd.read_file(WEST)[["geometry"]].assign(code=-2).to_file(bad)
    r = invoke("train", SCENE, bad, "-o", tmp_path / "m.bundle", "--label-field", "code")
    assert_one_line_error(r, "bad.gpkg", "field 'code'", "negative codes -2")
    assert not list(tmp_path.glob("m.bundle*"))


def test_negative_truth_codes_name_the_class_map_option(tmp_path, class_map, nc_labels):
    truth = nc_labels("truth.tif", {5: -5})
    r = invoke("evaluate", class_map, truth, "-o", tmp_path / "r.json")
    assert_one_line_error(r, "truth", "negative codes -5", "--class-map")
    assert not (tmp_path / "r.json").exists()
    r = invoke(
        "evaluate", class_map, truth, "-o", tmp_path / "r.json",
        "--class-map=-5:5,2:1,3:1,4:5,6:9,7:9", *SHARED,
    )  # fmt: skip
    assert r.exit_code == 0, r.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    five = next(c for c in report["overall"]["per_class"] if c["id"] == 5)
    assert five["truth_pixels"] > 0  # the recoded class counts


def test_class_ids_above_254_name_their_source(tmp_path):
    classes = tmp_path / "classes.yaml"
    classes.write_text("- {id: 1, name: a}\n- {id: 300, name: b}\n")
    r = invoke("train", SCENE, LABELS, "-o", tmp_path / "m.bundle", "--classes", classes)
    assert_one_line_error(r, "classes.yaml", "[300]", "0-254")
    assert not list(tmp_path.glob("m.bundle*"))


# -- 6. a scene unlike the training scene is said ----------------------------------------------


@pytest.fixture(scope="module")
def unlike(tmp_path_factory):
    """The NC scene on another scale, at another pixel size, and in another CRS."""
    d = tmp_path_factory.mktemp("unlike")
    with rasterio.open(SCENE) as src:
        data, profile = src.read(), src.profile
    t = profile["transform"]
    out = {}
    for name, arr, prof in (
        ("scaled", data.astype("uint16") * 100, {"dtype": "uint16"}),
        ("coarse", data, {"transform": rasterio.Affine(t.a * 10, 0, t.c, 0, t.e * 10, t.f)}),
        ("utm", data, {"crs": "EPSG:32617"}),
    ):
        out[name] = d / f"{name}.tif"
        with rasterio.open(out[name], "w", **{**profile, **prof}) as dst:
            dst.write(arr)
    return out


def test_a_scene_on_another_scale_pixel_size_or_crs_is_said(tmp_path, nc_run, unlike):
    from geoseg.bundle import compare_scene, load_bundle

    b = load_bundle(nc_run["bundle"])
    assert compare_scene(b, read_profile(SCENE)) == []
    (scaled,) = compare_scene(b, read_profile(unlike["scaled"]))
    assert "another scale" in scaled and "band 1" in scaled
    (coarse,) = compare_scene(b, read_profile(unlike["coarse"]))
    assert "pixels of 285 m" in coarse and "28.5 m" in coarse and "(10x)" in coarse
    (crs,) = compare_scene(b, read_profile(unlike["utm"]))
    assert "EPSG:32617" in crs and "gdalwarp -t_srs" in crs
    for name, needle in (("scaled", "another scale"), ("coarse", "pixels of"), ("utm", "32617")):
        out = tmp_path / f"{name}_classes.tif"
        r = invoke("predict", nc_run["bundle"], unlike[name], "-o", out, "--strict")
        assert_one_line_error(r, needle, "(--strict)")
        assert not out.exists()


@pytest.mark.parametrize("tiled", [True, False])
def test_the_scale_check_reads_one_tile_per_window(tmp_path, tiled):
    """The check's windows lay centred on a 2048² scene's 512 px tile corners, so each decoded
    four tiles of every band: the whole scene, before its blocks read it again. In a tiled
    file each window now lies inside one tile; a striped file keeps the even spread."""
    from geoseg.bundle import sample_windows

    path = tmp_path / "s.tif"
    layout = {"tiled": True, "blockxsize": 512, "blockysize": 512} if tiled else {}
    with rasterio.open(
        path, "w", driver="GTiff", width=2048, height=2048, count=1, dtype="uint8",
        crs="EPSG:32617", transform=rasterio.Affine(30, 0, 0, 0, -30, 0), **layout,
    ) as dst:  # fmt: skip
        dst.write(np.ones((1, 2048, 2048), "uint8"))
    windows = sample_windows(read_profile(path), 16)
    assert len(windows) == 4  # one per 1024² px of scene
    rows = sorted({int(w.row_off) for w in windows})
    cols = sorted({int(w.col_off) for w in windows})
    assert len(rows) == len(cols) == 2 and rows[0] < 1024 <= rows[1] and cols[0] < 1024 <= cols[1]
    for w in windows:
        for off in (int(w.row_off), int(w.col_off)):
            assert off >= 0 and off + 128 <= 2048
            if tiled:
                assert off // 512 == (off + 127) // 512, (off, "spans two tiles")
    if not tiled:
        assert rows == cols == [448, 1472]  # centred in each half, as before


def test_the_warning_is_one_line_and_the_map_is_written(tmp_path, nc_run, unlike):
    out = tmp_path / "c.tif"
    r = invoke("predict", nc_run["bundle"], unlike["scaled"], "-o", out, *SHARED)
    assert r.exit_code == 0, r.stderr
    warned = [ln for ln in r.stderr.splitlines() if ln.startswith("geoseg: warning:")]
    assert len(warned) == 1 and "another scale" in warned[0] and "--strict" in warned[0]
    assert ".py:" not in r.stderr and "warnings.warn" not in r.stderr
    # the scene's samples are checked before the planning: the warning comes before any block
    assert r.stderr.index(warned[0]) < r.stderr.index("predict:"), r.stderr
    assert out.exists()


# -- 8. every worker, on every release of distributed ------------------------------------------


def test_more_than_five_workers_are_all_counted(monkeypatch):
    from distributed import Client, LocalCluster

    from geoseg.cluster import worker_slots, workers_info
    from geoseg.stages.predict import default_block

    # the releases of distributed from 2025.7 to 2026.6 listed five workers unless asked
    original = Client.scheduler_info

    def five_by_default(self, n_workers=5, **kwargs):
        return original(self, n_workers=n_workers, **kwargs)

    monkeypatch.setattr(Client, "scheduler_info", five_by_default)
    with (
        LocalCluster(
            n_workers=7, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as c,
        Client(c) as client,
    ):
        client.wait_for_workers(7)
        assert len(client.scheduler_info()["workers"]) == 5  # the finding
        assert len(workers_info(client)) == 7
        assert worker_slots(client, None, None) == 7
        big = read_profile(SCENE)
        assert default_block([big], None, client) == 256  # 489 x 443 px over 14 blocks


# -- 9. paths are resolved on the client ---------------------------------------------------------


@pytest.mark.slow
def test_relative_paths_reach_workers_in_another_folder(tmp_path, monkeypatch, class_map):
    from .conftest import SAMPLE, external_cluster

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(SAMPLE.parent)
    with external_cluster(1, cwd=elsewhere) as (address, _):
        r = invoke(
            "train", "sample/nc_landsat7_2000.tif", "sample/nc_landclass96.tif",
            "-o", tmp_path / "m.bundle", "--within", "sample/nc_train_west60.gpkg",
            "--epochs", 1, "--samples-per-epoch", 16, "--arch-arg", "depth=2",
            "--arch-arg", "base_width=4", "--scheduler", address,
        )  # fmt: skip
        assert r.exit_code == 0, r.stderr
        assert (r.output + r.stderr).count("wrote ") == 1  # said once
        r = invoke(
            "evaluate", class_map, "sample/nc_landclass96.tif", "-o", tmp_path / "r.json",
            "--within", "sample/nc_holdout_east40.gpkg", "--scheduler", address,
            "--class-map", "2:1,3:1,4:5,6:9,7:9", "-q",
        )  # fmt: skip
        assert r.exit_code == 0, r.stderr


# -- user mistakes are one line, found before any work -------------------------------------------


def test_outputs_that_cannot_be_written_are_found_first(tmp_path, random_bundle, class_map):
    a_file = tmp_path / "scene.tif"
    shutil.copy(SCENE, a_file)
    # /proc takes no new files, for root too (a permission bit would not stop root)
    for where, needle in (
        (a_file / "out", "is a file, not a folder"),
        (Path("/proc/geoseg"), "no file can be created"),
    ):
        for args in (
            ("predict", random_bundle, SCENE, "-o", where / "c.tif"),
            ("train", SCENE, LABELS, "-o", where / "m.bundle"),
            ("vectorize", class_map, "-o", where / "p.gpkg"),
            ("evaluate", class_map, LABELS, "-o", where / "r.json"),
        ):
            assert_one_line_error(invoke(*args, *SHARED), "cannot be written", needle)
    assert not list(tmp_path.glob("**/m.bundle*"))


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (("vectorize", "CLASSES", "-o", "p.gpkg", "--scheduler", "notaurl"), ["'notaurl' is not a Dask scheduler address", "tcp://HOST:PORT"]),
        (("vectorize", "CLASSES", "-o", "p.gpkg", "--crs", "EPSG:99999"), ["--crs 'EPSG:99999' is not a CRS"]),
        (("vectorize", "CLASSES", "-o", "p.gpkg", "--block", "1"), ["--block must be at least 64, got 1"]),
        (("vectorize", "SCENE", "-o", "p.gpkg"), ["6 band(s) of uint8", "expected a single-band integer class raster"]),
        (("evaluate", "SCENE", "LABELS", "-o", "r.json"), ["6 band(s)", "is this the scene"]),
        (("evaluate", "CLASSES", "LABELS", "-o", "r.json", "--block", "0"), ["--block must be at least 64"]),
        (("predict", "BUNDLE", "SCENE", "-o", "c.tif", "--window", "0"), ["--window must be at least 8, got 0"]),
        (("predict", "BUNDLE", "SCENE", "-o", "c.tif", "--window", "-16"), ["--window must be at least 8"]),
        (("predict", "BUNDLE", "SCENE", "-o", "c.tif", "--block", "0"), ["--block must be at least 64, got 0"]),
        (("predict", "BUNDLE", "SCENE", "-o", "c.tif", "--window", "64", "--overlap", "64"), ["--overlap must be", "(64 px)"]),
        (("train", "SCENE", "LABELS", "-o", "m.bundle", "--arch-arg", "depth=banana"), ["depth='banana'", "expected an integer"]),
        (("train", "SCENE", "LABELS", "-o", "m.bundle", "--arch-arg", "depth=0"), ["depth must be at least 1"]),
        (("train", "SCENE", "LABELS", "-o", "m.bundle", "--lr", "-1"), ["--lr must be a positive number"]),
        (("train", "SCENE", "LABELS", "-o", "m.bundle", "--epochs", "0"), ["--epochs must be at least 1"]),
    ],
)  # fmt: skip
def test_settings_out_of_range_are_one_line(
    tmp_path, random_bundle, class_map, args, needles, monkeypatch
):
    import geoseg.cluster

    def no_cluster(*a, **k):
        raise AssertionError("a cluster was started for a bad setting")

    monkeypatch.setattr(geoseg.cluster, "_local_cluster", no_cluster)
    monkeypatch.chdir(tmp_path)
    names = {"CLASSES": class_map, "SCENE": SCENE, "LABELS": LABELS, "BUNDLE": random_bundle}
    r = invoke(*[names.get(a, a) for a in args])
    assert_one_line_error(r, *needles)
    assert "unexpected" not in r.stderr and list(tmp_path.iterdir()) == []


def test_workflow_mistakes_are_found_before_the_first_stage(tmp_path, monkeypatch):
    import yaml

    import geoseg.cluster

    def no_cluster(*a, **k):
        raise AssertionError("a stage ran")

    monkeypatch.setattr(geoseg.cluster, "_local_cluster", no_cluster)
    base = yaml.safe_load((Path(SCENE).parent / "demo.yaml").read_text())
    shutil.copytree(Path(SCENE).parent, tmp_path / "wf")
    cases = [
        ({"train": {**base["train"], "epochz": 3}}, ["train has no option 'epochz'", "epochs (integer)"]),
        ({"train": {**base["train"], "epochs": "ten"}}, ["train.epochs is 'ten', expected integer"]),
        ({"predict": {"block": [1]}}, ["predict.block is [1], expected integer"]),
        ({"evaluate": {**base["evaluate"], "regions": "nowhere.gpkg"}}, ["nowhere.gpkg", "evaluate.regions", "does not exist"]),
        ({"train": {**base["train"], "within": "gone.gpkg"}}, ["gone.gpkg", "does not exist"]),
    ]  # fmt: skip
    for change, needles in cases:
        wf = tmp_path / "wf" / "w.yaml"
        wf.write_text(yaml.safe_dump({**base, **change}))
        r = invoke("run", wf, "-o", tmp_path / "out")
        assert_one_line_error(r, *needles)
        assert not (tmp_path / "out").exists()


def test_no_crs_with_polygons_says_why(tmp_path, random_bundle, make_raster):
    scene = make_raster("nocrs.tif", np.full((6, 64, 64), 80, "uint8"), crs=None)
    r = invoke(
        "predict", random_bundle, scene, "-o", tmp_path / "c.tif", "--allow-no-crs",
        "--polygons", tmp_path / "p.geojson",
    )  # fmt: skip
    assert_one_line_error(r, "has no CRS, and polygons need one", "drop --polygons")
    assert "pass --allow-no-crs" not in r.stderr


@pytest.mark.slow
def test_a_dead_scheduler_from_the_environment_names_it(tmp_path, random_bundle, monkeypatch):
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", "tcp://127.0.0.1:9")
    t0 = time.monotonic()
    r = invoke("predict", random_bundle, SCENE, "-o", tmp_path / "c.tif")
    assert_one_line_error(r, "cannot reach the Dask scheduler", "unset DASK_SCHEDULER_ADDRESS")
    assert "drop --scheduler" not in r.stderr
    assert time.monotonic() - t0 < 20  # a short first contact, not Dask's 30 s


def test_a_failed_run_leaves_no_empty_folder(tmp_path, random_bundle, monkeypatch):
    import geoseg.stages.predict
    from geoseg.errors import ClusterError

    def fail(*args, **kwargs):
        raise ClusterError("the cluster went away")

    monkeypatch.setattr(geoseg.stages.predict, "run_tasks", fail)  # after the folders are made
    out = tmp_path / "new" / "deeper" / "c.tif"
    r = invoke("predict", random_bundle, SCENE, "-o", out, *SHARED, "--block", 256, "-q")
    assert_one_line_error(r, "the cluster went away")
    assert list(tmp_path.iterdir()) == []
    # a damaged scene is found by the client's sample, before any folder is made
    with rasterio.open(SCENE) as src:
        profile = src.profile
    broken = tmp_path / "broken.tif"
    with rasterio.open(broken, "w", **{**profile, "blockxsize": 128, "blockysize": 128}) as dst:
        dst.write(np.tile(np.arange(256, dtype="uint8"), (6, 443, 2))[:, :, :489])
    with open(broken, "r+b") as f:
        f.truncate(broken.stat().st_size // 2)
    r = invoke("predict", random_bundle, broken, "-o", out, *SHARED)
    assert_one_line_error(r, "could not be read at rows", "truncated or damaged")
    assert sorted(tmp_path.iterdir()) == [broken]


def test_class_names_are_gdal_categories(class_map):
    """GDAL itself (the library rasterio ships) reads the class names as categories."""
    import ctypes
    import glob

    libs = glob.glob(str(Path(rasterio.__file__).parent.parent / "rasterio.libs" / "libgdal-*"))
    if not libs:
        pytest.skip("rasterio's own GDAL library is not beside it")
    gdal = ctypes.CDLL(libs[0])
    gdal.GDALAllRegister()
    gdal.GDALOpen.restype = ctypes.c_void_p
    gdal.GDALGetRasterBand.restype = ctypes.c_void_p
    gdal.GDALGetRasterBand.argtypes = [ctypes.c_void_p, ctypes.c_int]
    gdal.GDALGetRasterCategoryNames.restype = ctypes.POINTER(ctypes.c_char_p)
    gdal.GDALGetRasterCategoryNames.argtypes = [ctypes.c_void_p]
    gdal.GDALGetGeoTransform.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    gdal.GDALGetDefaultRAT.restype = ctypes.c_void_p
    gdal.GDALGetDefaultRAT.argtypes = [ctypes.c_void_p]
    gdal.GDALRATGetRowCount.argtypes = [ctypes.c_void_p]
    gdal.GDALRATGetValueAsString.restype = ctypes.c_char_p
    gdal.GDALRATGetValueAsString.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    gdal.GDALClose.argtypes = [ctypes.c_void_p]
    ds = gdal.GDALOpen(str(class_map).encode(), 0)
    assert ds
    # as gdalinfo does: the georeferencing first (GeoTIFF reads its side-car then), then bands
    gdal.GDALGetGeoTransform(ds, (ctypes.c_double * 6)())
    band = gdal.GDALGetRasterBand(ds, 1)
    names = gdal.GDALGetRasterCategoryNames(band)
    found = []
    while names and names[len(found)] is not None:
        found.append(names[len(found)].decode())
    rat = gdal.GDALGetDefaultRAT(band)
    count = gdal.GDALRATGetRowCount(rat) if rat else 0
    rows = [gdal.GDALRATGetValueAsString(rat, i, 1).decode() for i in range(count)]
    gdal.GDALClose(ds)  # the table and the names go with the dataset
    assert found[1] == "one" and found[5] == "five" and found[9] == "nine" and found[0] == ""
    assert rows == ["one", "five", "nine"]


# -- Ctrl-C: one line that says what was kept ---------------------------------------------------


def _interrupt(args: list[str], after: bytes, tmp_path: Path) -> tuple[int, str]:
    """Run ``geoseg ARGS`` in a process group of its own, as a terminal does, and send the
    group SIGINT (Ctrl-C) once its stderr shows ``after``; return the exit code and stderr."""
    err = tmp_path / "stderr.txt"
    geoseg = str(Path(sys.executable).with_name("geoseg"))
    with open(err, "wb") as f:
        p = subprocess.Popen([geoseg, *args], stdout=f, stderr=f, start_new_session=True)
    deadline = time.monotonic() + 180
    while after not in err.read_bytes() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    os.killpg(p.pid, signal.SIGINT)
    p.wait(timeout=120)
    return p.returncode, err.read_text()


@pytest.mark.slow
@pytest.mark.parametrize("where", [["--workers", "2"], []], ids=["processes", "this-process"])
def test_ctrl_c_in_predict_says_what_was_kept(tmp_path, random_bundle, where):
    with rasterio.open(SCENE) as src:
        data, profile = src.read(), src.profile
    # large enough that the run lasts well past the first progress line (a line every 5 s off
    # a terminal): at 2048² a quiet machine finished 253 of 256 blocks before that line came,
    # and the Ctrl-C found the run already writing its map
    big = tmp_path / "big.tif"
    profile.update(width=3072, height=3072)
    with rasterio.open(big, "w", **profile) as dst:
        dst.write(np.tile(data, (1, 7, 7))[:, :3072, :3072])
    out = tmp_path / "c.tif"
    args = [
        "predict",
        str(random_bundle),
        str(big),
        "-o",
        str(out),
        "--window",
        "64",
        "--block",
        "128",
    ]
    code, err = _interrupt([*args, *where], b"predict: [", tmp_path)
    assert code == 130, err
    lines = err.strip().splitlines()
    assert "Traceback" not in err and len(lines) <= 5, err
    assert lines[-1].startswith("geoseg: interrupted; ") and "the same command run again" in err
    r = invoke(*args, *SHARED)
    assert r.exit_code == 0 and "already done, resuming" in r.stderr


@pytest.mark.slow
def test_ctrl_c_in_train_names_the_checkpoint(tmp_path):
    out = tmp_path / "m.bundle"
    args = ["train", str(SCENE), str(LABELS), "-o", str(out), "--within", str(WEST)]
    args += ["--epochs", "50", "--arch-arg", "depth=2", "--arch-arg", "base_width=4"]
    code, err = _interrupt([*args, "--workers", "1"], b"train: [", tmp_path)
    assert code == 130, err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 6, err
    assert f"--resume {out}.checkpoint" in err.splitlines()[-1]
    ckpt = tmp_path / "m.bundle.checkpoint"
    assert not out.exists() and ckpt.exists()
    # resuming with other settings names each that differs, with both values
    args[args.index("50")] = "40"
    r = invoke(*args, "--resume", ckpt, *SHARED, "-q")
    assert_one_line_error(r, "other settings: epochs 50 there, 40 now", "without --resume")


# -- messages that say what happened -----------------------------------------------------------


@pytest.mark.slow
def test_an_overlap_below_the_receptive_field_warns(tmp_path, random_bundle):
    r = invoke("predict", random_bundle, SCENE, "-o", tmp_path / "a.tif", "--overlap", 4, *SHARED)
    assert r.exit_code == 0, r.stderr
    assert "overlap 4 px is less than the model's receptive field (20 px)" in r.stderr
    assert "--overlap 20" in r.stderr
    r = invoke("predict", random_bundle, SCENE, "-o", tmp_path / "b.tif", "--window", 16)
    assert r.exit_code == 0, r.stderr
    assert "overlap 8 px is less" in r.stderr and "use --window 40 or more" in r.stderr
    r = invoke("predict", random_bundle, SCENE, "-o", tmp_path / "c.tif", *SHARED)
    assert "geoseg: warning" not in r.stderr  # the default overlap covers the field


def test_the_plan_line_says_why_the_overlap_is_not_the_bundles(tmp_path, random_bundle):
    from geoseg.bundle import load_bundle, save_bundle

    b = load_bundle(random_bundle)
    b.contract.overlap = 13  # the tiny U-Net pools once: its stride is 2
    odd = tmp_path / "odd.bundle"
    save_bundle(odd, b.model, b.contract)
    r = invoke("predict", odd, SCENE, "-o", tmp_path / "c.tif", *SHARED)
    assert r.exit_code == 0, r.stderr
    assert (
        "overlap 14 (the bundle's 13, raised so the stride is a multiple of the model's stride 2)"
        in r.stderr
    )


def test_evaluate_speaks_of_truth_and_class_map(tmp_path, class_map):
    far = tmp_path / "far.gpkg"
    gdf = gpd.read_file(WEST)
    gdf.geometry = gdf.geometry.translate(1e6, 0)
    gdf.assign(code=1).to_file(far)
    r = invoke("evaluate", class_map, far, "--truth-field", "code", "-o", tmp_path / "r.json")
    assert_one_line_error(r, "truth", "do not overlap the class map")
    assert "labels" not in r.stderr and "scene" not in r.stderr


@pytest.mark.slow
def test_training_a_full_size_model_sends_no_large_graph(tmp_path):
    """The weights and optimiser state (about 90 MB for the default U-Net) travel once per
    epoch as data, not inside the graph of every rank: Dask says nothing about it."""
    r = invoke(
        "train", SCENE, LABELS, "-o", tmp_path / "m.bundle", "--within", WEST, "--epochs", 2,
        "--samples-per-epoch", 8, "--batch-size", 4, *SHARED,
    )  # fmt: skip
    assert r.exit_code == 0, r.stderr
    assert "large graph" not in r.stderr and "geoseg: warning" not in r.stderr


def test_messages_raised_on_a_worker_name_options_as_the_caller_does(dask_client):
    from geoseg.errors import AsCaller, ConfigError, command_line
    from geoseg.tasks.predict import resolve_precision

    python = dask_client.submit(AsCaller(resolve_precision), "fp16", "cpu", pure=False)
    with command_line():  # as under the geoseg command
        cli = dask_client.submit(AsCaller(resolve_precision), "fp16", "cpu", pure=False)
    with pytest.raises(ConfigError, match=r"^precision='fp16' needs a GPU"):
        python.result()
    with pytest.raises(ConfigError, match=r"^--precision fp16 needs a GPU"):
        cli.result()
    assert cli.key.startswith("resolve_precision-")  # the task keeps its name in Dask
