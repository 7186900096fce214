"""The glibc allocator settings geoseg's Dask workers start with (``dask.yaml``, where the
reasons are), and the same settings for a process that runs geoseg's work itself: the
``geoseg`` command, and a worker in the calling process (a small scene).

glibc reads ``MALLOC_*`` variables only when a process starts, so a running process sets them
with ``mallopt``; the arena limit takes only if set before the process's second thread first
allocates, which is why the command sets them first thing. Measured on 2 cores, the default U-Net
on 512 px windows in bf16: 3.9 windows/s on one thread with glibc's defaults, 5.0 with these
(9.2 against 8.3 on two threads); a 2048² scene in the calling process took 3.2-3.3 s with them
set at the start, 3.6-4.0 s set only around the run (``benchmarks/README.md``).
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

# geoseg's Dask settings (worker allocator, profiler, lost-worker retries), with the reasons for
# each: the defaults of its local cluster (geoseg.cluster), and a config file for clusters
# started by hand; read here, below the cluster layer, because the allocator's part is needed
# before any cluster exists
DASK_CONFIG = Path(__file__).with_name("dask.yaml")
DASK_DEFAULTS: dict[str, Any] = yaml.safe_load(DASK_CONFIG.read_text())
WORKER_MALLOC_ENV: dict[str, str] = dict(DASK_DEFAULTS["distributed"]["nanny"]["pre-spawn-environ"])
"""The allocator settings the workers start with (benchmarks run their own processes under
them)."""

# glibc's mallopt parameter for each variable, and its default value
_PARAMS = {"MALLOC_TRIM_THRESHOLD_": -1, "MALLOC_MMAP_THRESHOLD_": -3, "MALLOC_ARENA_MAX": -8}
_DEFAULTS = {"MALLOC_TRIM_THRESHOLD_": 128 * 1024, "MALLOC_MMAP_THRESHOLD_": 128 * 1024,
             "MALLOC_ARENA_MAX": 0}  # fmt: skip


@functools.cache
def _mallopt() -> Any:
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return None


def set_worker_malloc() -> list[str]:
    """Give this process the workers' allocator settings (those its environment does not set
    itself); returns the variables set (none where the C library is not glibc)."""
    mallopt = _mallopt()
    if mallopt is None:
        return []
    chosen = [k for k in _PARAMS if k not in os.environ]
    for k in chosen:
        mallopt(_PARAMS[k], int(WORKER_MALLOC_ENV[k]))
    return chosen


WARM_HEAP_BYTES = 256 << 20
"""How much heap :func:`warm_heap` backs: about what a small scene's worker threads use."""


def warm_heap(nbytes: int = WARM_HEAP_BYTES) -> threading.Thread | None:
    """Back ``nbytes`` of heap memory in a background thread and hand them back to the
    allocator, which keeps them (the workers' trim threshold); returns the thread, or None
    where the allocator would not keep them.

    Started first thing by a command that may run a worker in its process, it runs beside the
    imports on a core they leave idle: the model's first passes and the first blocks then
    find memory already backed instead of faulting it in while they run (on the 2-core VM of
    ``benchmarks/README.md``, 0.12 s for 256 MiB here against about 0.2 s saved on a 2048²
    scene's call)."""
    mallopt = _mallopt()
    kept = all(
        os.environ.get(k, WORKER_MALLOC_ENV[k]) == WORKER_MALLOC_ENV[k]
        for k in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")
    )
    if mallopt is None or not kept:
        return None
    # pieces under the mmap threshold come from the heap, which is not trimmed when they are
    # freed; larger ones would be mapped and unmapped
    piece = min(16 << 20, int(WORKER_MALLOC_ENV["MALLOC_MMAP_THRESHOLD_"]) // 2)

    def touch() -> None:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.malloc.restype = ctypes.c_void_p
        libc.free.argtypes = [ctypes.c_void_p]
        pieces = [libc.malloc(piece) for _ in range(nbytes // piece)]
        for p in pieces:
            if p:
                ctypes.memset(p, 0, piece)
        for p in pieces:
            libc.free(p)

    thread = threading.Thread(target=touch, name="geoseg-warm-heap", daemon=True)
    thread.start()
    return thread


@contextlib.contextmanager
def worker_malloc() -> Iterator[None]:
    """The workers' allocator settings while the block runs, then glibc's default values (its
    mmap threshold then stays fixed instead of adapting); for a worker in a process that did
    not start with them, such as a Python session's."""
    chosen = set_worker_malloc()
    try:
        yield
    finally:
        mallopt = _mallopt()
        for k in chosen:
            mallopt(_PARAMS[k], _DEFAULTS[k])
