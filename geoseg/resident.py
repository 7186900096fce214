"""A local cluster kept between commands: ``geoseg cluster start`` / ``status`` / ``stop``.

A command with no cluster named starts its own (or, for a small scene, runs in its process),
and pays for it every time: worker processes, torch imported in each, the model loaded and its
first passes. ``geoseg cluster start`` starts a scheduler and worker processes on 127.0.0.1 in
the background, with geoseg's Dask settings, and writes their address to ``cluster.json`` in
geoseg's cache folder. Later commands on this machine that name no cluster (no ``--scheduler``,
``--workers`` or ``DASK_SCHEDULER_ADDRESS``) find it and send their tasks there, where the
imports, the model and its kernels are already warm. The scheduler stops itself after an idle
time (``--idle-timeout``, 15 minutes by default) and its workers follow; ``geoseg cluster
stop`` stops it at once. A cluster started by another geoseg version is not used.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

from geoseg import __version__
from geoseg.errors import ClusterError
from geoseg.tasks import TORCH_THREADS, cuda_devices
from geoseg.tuning import cache_path

log = logging.getLogger("geoseg")

IDLE_TIMEOUT = "15m"
"""How long the kept cluster waits without work before it stops (``--idle-timeout``)."""

# the dask CLIs run with geoseg's Dask settings as defaults (a value the user set still wins)
_LAUNCH = (
    "import sys; from geoseg.cluster import use_geoseg_defaults; use_geoseg_defaults(); "
    "from distributed.cli.{0} import main; sys.argv[0] = 'dask'; main()"
)


@dataclass
class Resident:
    """A kept cluster as ``cluster.json`` records it."""

    address: str
    workers: int
    scheduler_pid: int
    workers_pid: int
    version: str
    started: float
    idle_timeout: str
    folder: str


def state_file() -> Path:
    """Where the kept cluster is recorded: ``cluster.json`` in geoseg's cache folder."""
    return cache_path("cluster.json")


def _alive(pid: int, marker: str) -> bool:
    """Whether ``pid`` runs and is the process geoseg started (its command line holds
    ``marker``: a pid the system gave to another process since is not)."""
    try:
        return marker in " ".join(psutil.Process(pid).cmdline())
    except (psutil.Error, OSError):
        return False


def _read() -> Resident | None:
    try:
        return Resident(**json.loads(state_file().read_text()))
    except (OSError, ValueError, TypeError):
        return None


def find() -> Resident | None:
    """The kept cluster of this machine's cache folder, if its scheduler runs and it was
    started by this geoseg version. A record whose scheduler has stopped (its idle time ran
    out) is removed."""
    r = _read()
    if r is None:
        return None
    if not _alive(r.scheduler_pid, r.folder):
        state_file().unlink(missing_ok=True)
        log.debug("the kept cluster at %s has stopped; its record is removed", r.address)
        return None
    if r.version != __version__:
        log.warning(
            "the cluster kept at %s was started by geoseg %s, this is %s: not used; "
            "'geoseg cluster stop' then 'geoseg cluster start' replaces it",
            r.address,
            r.version,
            __version__,
        )
        return None
    return r


def start(workers: int, idle_timeout: str = IDLE_TIMEOUT) -> tuple[Resident, bool]:
    """Start the kept cluster (``workers`` processes of one thread each) unless one runs;
    return it and whether it was started now. Two starts at once make one cluster: the
    second waits for the first and returns its cluster."""
    running = find()
    if running is not None:
        return running, False
    folder = state_file().parent / "cluster"
    folder.mkdir(parents=True, exist_ok=True)
    with _start_lock(folder):
        running = find()
        if running is not None:
            return running, False
        return _start(folder, workers, idle_timeout), True


