"""Real Dask clusters on 127.0.0.1 for the tests and benchmarks of the ``--scheduler`` path:
``dask scheduler`` and ``dask worker`` processes, with geoseg's ``dask.yaml``."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

from distributed import Client

from geoseg.cluster import DASK_CONFIG


@contextlib.contextmanager
def loopback_cluster(
    workers: int = 1,
    *worker_args: str,
    env: dict[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
) -> Iterator[tuple[str, list[Any]]]:
    """Start real ``dask scheduler`` and ``dask worker`` processes (one thread each) on
    127.0.0.1; yield the scheduler's address and the worker processes, and stop them all after.
    ``worker_args`` go to every ``dask worker``, ``env`` adds to their environment; every
    process reads geoseg's ``dask.yaml``; ``cwd``: the workers' working folder. For tests and
    benchmarks of the ``--scheduler`` path."""

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    dask = os.path.join(os.path.dirname(sys.executable), "dask")  # this environment's script
    quiet: dict[str, Any] = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    # geoseg's Dask settings, given to every process as the cluster guide says
    settings = {**os.environ, "DASK_CONFIG": str(DASK_CONFIG)}
    scheduler = subprocess.Popen(
        [dask, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
        env=settings,
        **quiet,
    )
    procs: list[Any] = []
    worker_env = {**settings, **(env or {})}
    try:
        time.sleep(2)
        for _ in range(workers):
            args = ["--nthreads", "1", "--no-dashboard", "--host", "127.0.0.1", *worker_args]
            procs.append(
                subprocess.Popen([dask, "worker", address, *args], env=worker_env, cwd=cwd, **quiet)
            )
        with Client(address, timeout="30s") as c:
            c.wait_for_workers(workers, timeout=60)
        yield address, procs
    finally:
        for p in [*reversed(procs), scheduler]:
            p.terminate()
        for p in [*reversed(procs), scheduler]:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:  # e.g. a rank stuck in a collective of a lost peer
                p.kill()
                p.wait(timeout=30)
