"""The cluster kept between commands (``geoseg cluster start`` / ``status`` / ``stop``): real
scheduler and worker processes on 127.0.0.1, found by later commands, gone when stopped or
idle."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import rasterio

from geoseg import resident
from geoseg.errors import ClusterError
from geoseg.stages.predict import predict_scene

from .conftest import SCENE

GEOSEG = str(Path(sys.executable).with_name("geoseg"))


def _geoseg(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([GEOSEG, *args], capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A cache folder of the test's own (where the kept cluster is recorded); the cluster is
    stopped after the test whatever happened."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("GEOSEG_CACHE", str(folder))
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    yield {**os.environ, "GEOSEG_CACHE": str(folder)}
    resident.stop()


def _pids(r: resident.Resident) -> list[int]:
    procs = [psutil.Process(r.scheduler_pid), psutil.Process(r.workers_pid)]
    procs += psutil.Process(r.workers_pid).children(recursive=True)
    return [p.pid for p in procs]


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _gone(pids: list[int], within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not any(_running(p) for p in pids):
            return True
        time.sleep(0.5)
    return False


def test_a_kept_cluster_serves_later_commands_and_stops(tmp_path, random_bundle, cache):
    """Started once, the kept cluster is what a later ``predict`` with no cluster named runs
    on (not its own process), with the same map; ``stop`` ends every process it started."""
    run = _geoseg("cluster", "start", "--workers", "2", env=cache)
    assert run.returncode == 0, run.stderr
    kept = resident.find()
    assert kept is not None and kept.address in run.stdout and kept.workers == 2
    status = _geoseg("cluster", "status", env=cache)
    assert f"runs at {kept.address}: 2 worker processes" in status.stdout
    again = _geoseg("cluster", "start", env=cache)
    assert again.returncode == 0 and "already running" in again.stdout
    assert resident.find() == kept  # not a second cluster

    out = tmp_path / "kept.tif"
    run = _geoseg(
        "predict", str(random_bundle), str(SCENE), "-o", str(out), "--window", "64", env=cache
    )
    assert run.returncode == 0, run.stderr
    assert f"on the cluster kept at {kept.address}" in run.stderr
    assert "small enough to run in this process" not in run.stderr
    # --workers asks for a local cluster: the kept one is left out
    local = tmp_path / "local.tif"
    run = _geoseg(
        "predict", str(random_bundle), str(SCENE), "-o", str(local), "--window", "64",
        "--workers", "1", env=cache,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "on the cluster kept" not in run.stderr
    with rasterio.open(out) as a, rasterio.open(local) as b:
        np.testing.assert_array_equal(a.read(), b.read())

    pids = _pids(kept)
    run = _geoseg("cluster", "stop", env=cache)
    assert run.returncode == 0 and f"at {kept.address} stopped" in run.stdout
    assert _gone(pids, 15)
    assert resident.find() is None and not resident.state_file().exists()
    assert "no kept cluster runs" in _geoseg("cluster", "status", env=cache).stdout
    assert "no kept cluster runs" in _geoseg("cluster", "stop", env=cache).stdout


def test_an_idle_kept_cluster_stops_itself_and_is_forgotten(tmp_path, random_bundle, cache):
    """After its idle time the scheduler and the workers exit; the next command finds no
    cluster, removes the record and runs as it would without one."""
    r, new = resident.start(1, "5s")
    assert new
    pids = _pids(r)
    assert _gone(pids, 40)
    out = tmp_path / "after.tif"
    predict_scene(random_bundle, SCENE, out, window=64)  # no error, no kept cluster
    assert out.exists()
    assert not resident.state_file().exists()


def test_a_kept_cluster_of_another_version_is_not_used(cache, caplog):
    """A record left by another geoseg version (its workers would run other code) is not used,
    and the line says how to replace it."""
    r, _ = resident.start(1)
    pids = _pids(r)
    data = json.loads(resident.state_file().read_text())
    resident.state_file().write_text(json.dumps({**data, "version": "0.0.1"}))
    from geoseg.cluster import scheduler_address

    with caplog.at_level("WARNING", logger="geoseg"):
        assert scheduler_address(None) is None
    assert "started by geoseg 0.0.1" in caplog.text and "geoseg cluster stop" in caplog.text
    assert resident.stop() is not None  # stop ends it whatever version started it
    assert _gone(pids, 15)


def test_a_bad_idle_timeout_is_one_clear_line(cache):
    run = _geoseg("cluster", "start", "--idle-timeout", "soon", env=cache)
    assert run.returncode == 1
    assert run.stderr.strip() == (
        "geoseg: error: --idle-timeout 'soon' is not a duration; expected a number of seconds "
        "or a time such as 90s, 15m or 2h"
    )
    assert resident.find() is None


def _schedulers(folder: str) -> list[psutil.Process]:
    """The running scheduler processes started for the kept cluster in ``folder``."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        line = " ".join(p.info["cmdline"] or [])
        if "dask_scheduler" in line and folder in line and _running(p.pid):
            found.append(p)
    return found


def test_two_starts_at_once_make_one_cluster(cache):
    """Two ``cluster start`` commands run together (two terminals, a script started twice):
    one starts the cluster, the other waits for it and reports it; no second scheduler is
    left running unrecorded."""
    cmd = [GEOSEG, "cluster", "start", "--workers", "1"]
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cache)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    kept = resident.find()
    assert kept is not None
    said = sorted(o.split(" at ")[0] for o, _ in outs)
    assert said == ["geoseg cluster already running", "geoseg cluster started"]
    assert all(f" at {kept.address}:" in o for o, _ in outs)
    assert [p.pid for p in _schedulers(kept.folder)] == [kept.scheduler_pid]


def test_a_cluster_that_cannot_be_recorded_is_not_left_running(cache):
    """If the record cannot be written (a full or broken cache folder), later commands could
    never find the cluster: start stops what it started and says why in one line."""
    resident.state_file().parent.mkdir(parents=True, exist_ok=True)
    resident.state_file().with_suffix(".json.tmp").mkdir()  # writing the record fails
    with pytest.raises(ClusterError, match=r"could not record the kept cluster in .*GEOSEG_CACHE"):
        resident.start(1)
    folder = str(resident.state_file().parent / "cluster")
    assert _gone([p.pid for p in _schedulers(folder)], 15)
    assert resident.find() is None
