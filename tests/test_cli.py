"""Every command through the CLI on the real NC scene, the demo end to end, and the error paths:
one line on stderr, a non-zero exit, no traceback, no partial output."""

from __future__ import annotations

import json
import re

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import yaml
from click.testing import CliRunner

from geoseg.cli import cli

from .conftest import (
    EAST,
    LABELS,
    REGIONS,
    SAMPLE,
    SCENE,
    WEST,
    assert_same_polygons,
    external_cluster,
)


def invoke(*args: str):
    return CliRunner().invoke(
        cli, [str(a) for a in args], prog_name="geoseg", catch_exceptions=False
    )


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
    out = result.output
    assert result.output.startswith(f"Usage: geoseg {command} [OPTIONS]")
    # the options every command shares, each on its own line, and an example that runs it
    for option in (r"-v, --verbose", r"-q, --quiet", r"--workers N", r"--scheduler ADDRESS"):
        if command == "demo" and option == r"--scheduler ADDRESS":
            continue
        assert re.search(rf"^  {option}\b", out, re.M), (command, option)
    example = out.split("Example:", 1)[1].strip().splitlines()[0]
    assert example.startswith(f"geoseg {command} "), example


def test_commands_chain_on_the_real_scene(tmp_path, dask_client):
    """Each command writes what its library function writes from the same inputs, and says
    what it wrote."""
    from geoseg import load_bundle
    from geoseg.report import markdown, score_table
    from geoseg.stages.evaluate import evaluate
    from geoseg.stages.predict import predict_scene
    from geoseg.stages.vectorize import vectorize

    bundle, classes = tmp_path / "m.bundle", tmp_path / "c.tif"
    cluster = ("--scheduler", dask_client.scheduler.address)
    r = invoke(
        "train", SCENE, LABELS, "-o", bundle, "--within", WEST, "--epochs", 1,
        "--samples-per-epoch", 32, "--arch-arg", "depth=2", "--arch-arg", "base_width=4",
        *cluster, "-q",
    )  # fmt: skip
    assert r.exit_code == 0, r.output + r.stderr
    assert r.stdout.strip() == f"wrote {bundle}"
    contract = load_bundle(bundle).contract
    assert contract.arch_args == {"depth": 2, "base_width": 4}
    assert [c.id for c in contract.classes] == [1, 2, 3, 4, 5, 6, 7]
    r = invoke("predict", bundle, SCENE, "-o", classes, "--block", 256, *cluster)
    assert r.exit_code == 0, r.stderr
    assert "predict:" in r.stderr  # progress
    assert r.stdout.strip() == f"wrote {classes}"
    predict_scene(bundle, SCENE, tmp_path / "lib.tif", block=256, client=dask_client)
    with rasterio.open(classes) as a, rasterio.open(tmp_path / "lib.tif") as b:
        np.testing.assert_array_equal(a.read(), b.read())
    polygons = tmp_path / "p.geojson"
    r = invoke("vectorize", classes, "-o", polygons, *cluster)
    n = vectorize(classes, tmp_path / "lib.geojson", client=dask_client).polygons
    assert r.exit_code == 0 and r.stdout.strip() == f"wrote {n} polygons to {polygons}"
    assert "wrote" not in r.stderr  # said once, not again by a log line
    assert_same_polygons(polygons, tmp_path / "lib.geojson")
    r = invoke(
        "evaluate", classes, LABELS, "-o", tmp_path / "r.md", "--within", EAST,
        "--regions", REGIONS, *cluster,
    )  # fmt: skip
    report = evaluate(classes, LABELS, within=EAST, regions=REGIONS, client=dask_client)
    assert r.exit_code == 0
    assert r.stdout == f"{score_table(report)}\nwrote {tmp_path / 'r.md'}\n"
    assert (tmp_path / "r.md").read_text().rstrip() == markdown(report).rstrip()
    assert "| north-west |" in (tmp_path / "r.md").read_text()


