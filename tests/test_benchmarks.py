"""The benchmark scripts that must run where there is nothing to measure."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the script measures it")
def test_the_gpu_benchmark_says_there_is_no_gpu_and_exits_cleanly(tmp_path):
    results = BENCHMARKS / "results" / "gpu.json"
    before = results.read_bytes() if results.exists() else None
    run = subprocess.run(
        [sys.executable, str(BENCHMARKS / "gpu.py")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("no GPU: ") and "nothing measured" in run.stdout
    assert "Traceback" not in run.stderr
    after = results.read_bytes() if results.exists() else None
    assert after == before  # no figures written where none were measured


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the script measures it")
def test_the_prepared_gpu_check_runs_its_tests_and_benchmark_and_reports_no_gpu(tmp_path):
    """``benchmarks/gpu_check.sh``, the one call a session lent a GPU makes, runs through on a
    machine without one: the GPU tests are collected and skipped, the benchmark says so, and
    what it printed lands in ``$OUT``."""
    import os

    if (BENCHMARKS.parent / ".whl").exists():
        pytest.skip("wheels fetched for the device are in this checkout; it would install them")
    run = subprocess.run(
        ["bash", str(BENCHMARKS / "gpu_check.sh")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable},
    )
    assert run.returncode == 0, run.stdout + run.stderr
    tests = (tmp_path / "tests.txt").read_text()
    assert "skipped" in tests and "needs a CUDA GPU" in tests and "error" not in tests.lower()
    assert (tmp_path / "gpu.txt").read_text().startswith("no GPU: ")
    assert (tmp_path / "train.txt").read_text().startswith("no GPU: ")
    assert "torch" in (tmp_path / "env.txt").read_text()


def test_the_gpu_benchmarks_reads_alone_cover_the_scene_on_a_cpu(tmp_path, monkeypatch):
    """The GPU benchmark's read rate (the reads a GPU worker makes between its model passes)
    runs on any machine, so a session lent a GPU does not find it broken there: every pixel of
    the scene is read once as a block's core, in one thread or several."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from gpu import reads_alone
    from predict import make_bundle, make_scene

    bundle = make_bundle(tmp_path / "unet.bundle", 256)
    scene = tmp_path / "scene.tif"
    make_scene(scene, 1300)  # blocks of 512 px: the last row and column are partial
    for threads in (1, 2):
        assert reads_alone(bundle, scene, 512, 120, threads) > 0


def test_the_accuracy_table_shows_every_recorded_row_and_its_change(tmp_path):
    """``accuracy.py --table`` trains nothing: a row per recorded map of the scene, in the
    order they were run, each with its change from the row before."""
    import json

    recorded = json.loads((BENCHMARKS / "results" / "accuracy.json").read_text())
    spacenet = sorted(
        (r for r in recorded if r.get("scene") == "spacenet"), key=lambda r: r["date"]
    )
    run = subprocess.run(
        [sys.executable, str(BENCHMARKS / "accuracy.py"), "--table", "--scene", "spacenet"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    assert lines[0] == f"spacenet: {len(spacenet)} rows since 2000-01-01"
    rows = lines[2:]
    maps = [r[k] for r in spacenet for k in r if k.startswith("unet tta") and "miou" in r[k]]
    assert len(rows) == len(maps)
    for line, before, now in zip(rows[1:], maps, maps[1:]):
        miou, change = (float(x) for x in line.split()[3:5])  # after the date, time and seed
        assert miou == round(now["miou"], 3)
        assert change == pytest.approx(now["miou"] - before["miou"], abs=1e-3)
