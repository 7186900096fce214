"""Every command through the CLI on the real NC scene, the demo end to end, and the error paths:
one line on stderr, a non-zero exit, no traceback, no partial output."""

from __future__ import annotations

import json

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import yaml
from click.testing import CliRunner

from geoseg.cli import cli

from .conftest import EAST, LABELS, REGIONS, SAMPLE, SCENE, WEST, external_cluster


def invoke(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def assert_one_line_error(result, *needles: str) -> None:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("geoseg: error: "), result.stderr
    assert "Traceback" not in result.stderr
    for n in needles:
        assert n in lines[0]


@pytest.mark.parametrize("command", ["train", "predict", "vectorize", "evaluate", "run", "demo"])
def test_every_command_has_help_with_an_example(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0
    assert "Example:" in result.output and "--workers" in result.output and "-v" in result.output


def test_commands_chain_on_the_real_scene(tmp_path):
    bundle, classes = tmp_path / "m.bundle", tmp_path / "c.tif"
    r = invoke(
        "train",
        SCENE,
        LABELS,
        "-o",
        bundle,
        "--within",
        WEST,
        "--epochs",
        1,
        "--samples-per-epoch",
        32,
        "--arch-arg",
        "depth=2",
        "--arch-arg",
        "base_width=4",
        "--workers",
        1,
        "-q",
    )
    assert r.exit_code == 0, r.output + r.stderr
    r = invoke("predict", bundle, SCENE, "-o", classes, "--block", 256, "--workers", 2)
    assert r.exit_code == 0, r.stderr
    assert "predict:" in r.stderr  # progress
    r = invoke("vectorize", classes, "-o", tmp_path / "p.geojson", "--workers", 1)
    assert r.exit_code == 0 and "polygons" in r.output
    assert len(gpd.read_file(tmp_path / "p.geojson")) > 0
    r = invoke(
        "evaluate",
        classes,
        LABELS,
        "-o",
        tmp_path / "r.md",
        "--within",
        EAST,
        "--regions",
        REGIONS,
        "--workers",
        1,
    )
    assert r.exit_code == 0 and "mIoU" in r.output
    assert "| north-west |" in (tmp_path / "r.md").read_text()


def test_run_workflow_from_yaml(tmp_path):
    wf = yaml.safe_load((SAMPLE / "demo.yaml").read_text())
    for key in ("scene", "labels"):
        wf[key] = str(SAMPLE / wf[key])
    wf["train"].update(epochs=1, samples_per_epoch=32, within=str(WEST))
    wf["evaluate"].update(within=str(EAST), regions=str(REGIONS))
    path = tmp_path / "wf.yaml"
    path.write_text(yaml.safe_dump(wf))
    r = invoke("run", path, "-o", tmp_path / "out", "--workers", 2)
    assert r.exit_code == 0, r.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert len(report["regions"]) == 4 and report["overall"]["pixels"] > 0
    again = invoke("run", path, "-o", tmp_path / "out", "--workers", 1)
    assert_one_line_error(again, "already holds", "--overwrite")


def test_demo_end_to_end(tmp_path):
    """The README's demo: scene grid, nodata, polygons, report, and a real model."""
    out = tmp_path / "demo"
    r = invoke("demo", "-o", out)
    assert r.exit_code == 0, r.stderr
    names = ("model.bundle", "classes.tif", "polygons.geojson", "report.json", "report.csv")
    for name in (*names, "report.html", "report.md"):
        assert (out / name).exists() and str(out / name) in r.output
    csv_rows = (out / "report.csv").read_text().splitlines()
    assert len(csv_rows) == 1 + 7 * 5  # header, then 7 classes x (whole area + 4 regions)
    assert "<svg" in (out / "report.html").read_text()
    with rasterio.open(out / "classes.tif") as c, rasterio.open(SCENE) as s:
        assert (c.crs, c.transform, c.width, c.height) == (s.crs, s.transform, s.width, s.height)
        scene_nodata = ~np.all(s.read() != 0, axis=0)
        np.testing.assert_array_equal(c.read(1) == 255, scene_nodata)
    assert len(gpd.read_file(out / "polygons.geojson")) > 0
    report = json.loads((out / "report.json").read_text())
    overall = report["overall"]
    assert np.asarray(overall["confusion_matrix"]).shape == (7, 7)
    assert overall["per_class"][0]["name"] == "developed"
    assert len(report["regions"]) == 4 and all(r["miou"] is not None for r in report["regions"])
    # the held-out score beats predicting the majority class everywhere
    assert overall["miou"] > report["baseline_majority_class"]["miou"] + 0.1
    assert "mIoU" in r.output and "baseline" in r.output


# -- bad input ---------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    out = tmp_path / "c.tif"
    assert_one_line_error(
        invoke("predict", tmp_path / "none.bundle", SCENE, "-o", out),
        "none.bundle",
        "does not exist",
    )
    assert not out.exists()


def test_not_a_raster(tmp_path, random_bundle):
    fake = tmp_path / "fake.tif"
    fake.write_text("hello")
    out = tmp_path / "c.tif"
    assert_one_line_error(
        invoke("predict", random_bundle, fake, "-o", out), "fake.tif", "not a raster"
    )
    assert not out.exists()


def test_output_exists_needs_overwrite(tmp_path, random_bundle):
    out = tmp_path / "c.tif"
    r = invoke("predict", random_bundle, SCENE, "-o", out, "--workers", 1, "-q")
    assert r.exit_code == 0
    before = out.read_bytes()
    assert_one_line_error(
        invoke("predict", random_bundle, SCENE, "-o", out), "exists", "--overwrite"
    )
    assert out.read_bytes() == before
    r = invoke("predict", random_bundle, SCENE, "-o", out, "--overwrite", "--workers", 1, "-q")
    assert r.exit_code == 0 and rasterio.open(out).count == 1
    # a file geoseg did not write is never replaced, --overwrite or not
    theirs = tmp_path / "theirs.tif"
    theirs.write_bytes(b"keep me")
    for flag in ([], ["--overwrite"]):
        assert_one_line_error(
            invoke("predict", random_bundle, SCENE, "-o", theirs, *flag), "not a file geoseg wrote"
        )
    assert theirs.read_bytes() == b"keep me"


def test_band_mismatch(tmp_path, random_bundle, make_raster):
    scene = make_raster("four.tif", np.ones((4, 32, 32), "uint8"))
    out = tmp_path / "c.tif"
    assert_one_line_error(
        invoke("predict", random_bundle, scene, "-o", out), "4 bands", "expects 6"
    )
    assert not out.exists() and not list(tmp_path.glob(".c.tif*"))


def test_verbose_shows_the_traceback(tmp_path, random_bundle):
    r = invoke("predict", random_bundle, tmp_path / "none.tif", "-o", tmp_path / "c.tif", "-v")
    assert r.exit_code == 1 and "Traceback" in r.stderr and "geoseg: error:" in r.stderr


def test_failed_training_leaves_no_bundle(tmp_path):
    out = tmp_path / "m.bundle"
    r = invoke("train", SCENE, LABELS, "-o", out, "--within", WEST, "--window", 1024)
    assert_one_line_error(r, "larger than the training area")
    assert not out.exists()


def test_predict_through_an_external_scheduler(tmp_path, random_bundle):
    """--scheduler against real `dask scheduler` and `dask worker` processes on loopback."""
    with external_cluster(1) as (address, _):
        remote, local = tmp_path / "remote.tif", tmp_path / "local.tif"
        r = invoke(
            "predict", random_bundle, SCENE, "-o", remote, "--scheduler", address, "--block", 200
        )
        assert r.exit_code == 0, r.stderr
        invoke("predict", random_bundle, SCENE, "-o", local, "--workers", 1)
        with rasterio.open(remote) as a, rasterio.open(local) as b:
            np.testing.assert_array_equal(a.read(1), b.read(1))
        # GPU tasks ask for a GPU resource, and a cluster without one says so
        gpu = tmp_path / "gpu.tif"
        r = invoke(
            "predict", random_bundle, SCENE, "-o", gpu, "--scheduler", address, "--device", "cuda"
        )
        assert r.exit_code == 1 and not gpu.exists()
        assert "no Dask worker declares a GPU" in r.stderr and "--resources GPU=1" in r.stderr


def test_unreachable_scheduler_is_one_line(tmp_path, random_bundle):
    import dask

    out = tmp_path / "c.tif"
    with dask.config.set({"distributed.comm.timeouts.connect": "2s"}):
        r = invoke(
            "predict", random_bundle, SCENE, "-o", out, "-q", "--scheduler", "tcp://127.0.0.1:9"
        )
    assert_one_line_error(r, "cannot reach the Dask scheduler", "tcp://127.0.0.1:9")
    assert not out.exists()


def test_train_needs_one_label_file_per_scene(tmp_path):
    r = invoke("train", SCENE, LABELS, SCENE, "-o", tmp_path / "m.bundle")
    assert r.exit_code == 2
    assert "got 3 paths; give the scenes, then one label file per scene" in r.stderr
    assert not (tmp_path / "m.bundle").exists()


def test_bad_polygon_and_report_options_are_one_line(tmp_path):
    out = tmp_path / "p.shp"
    assert_one_line_error(invoke("vectorize", LABELS, "-o", out), "unknown polygon format", ".gpkg")
    report = tmp_path / "r.csv"
    assert_one_line_error(
        invoke("evaluate", LABELS, LABELS, "-o", report, "--class-map", "1:x"),
        "--class-map '1:x'",
        "CODE:ID",
    )
    assert not out.exists() and not report.exists() and not list(tmp_path.iterdir())
