"""Training epochs on a LocalCluster with Dask's default worker environment against geoseg's
(geoseg/dask.yaml: glibc's mmap threshold raised to 32 MiB, heap trimming off, one arena).

    python benchmarks/worker_malloc.py [--epochs 3] [--repeats 2]

Prints seconds per epoch (median over epochs after the first, which includes start-up) and the
ratio, and appends them to benchmarks/results/worker_malloc.json.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
from pathlib import Path

import dask
import distributed  # noqa: F401  (Dask's own defaults, read below)
from _results import append_result

import geoseg.cluster
from geoseg.pipeline import demo_workflow
from geoseg.stages.train import train

SAMPLE = demo_workflow().parent


def run(env: dict[str, str], epochs: int) -> list[float]:
    # Dask's nanny copies these into this process's environment, where they would win over the
    # next run's config: put the environment back after each run
    saved = dict(os.environ)
    with (
        dask.config.set({"distributed.nanny.pre-spawn-environ": env}),
        tempfile.TemporaryDirectory() as d,
    ):
        try:
            result = train(
                SAMPLE / "nc_landsat7_2000.tif",
                SAMPLE / "nc_landclass96.tif",
                Path(d) / "m.bundle",
                within=SAMPLE / "nc_train_west60.gpkg",
                arch_args={"depth": 3, "base_width": 16},
                epochs=epochs,
                workers=2,
            )
        finally:
            os.environ.clear()
            os.environ.update(saved)
    return [h["seconds"] for h in result.history]


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    dask_default = dict(dask.config.get("distributed.nanny.pre-spawn-environ"))
    geoseg.cluster.use_geoseg_defaults()
    rows = {
        "dask default": dask_default,
        "geoseg": dict(dask.config.get("distributed.nanny.pre-spawn-environ")),
    }
    seconds: dict[str, list[float]] = {k: [] for k in rows}
    for _ in range(args.repeats):
        for name, env in rows.items():  # interleaved, so drift hits both alike
            seconds[name] += run(env, args.epochs)[1:]
    med = {k: statistics.median(v) for k, v in seconds.items()}
    for k, v in med.items():
        print(f"{k:>13}: {v:6.2f} s per epoch (median of {len(seconds[k])})")
    print(f"speed-up: {med['dask default'] / med['geoseg']:.2f}x")
    append_result(
        "worker_malloc",
        {
            "epochs": args.epochs,
            "repeats": args.repeats,
            "seconds_per_epoch": med,
            "speedup": med["dask default"] / med["geoseg"],
        },
    )


if __name__ == "__main__":
    main()