@contextlib.contextmanager
def _start_lock(folder: Path) -> Iterator[None]:
    """Hold ``folder``'s start lock (an advisory lock, released when the process ends)."""
    with open(folder / "start.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another 'geoseg cluster start' is starting the kept cluster; waiting for it")
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _start(folder: Path, workers: int, idle_timeout: str) -> Resident:
    from dask.utils import parse_timedelta
    from distributed import Client

    if cuda_devices():
        raise ClusterError(
            "'geoseg cluster start' keeps CPU workers, and this machine has CUDA GPUs; "
            "GPU work starts its own local cluster of a worker per GPU, or use 'dask worker "
            "--nthreads 2 --resources GPU=1' once per GPU and pass --scheduler (docs/cluster.md)"
        )
    if _read() is not None:  # another version's, still running
        raise ClusterError(
            "a cluster kept by another geoseg version runs; stop it with 'geoseg cluster stop'"
        )
    try:
        parse_timedelta(idle_timeout)
    except (ValueError, KeyError):
        raise ClusterError(
            f"--idle-timeout {idle_timeout!r} is not a duration; expected a number of seconds "
            "or a time such as 90s, 15m or 2h"
        ) from None
    scheduler_file = folder / "scheduler.json"
    scheduler_file.unlink(missing_ok=True)
    env = {**os.environ, TORCH_THREADS: str(max(1, (os.cpu_count() or 1) // workers))}
    env.pop("DASK_SCHEDULER_ADDRESS", None)
    common: dict[str, Any] = {"env": env, "start_new_session": True, "stdin": subprocess.DEVNULL}
    started: list[int] = []
    try:
        with open(folder / "scheduler.log", "w") as out:
            sched = subprocess.Popen(
                [
                    *(sys.executable, "-c", _LAUNCH.format("dask_scheduler"), "--host"),
                    *("127.0.0.1", "--port", "0", "--dashboard-address", "127.0.0.1:0"),
                    *("--idle-timeout", idle_timeout, "--scheduler-file", str(scheduler_file)),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                **common,
            )
        started.append(sched.pid)
        address = _wait_for_address(scheduler_file, sched, folder)
        with open(folder / "workers.log", "w") as out:
            work = subprocess.Popen(
                [
                    *(sys.executable, "-c", _LAUNCH.format("dask_worker"), address),
                    *("--nworkers", str(workers), "--nthreads", "1"),
                    *("--preload", "geoseg.worker_preload", "--death-timeout", "30"),
                    *("--host", "127.0.0.1"),
                    *("--dashboard-address", "127.0.0.1:0", "--name", str(folder)),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                **common,
            )
        started.append(work.pid)
        with Client(address, timeout="10s") as client:
            # a task waiting for workers keeps the scheduler from counting as idle meanwhile
            waiting = client.submit(_warm_imports, pure=False)
            client.wait_for_workers(workers, timeout=120)
            # each worker's first real task then finds torch and geoseg imported
            names = list(client.scheduler_info(n_workers=-1)["workers"])
            warm = [
                client.submit(_warm_imports, pure=False, workers=[w], allow_other_workers=False)
                for w in names
            ]
            client.gather([waiting, *warm])
        r = Resident(
            address, workers, sched.pid, work.pid, __version__, time.time(), idle_timeout,
            str(folder),
        )  # fmt: skip
        _record(r)
    except BaseException as exc:  # Ctrl-C too: nothing is left running without a record
        _terminate(started, str(folder))
        if not isinstance(exc, Exception) or isinstance(exc, ClusterError):
            raise
        raise ClusterError(
            f"the kept cluster did not start ({exc}); see {folder / 'workers.log'}"
        ) from None
    return r


def _record(r: Resident) -> None:
    tmp = state_file().with_suffix(".json.tmp")
    try:
        tmp.write_text(json.dumps(asdict(r), indent=1))
        tmp.replace(state_file())
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise ClusterError(
            f"could not record the kept cluster in {state_file()} ({exc.strerror}), so it was "
            "stopped; expected a writable cache folder: free some space there or set "
            "GEOSEG_CACHE to another folder"
        ) from None


def _warm_imports() -> None:
    # torch, rasterio and the model code
    import geoseg.tasks.predict
    import geoseg.tasks.train  # noqa: F401


def _wait_for_address(scheduler_file: Path, proc: subprocess.Popen[Any], folder: Path) -> str:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            return str(json.loads(scheduler_file.read_text())["address"])
        except (OSError, ValueError, KeyError):
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    # the caller ends the scheduler
    raise ClusterError(
        f"the kept cluster's scheduler did not start; see {folder / 'scheduler.log'}"
    )


def stop() -> Resident | None:
    """Stop the kept cluster, whatever version started it; return it, or None if none ran."""
    r = _read()
    if r is None:
        return None
    if _alive(r.scheduler_pid, r.folder):
        from distributed import Client

        try:
            with Client(r.address, timeout="5s") as client:
                client.shutdown()
        except Exception as exc:  # a scheduler that does not answer is stopped below
            log.debug("the kept cluster did not shut down when asked (%s)", exc)
    _terminate([r.workers_pid, r.scheduler_pid], r.folder)
    state_file().unlink(missing_ok=True)
    return r


def _terminate(pids: Iterable[int], marker: str) -> None:
    """End the processes geoseg started (the ``pids`` whose command line holds ``marker``)
    and their children, waiting up to 10 s."""
    procs = []
    for pid in pids:
        if _alive(pid, marker):
            try:
                p = psutil.Process(pid)
                procs += [p, *p.children(recursive=True)]
            except psutil.Error:
                pass
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, left = psutil.wait_procs(procs, timeout=10)
    for p in left:
        with contextlib.suppress(psutil.Error):
            p.kill()


def describe(r: Resident, workers: int) -> str:
    """One line for ``geoseg cluster status``: ``workers`` is how many the scheduler has now."""
    age = time.time() - r.started
    return (
        f"a kept cluster runs at {r.address}: {workers} worker processes, started "
        f"{age / 60:.0f} min ago, stops after {r.idle_timeout} without work "
        "('geoseg cluster stop' stops it now)"
    )
