"""The cluster paths: predict, vectorize and evaluate through real `dask scheduler` and `dask
worker` processes on 127.0.0.1 give what the local cluster gives, and a worker killed in the
middle of a prediction costs nothing but time."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import rasterio

from geoseg.stages.evaluate import evaluate
from geoseg.stages.predict import predict_scene
from geoseg.stages.vectorize import vectorize

from .conftest import LABELS, REGIONS, SCENE, assert_same_polygons, external_cluster

OTHER = [2, 3, 4, 6, 7]  # NC codes the random bundle (classes 1, 5, 9) does not have


def _pixels(path):
    with rasterio.open(path) as src:
        return src.read()


@pytest.mark.slow
def test_every_stage_through_a_scheduler_equals_the_local_cluster(
    tmp_path, random_bundle, dask_client
):
    local = {"classes": tmp_path / "l.tif", "polygons": tmp_path / "l.gpkg"}
    remote = {"classes": tmp_path / "r.tif", "polygons": tmp_path / "r.gpkg"}
    predict_scene(random_bundle, SCENE, local["classes"], block=128, client=dask_client)
    vectorize(local["classes"], local["polygons"], block=200, client=dask_client)
    expected = evaluate(
        local["classes"], LABELS, ignore=OTHER, regions=REGIONS, block=200, client=dask_client
    )
    with external_cluster(2) as (address, _):
        predict_scene(random_bundle, SCENE, remote["classes"], block=128, scheduler=address)
        vectorize(remote["classes"], remote["polygons"], block=200, scheduler=address)
        report = evaluate(
            remote["classes"], LABELS, ignore=OTHER, regions=REGIONS, block=200, scheduler=address
        )
    np.testing.assert_array_equal(_pixels(remote["classes"]), _pixels(local["classes"]))
    assert_same_polygons(remote["polygons"], local["polygons"])
    for key in ("overall", "regions", "classes"):
        assert getattr(report, key) == getattr(expected, key)


@pytest.mark.slow
def test_a_worker_killed_mid_predict_changes_nothing(tmp_path, random_bundle, dask_client):
    reference, out = tmp_path / "ref.tif", tmp_path / "out.tif"
    predict_scene(random_bundle, SCENE, reference, block=64, client=dask_client)
    parts = out.parent / f".{out.name}.parts"
    errors: list[BaseException] = []
    killed = {}
    with external_cluster(2, "--no-nanny") as (address, procs):

        def run() -> None:
            try:
                predict_scene(random_bundle, SCENE, out, block=64, scheduler=address)
            except BaseException as exc:
                errors.append(exc)

        t = threading.Thread(target=run)
        t.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and t.is_alive():
            done = len(list(parts.glob("*.tif"))) if parts.exists() else 0
            if done >= 3:
                procs[0].kill()  # SIGKILL: no goodbye to the scheduler
                killed["after"] = done
                break
            time.sleep(0.02)
        t.join(timeout=300)
    assert not errors, errors
    assert killed, "the run ended before a worker could be killed"
    total = len(list(parts.glob("*"))) if parts.exists() else 0
    assert total == 0  # the part folder is gone: the map was assembled from every block
    np.testing.assert_array_equal(_pixels(out), _pixels(reference))


@pytest.mark.slow
def test_cpu_only_tasks_keep_off_gpu_workers(tmp_path, random_bundle, dask_client):
    import os
    import subprocess
    import sys

    from distributed import Client

    from geoseg.cluster import cpu_workers, run_tasks, workers_info

    def where(_item: int) -> str:  # defined here, so it travels by value to the workers
        from distributed import get_worker

        return str(get_worker().address)

    dask = os.path.join(os.path.dirname(sys.executable), "dask")
    with external_cluster(1) as (address, _):
        # a second worker that declares a GPU (a label for the scheduler: none is used here)
        gpu = subprocess.Popen(
            [
                dask,
                "worker",
                address,
                "--nthreads",
                "1",
                "--no-dashboard",
                "--host",
                "127.0.0.1",
                "--resources",
                "GPU=1",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            with Client(address) as client:
                client.wait_for_workers(2, timeout=60)
                workers = workers_info(client)
                cpu = [a for a, w in workers.items() if not w.get("resources")]
                assert cpu_workers(client) == cpu and len(cpu) == 1
                ran = run_tasks(client, where, list(range(12)), "where", cpu_only=True)
                assert set(ran) == set(cpu)
                anywhere = run_tasks(client, where, list(range(12)), "where")
                assert len(anywhere) == 12
            # and evaluate, through the CLI's path, counts the same with the GPU worker present
            classes = tmp_path / "c.tif"
            predict_scene(random_bundle, SCENE, classes, block=128, scheduler=address)
            remote = evaluate(classes, LABELS, ignore=OTHER, regions=REGIONS, scheduler=address)
            local = evaluate(classes, LABELS, ignore=OTHER, regions=REGIONS, client=dask_client)
            assert remote.overall == local.overall
        finally:
            gpu.terminate()
            gpu.wait(timeout=30)


def _sh(*cmd: str) -> None:
    import subprocess

    subprocess.run(cmd, check=True, capture_output=True, timeout=30)


@pytest.mark.slow
def test_predict_across_network_namespaces(tmp_path, random_bundle, dask_client):
    """The scheduler and each worker in a network namespace of their own, with their own
    addresses on a bridge, like separate hosts; the client in the root namespace."""
    import os
    import shutil
    import subprocess
    import sys

    import pytest
    from distributed import Client

    from geoseg.cluster import workers_info

    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2's ip for network namespaces")
    tag = f"gs{os.getpid() % 100000}"
    names = [f"{tag}s", f"{tag}a", f"{tag}b"]  # scheduler, two workers
    bridge, net = f"{tag}br", "10.231.7"
    try:
        _sh("ip", "netns", "add", names[0])
    except (subprocess.CalledProcessError, OSError) as exc:
        pytest.skip(f"network namespaces are not available here: {exc}")
    procs: list[subprocess.Popen] = []
    made = [names[0]]
    try:
        _sh("ip", "link", "add", bridge, "type", "bridge")
        _sh("ip", "addr", "add", f"{net}.254/24", "dev", bridge)
        _sh("ip", "link", "set", bridge, "up")
        for i, ns in enumerate(names, start=1):
            if ns not in made:
                _sh("ip", "netns", "add", ns)
                made.append(ns)
            _sh("ip", "link", "add", f"{ns}v", "type", "veth", "peer", "name", "eth0", "netns", ns)
            _sh("ip", "link", "set", f"{ns}v", "master", bridge, "up")
            _sh("ip", "-n", ns, "addr", "add", f"{net}.{i}/24", "dev", "eth0")
            _sh("ip", "-n", ns, "link", "set", "eth0", "up")
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
        dask = os.path.join(os.path.dirname(sys.executable), "dask")
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        address = f"tcp://{net}.1:8786"
        procs.append(
            subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    names[0],
                    dask,
                    "scheduler",
                    "--host",
                    f"{net}.1",
                    "--port",
                    "8786",
                    "--no-dashboard",
                ],
                **quiet,
            )
        )
        for i, ns in enumerate(names[1:], start=2):
            procs.append(
                subprocess.Popen(
                    [
                        "ip",
                        "netns",
                        "exec",
                        ns,
                        dask,
                        "worker",
                        address,
                        "--host",
                        f"{net}.{i}",
                        "--nthreads",
                        "1",
                        "--no-dashboard",
                    ],
                    **quiet,
                )
            )
        with Client(address, timeout="30s") as client:
            client.wait_for_workers(2, timeout=60)
            hosts = {w.split("//")[1].split(":")[0] for w in workers_info(client)}
        assert hosts == {f"{net}.2", f"{net}.3"}
        remote, local = tmp_path / "remote.tif", tmp_path / "local.tif"
        predict_scene(random_bundle, SCENE, remote, block=128, scheduler=address)
        predict_scene(random_bundle, SCENE, local, block=128, client=dask_client)
        np.testing.assert_array_equal(_pixels(remote), _pixels(local))
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        subprocess.run(["ip", "link", "del", bridge], capture_output=True, timeout=30)


@pytest.mark.slow
def test_geoseg_dask_settings_reach_local_and_external_workers():
    import dask
    from distributed import Client

    from geoseg.cluster import session, use_geoseg_defaults

    def settings() -> tuple[str | None, bool, str | None]:  # travels by value to the workers
        import os

        import dask

        return (
            os.environ.get("MALLOC_ARENA_MAX"),
            dask.config.get("distributed.worker.profile.enabled"),
            os.environ.get("MALLOC_TRIM_THRESHOLD_"),
        )

    use_geoseg_defaults()
    with session(1) as client:
        assert list(client.run(settings).values()) == [("1", False, "1073741824")]
        assert (
            client.run_on_scheduler(
                lambda: __import__("dask").config.get("distributed.scheduler.allowed-failures")
            )
            == 5
        )
    # a value the user set wins over geoseg's default
    with dask.config.set({"distributed.worker.profile.enabled": True}), session(1) as client:
        assert next(iter(client.run(settings).values()))[1] is True
    # workers started by hand with DASK_CONFIG pointing at geoseg's file, as docs/cluster.md says
    with external_cluster(1) as (address, _), Client(address) as client:
        assert list(client.run(settings).values()) == [("1", False, "1073741824")]


def test_a_task_that_keeps_killing_its_worker_is_one_clear_error():
    import dask
    import pytest

    from geoseg.cluster import run_tasks, session, use_geoseg_defaults
    from geoseg.errors import ClusterError

    def die(_item: object) -> None:  # as a worker killed by the kernel for memory would
        import os
        import signal

        os.kill(os.getpid(), signal.SIGKILL)

    use_geoseg_defaults()
    with (
        dask.config.set({"distributed.scheduler.allowed-failures": 1}),
        session(1) as client,
        pytest.raises(ClusterError) as err,
    ):
        run_tasks(client, die, [rasterio.windows.Window(512, 1024, 256, 128)], "predict")
    message = str(err.value)
    assert "\n" not in message
    assert "block at rows 1024-1152, columns 512-768 died 2 times" in message
    assert "use a smaller block or give the workers more memory" in message  # a Python caller
    assert "the same call run again keeps the finished blocks" in message


def test_a_gpu_machine_gets_one_local_worker_per_gpu(monkeypatch, caplog):
    """No GPU here: the machine is told it has two, and dask-cuda's class is stood in for by
    one that records how geoseg calls it and starts a plain LocalCluster."""
    import logging
    import sys
    import types

    from distributed import LocalCluster

    import geoseg.cluster
    from geoseg.cluster import GPU, session

    def torch_threads_and_gpu(dask_worker) -> tuple[str | None, float]:  # travels by value
        import os

        gpus = dask_worker.state.total_resources.get("GPU", 0)
        return os.environ.get("GEOSEG_TORCH_THREADS"), gpus

    calls: list[dict] = []

    def fake_cuda_cluster(**kwargs):
        calls.append(kwargs)
        return LocalCluster(processes=True, **kwargs)

    monkeypatch.setattr(geoseg.cluster, "cuda_devices", lambda: 2)
    monkeypatch.setitem(
        sys.modules, "dask_cuda", types.SimpleNamespace(LocalCUDACluster=fake_cuda_cluster)
    )
    cores = __import__("os").cpu_count()
    with session(gpu=True) as client:
        seen = list(client.run(torch_threads_and_gpu).values())
    # two threads a GPU worker: one block is read and written while the other's model runs
    assert len(calls) == 1 and calls[0]["n_workers"] == 2 and calls[0]["threads_per_worker"] == 2
    assert calls[0]["resources"] == {GPU: 1}
    assert seen == [(str(max(1, cores // 2)), 1)] * 2
    # CPU-only work on the same machine: a plain cluster without the GPU resource
    with session(1, gpu=False) as client:
        assert list(client.run(torch_threads_and_gpu).values()) == [(str(cores), 0)]
    assert len(calls) == 1
    # without dask-cuda: a LocalCluster, one worker per GPU, and a warning that they share one
    monkeypatch.setitem(sys.modules, "dask_cuda", None)
    with caplog.at_level(logging.WARNING, logger="geoseg"), session(gpu=True) as client:
        assert len(client.run(torch_threads_and_gpu)) == 2
    assert "share the first GPU" in caplog.text and "geoseg[cuda]" in caplog.text


def test_a_local_cluster_that_trips_while_closing_does_not_end_the_run(caplog, monkeypatch):
    """distributed's close can assert "can only join a started process" when a worker that
    died is being started again (seen here in about 1 of 10 runs of the test above on a loaded
    machine, where it replaced the ClusterError with Dask's traceback). The close of a local
    cluster logs that and goes on, and Dask's loggers are as they were after it."""
    import logging

    from geoseg.cluster import _close

    class Tripping:
        def close(self) -> None:
            logging.getLogger("tornado.application").error("a callback failed")  # held back
            raise AssertionError("can only join a started process")

    dask_log = logging.getLogger("distributed")
    before = dask_log.level
    monkeypatch.setattr(logging.getLogger("geoseg"), "propagate", True)  # the CLI's tests unset it
    with caplog.at_level(logging.DEBUG), caplog.at_level(logging.DEBUG, logger="geoseg"):
        _close(Tripping())
    assert "did not close cleanly: can only join a started process" in caplog.text
    assert "a callback failed" not in caplog.text
    assert dask_log.level == before


@pytest.mark.slow
def test_tasks_start_in_the_order_given_one_per_worker_thread(dask_client):
    """predict hands out its largest blocks first; that only helps if they start first, and if
    no worker holds a second block while another has nothing to do."""
    from geoseg.cluster import run_tasks, session

    def stamp(item: int) -> tuple[int, float, float]:  # travels by value to the workers
        import time

        t = time.monotonic()
        time.sleep(0.2 * item)
        return item, t, time.monotonic()

    items = [6, 5, 4, 3, 2, 1, 1, 1]
    with session(1) as client:
        ran = run_tasks(client, stamp, items, "stamps", paced=True)
    assert [r[0] for r in ran] == items  # results in the order of the items
    assert sorted(ran, key=lambda r: r[1]) == ran  # and started in that order
    ran = run_tasks(dask_client, stamp, items, "stamps", paced=True)  # two one-thread workers
    assert [r[0] for r in ran] == items
    starts, ends = [r[1] for r in ran], [r[2] for r in ran]
    assert abs(starts[1] - starts[0]) < 0.1  # both workers start at once
    # each later task starts as soon as a worker is free (greedy list scheduling): the k-th
    # task when the (k-1)-th of the tasks before it ends, not when its own worker's share ends
    for k in range(2, len(items)):
        free = sorted(ends[:k])[k - 2]
        assert free - 0.01 <= starts[k] < free + 0.1, (k, starts[k] - free)


@pytest.mark.slow
def test_a_gpu_worker_runs_two_blocks_at_once_and_one_training(monkeypatch):
    """A GPU worker as geoseg's local cluster makes one (no GPU here: the machine is told it
    has one, and no dask-cuda): predict's block tasks run two at a time on it, so that one
    reads its block while the other's model runs, and never more; a training rank, and the
    model-time estimate of ``--window auto``, count one per GPU."""
    import geoseg.cluster
    from geoseg.cluster import (
        GPU,
        model_slots,
        run_tasks,
        session,
        task_resources,
        worker_slots,
    )

    def stamp(item: int) -> tuple[float, float]:  # travels by value to the workers
        import time

        t = time.monotonic()
        time.sleep(0.4)
        return t, time.monotonic()

    monkeypatch.setattr(geoseg.cluster, "cuda_devices", lambda: 1)
    monkeypatch.setitem(__import__("sys").modules, "dask_cuda", None)
    with session(gpu=True) as client:
        blocks = task_resources(client, "cuda", blocks=True)
        assert blocks == {GPU: 0.5}
        assert task_resources(client, "cuda") == {GPU: 1}
        assert worker_slots(client, blocks, None) == 2
        assert worker_slots(client, {GPU: 1}, None) == 1  # the worker's two threads: one GPU
        assert model_slots(client, "cuda") == model_slots(client, "auto") == 1
        ran = run_tasks(client, stamp, list(range(6)), "stamps", resources=blocks, paced=True)
    at_once = max(sum(s <= t < e for s, e in ran) for t, _ in ran)
    assert at_once == 2, ran


def test_follow_ups_run_as_soon_as_what_they_need_is_done(dask_client):
    """A mosaic block's composite starts once the scene blocks under it are predicted, while
    later scene blocks still run, not after the last of them."""
    from geoseg.cluster import FollowUp, run_tasks

    def stamp(item: float) -> tuple[float, float, float]:  # travels by value to the workers
        import time

        t = time.monotonic()
        time.sleep(item)
        return item, t, time.monotonic()

    items = [0.2, 0.2, 1.0, 1.0, 1.0, 1.0]
    # follow-up 0 needs the two short items, 1 the last item, 2 nothing of this run
    then = FollowUp(stamp, [0.01, 0.01, 0.01], [{0, 1}, {5}, set()])
    ran = run_tasks(dask_client, stamp, items, "stamps", paced=True, then=then)
    assert len(ran) == len(items) + 3
    assert [r[0] for r in ran] == [*items, 0.01, 0.01, 0.01]  # items' results, then follow-ups'
    short_done = max(ran[0][2], ran[1][2])
    assert short_done <= ran[6][1] < min(r[2] for r in ran[2:6])  # before any long item ends
    assert ran[7][1] >= ran[5][2]  # not before what it needs
    assert ran[8][1] < ran[2][2]  # needing nothing of this run: at once
    with pytest.raises(ValueError, match="never run"):
        run_tasks(dask_client, stamp, [0.01], "stamps", then=FollowUp(stamp, [0.01], [{3}]))


def test_workers_are_counted_from_the_scheduler_not_a_stale_cache(dask_client, monkeypatch):
    """The client refreshes a cached identity on its own, with no workers in it (n_workers=0);
    a refresh that lands just after ours used to make every worker look lost mid-training."""
    from geoseg.cluster import workers_info

    async def stale_refresh(n_workers: int = 0) -> None:  # the periodic refresh won the race
        dask_client._scheduler_identity = {"workers": {}}

    monkeypatch.setattr(dask_client, "_update_scheduler_info", stale_refresh)
    assert dask_client.scheduler_info()["workers"] == {}  # what the old code read
    assert len(workers_info(dask_client)) == 2


def test_a_small_scene_runs_in_this_process_and_gives_the_same_maps(
    tmp_path, random_bundle, dask_client
):
    """With no cluster given, a small scene is predicted and vectorized in the calling process
    (no worker processes to start): the same class map and polygons as on a cluster."""
    import subprocess
    import sys
    from pathlib import Path

    expected = tmp_path / "cluster.tif"
    predict_scene(random_bundle, SCENE, expected, window=64, client=dask_client)
    vectorize(expected, tmp_path / "cluster.gpkg", client=dask_client)
    geoseg = str(Path(sys.executable).with_name("geoseg"))
    out = tmp_path / "here.tif"
    for args in (
        ["predict", str(random_bundle), str(SCENE), "-o", str(out), "--window", "64"],
        ["vectorize", str(out), "-o", str(tmp_path / "here.gpkg")],
    ):
        run = subprocess.run([geoseg, *args], capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
        assert "small enough to run in this process" in run.stderr
    np.testing.assert_array_equal(_pixels(out), _pixels(expected))
    assert_same_polygons(tmp_path / "here.gpkg", tmp_path / "cluster.gpkg")


def test_running_in_this_process_leaves_its_torch_threads_and_environment():
    import os

    import torch

    from geoseg.cluster import in_process
    from geoseg.tasks import TORCH_THREADS

    before, env = torch.get_num_threads(), os.environ.get(TORCH_THREADS)
    with in_process() as client:
        assert client.submit(os.environ.get, TORCH_THREADS).result() is not None
        client.submit(torch.set_num_threads, 1).result()  # as every task does
    assert torch.get_num_threads() == before and os.environ.get(TORCH_THREADS) == env


_HEAP_OR_MAPPED = """
import ctypes, sys
import numpy as np

class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info

def faults_for(nbytes):
    # the pages the process faults in while it makes and fills arrays of nbytes in all
    import resource
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    arrays = [np.ones(4 << 20, np.uint8) for _ in range(nbytes // (4 << 20))]
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

def mapped_for(nbytes):
    # bytes glibc mapped afresh for one array of nbytes: all of them, or none (from its heap)
    before = libc.mallinfo2().hblkhd
    a = np.ones(nbytes, np.uint8)
    grown = libc.mallinfo2().hblkhd - before
    del a
    return grown

{body}
"""


def _allocator_run(body: str) -> list[int]:
    import subprocess
    import sys

    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("MALLOC_")}
    run = subprocess.run(
        [sys.executable, "-c", _HEAP_OR_MAPPED.format(body=body)],
        capture_output=True, text=True, env=env, check=True,
    )  # fmt: skip
    return [int(x) for x in run.stdout.split() if x.isdigit()]  # after --version's line


@pytest.mark.skipif(
    __import__("platform").libc_ver()[0] != "glibc", reason="glibc's allocator settings"
)
def test_the_command_and_an_in_process_worker_allocate_as_the_workers_do():
    """A model's 8 MiB activation buffers come from the heap under the workers' settings, not
    from a fresh mapping on every call (which made the model 1.3x slower on one thread): in the
    geoseg command from its start, and in a Python session while a small scene's worker runs
    in it (then glibc's defaults come back)."""
    mib8 = 8 << 20
    (plain,) = _allocator_run("print(mapped_for(8 << 20))")
    assert plain >= mib8  # glibc's defaults: mapped
    (command,) = _allocator_run(
        "sys.argv = ['geoseg', '--version']\n"
        "from geoseg.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print(mapped_for(8 << 20))"
    )
    assert command == 0
    inside, after = _allocator_run(
        "from geoseg.cluster import in_process\n"
        "with in_process() as client:\n    print(mapped_for(8 << 20))\n"
        "print(mapped_for(24 << 20))"  # more than the heap kept free: the threshold decides
    )
    assert inside == 0 and after >= 3 * mib8


@pytest.mark.skipif(
    __import__("platform").libc_ver()[0] != "glibc", reason="glibc's allocator settings"
)
def test_a_command_that_may_run_here_backs_its_workers_memory_while_it_imports():
    """``warm_heap`` (which predict, run and demo start first when no cluster is named) leaves
    memory the allocator hands out later already backed: a small scene's worker threads then
    do not fault it in page by page while the model runs."""
    setup = "from geoseg.allocator import set_worker_malloc, warm_heap\nset_worker_malloc()\n"
    (cold,) = _allocator_run(setup + "print(faults_for(128 << 20))")
    (warm,) = _allocator_run(setup + "warm_heap().join()\nprint(faults_for(128 << 20))")
    assert cold > 10_000  # 32768 pages of 4 KiB, less any glibc had already
    assert warm < cold / 10
