"""What runs on a Dask worker: one module per stage, each a set of task bodies that take plain
values (paths, windows, small frozen settings) and return small results.

Task modules import only the pure layer (``io``, ``tiling``, ``bundle``, ``models``, ``labels``,
...): never ``distributed``, :mod:`geoseg.cluster` or a driver of :mod:`geoseg.stages`
(``tests/test_layout.py`` holds the rule).
"""

from __future__ import annotations

import os

TORCH_THREADS = "GEOSEG_TORCH_THREADS"
"""Environment variable: the threads torch uses in a task. geoseg sets it on every worker of
the clusters it uses (its worker's share of the machine's cores: Dask starts workers with
``OMP_NUM_THREADS=1``, so torch would otherwise use one thread)."""


def torch_threads() -> int:
    """Threads torch should use in this process: ``GEOSEG_TORCH_THREADS`` when set, else all
    cores."""
    env = os.environ.get(TORCH_THREADS)
    return max(1, int(env)) if env else os.cpu_count() or 1


def cuda_devices() -> int:
    """The CUDA GPUs this process sees (0 without CUDA)."""
    import torch

    return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0