@pytest.mark.slow
def test_run_workflow_from_yaml(tmp_path):
    wf = yaml.safe_load((SAMPLE / "demo.yaml").read_text())
    for key in ("scene", "labels"):
        wf[key] = str(SAMPLE / wf[key])
    wf["train"].update(epochs=1, samples_per_epoch=32, within=str(WEST))
    wf["evaluate"].update(
        within=str(EAST), regions=str(REGIONS), points=str(SAMPLE / wf["evaluate"]["points"])
    )
    path = tmp_path / "wf.yaml"
    path.write_text(yaml.safe_dump(wf))
    r = invoke("run", path, "-o", tmp_path / "out", "--workers", 2)
    assert r.exit_code == 0, r.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert len(report["regions"]) == 4 and report["overall"]["pixels"] > 0
    again = invoke("run", path, "-o", tmp_path / "out", "--workers", 1)
    assert_one_line_error(again, "already holds", "--overwrite")


@pytest.mark.slow
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
    # the shipped reference points in the held-out part: estimates beside the dense scores
    pts = gpd.read_file(SAMPLE / "nc_points96.gpkg")
    east = gpd.read_file(SAMPLE / "nc_holdout_east40.gpkg").to_crs(pts.crs).union_all()
    with rasterio.open(out / "classes.tif") as c:
        held = pts[pts.intersects(east)]
        mapped = np.array([v[0] for v in c.sample([(g.x, g.y) for g in held.geometry])])
    sample = report["sample"]
    assert sample["points"] == int(np.sum(mapped != 255)) > 100
    oa = sample["overall_accuracy"]
    if oa["se"] is not None:
        assert oa["ci95_low"] < oa["value"] < oa["ci95_high"]
        assert f"{oa['value']:.3f} ± " in r.output
    else:  # a map class with one point has no variance: said, not printed as an interval
        assert any("single point" in n for n in sample["notes"])
        assert "single point" in oa["note"]
        assert f"{oa['value']:.3f}, no 95 % interval ({oa['note']})" in r.output
    assert len(sample["regions"]) == 4
    assert "reference points:" in r.output and "estimated overall accuracy" in r.output
    assert "Accuracy and area from reference points" in (out / "report.md").read_text()


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


def test_output_exists_needs_overwrite(tmp_path, random_bundle, dask_client):
    on = ("--scheduler", dask_client.scheduler.address)  # the suite's shared cluster
    out = tmp_path / "c.tif"
    r = invoke("predict", random_bundle, SCENE, "-o", out, *on, "-q")
    assert r.exit_code == 0
    before = out.read_bytes()
    assert_one_line_error(
        invoke("predict", random_bundle, SCENE, "-o", out), "exists", "--overwrite"
    )
    assert out.read_bytes() == before
    r = invoke("predict", random_bundle, SCENE, "-o", out, "--overwrite", *on, "-q")
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.parametrize(
    "command, function",
    [
        ("train", "geoseg.stages.train:train"),
        ("predict", "geoseg.stages.predict:predict_scenes"),
        ("vectorize", "geoseg.stages.vectorize:vectorize"),
        ("evaluate", "geoseg.stages.evaluate:evaluate"),
        ("sample", "geoseg.stages.sample:sample"),
    ],
)
def test_the_command_line_defaults_are_the_library_defaults(command, function):
    """The CLI declares its defaults itself (``--help`` imports no stage): each must be the
    library function's, or a command and a Python call would do different things."""
    import importlib
    import inspect

    module, name = function.split(":")
    params = inspect.signature(getattr(importlib.import_module(module), name)).parameters
    compared = []
    for option in cli.commands[command].params:
        p = params.get(option.name)
        default = option.default
        if type(default).__name__ == "Sentinel":  # click's "no default": a flag is off
            default = False if getattr(option, "is_flag", False) else None
        if p is None or p.default is inspect.Parameter.empty or default in (None, ()):
            continue
        assert default == p.default, (command, option.name, default, p.default)
        compared.append(option.name)
    assert (
        len(compared)
        >= {"train": 13, "predict": 4, "vectorize": 3, "evaluate": 1, "sample": 5}[command]
    )
