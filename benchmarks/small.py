"""Small scenes from a cold process: geoseg predict at its defaults (which runs a small scene in
the calling process) and with 2 worker processes (`workers=2`, the local cluster), against the
model alone on the same windows; and on a cluster kept by `geoseg cluster start` (2 workers,
started by the script), which the calls find and use: its first call, which warms the workers,
is reported apart.

    python benchmarks/small.py [--sizes 2048 4096] [--repeats 3] [--only-default]

Every timed call runs in a fresh Python process, as a command would: geoseg and torch imported,
no cluster, nothing loaded, started without the allocator settings of geoseg's workers, which
it then sets first thing, as the `geoseg` command does (the model alone runs under them), and
with the heap warmed beside the imports where no cluster is named, as `geoseg predict` does. The
wall time is that of the `predict_scene` call, from the call to the finished COG (the imports are
the same for every way of running it, so they are left out); the time from the process's start
is reported beside it. The window chosen for throughput is measured once per
setting first, untimed, so the timed calls find it cached, as every call after a user's first
does. The model alone runs the same number of windows of the same size from memory, all cores,
bf16, in its own fresh process, two ways: one process with a torch thread per core, and a
process of one thread per core all at once; the faster is the limit. The default U-Net (width 32, random weights), the NC sample
tiled to the size. Prints a table and appends it to benchmarks/results/small.json; the figure
per row is the median of the repeats.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _results import finish, under_worker_malloc

from geoseg import resident
from geoseg.allocator import WORKER_MALLOC_ENV

HERE = Path(__file__).resolve().parent

CALL = """
import json, sys, time
began = time.perf_counter()
from geoseg.allocator import set_worker_malloc, warm_heap
set_worker_malloc()  # as the geoseg command does first
if {workers} is None:
    warm_heap()  # as geoseg predict does when no cluster is named
sys.path.insert(0, {here!r})
from geoseg.stages.predict import predict_scene
t = time.perf_counter()
r = predict_scene({bundle!r}, {scene!r}, {out!r}, overwrite=True, workers={workers})
wall = time.perf_counter() - t
print(json.dumps({{"wall": wall, "process": time.perf_counter() - began,
                   "window": r.window, "batch": r.batch_size,
                   "windows": r.windows_run, "start": r.seconds["start"],
                   "assemble": r.seconds["assemble"]}}))
"""

ALONE = """
import json, sys, torch
sys.path.insert(0, {here!r})
from pathlib import Path
from predict import model_alone, model_alone_processes
torch.set_num_threads({threads})
one = model_alone(Path({bundle!r}), {windows}, {window}, {batch}, bf16=True)
apart = model_alone_processes(Path({bundle!r}), {windows}, {window}, {batch}, {threads})
print(json.dumps({{"one process": one, "process per core": apart}}))
"""


def fresh(code: str, *, as_user: bool = False) -> dict[str, float]:
    """Run ``code`` in a new Python process; its last line of output, as JSON. ``as_user``:
    without the workers' allocator settings that this script runs under, as a user's command
    starts (geoseg sets them itself where it runs a worker in its process)."""
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    if as_user:
        env = {k: v for k, v in env.items() if k not in WORKER_MALLOC_ENV}
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False
    )
    if run.returncode:
        raise SystemExit(run.stderr)
    result: dict[str, float] = json.loads(run.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    under_worker_malloc()
    logging.basicConfig(level=logging.WARNING)
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only-default", action="store_true", help="skip the 2-process runs")
    args = ap.parse_args()
    from predict import make_bundle, make_scene

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        os.environ["GEOSEG_CACHE"] = str(d / "cache")  # a cache of this run's own
        bundle = make_bundle(d / "unet.bundle", 256)
        for size in args.sizes:
            scene = d / f"scene_{size}.tif"
            make_scene(scene, size)
            row: dict[str, object] = {"size": size}
            ways = [("default", None), ("kept cluster", None)]
            ways += [] if args.only_default else [("2 processes", 2)]
            for name, workers in ways:
                if name == "kept cluster":  # the calls find it through GEOSEG_CACHE
                    resident.start(2)
                code = CALL.format(
                    here=str(HERE),
                    bundle=str(bundle),
                    scene=str(scene),
                    out=str(d / "c.tif"),
                    workers=workers,
                )
                first = fresh(code, as_user=True)  # fills the window cache
                calls = [fresh(code, as_user=True) for _ in range(args.repeats)]
                if name == "kept cluster":  # the model alone runs with nothing else up
                    resident.stop()
                walls = [c["wall"] for c in calls]
                last = calls[-1]
                ways_alone = [
                    fresh(
                        ALONE.format(
                            here=str(HERE),
                            bundle=str(bundle),
                            threads=os.cpu_count(),
                            windows=int(c["windows"]),
                            window=int(c["window"]),
                            batch=int(c["batch"]),
                        )
                    )
                    for c in calls
                ]
                # the limit: the faster of one process of a torch thread per core and a process
                # of one thread per core (faster on this machine, benchmarks/README)
                alone = [min(w.values()) for w in ways_alone]
                for way in ("one process", "process per core"):
                    row[f"{name}: model alone, {way} s"] = [round(w[way], 2) for w in ways_alone]
                ratios = [a / w for a, w in zip(alone, walls)]
                row[f"{name}: window, windows"] = f"{int(last['window'])}, {int(last['windows'])}"
                row[f"{name}: wall s"] = [round(w, 2) for w in walls]
                # from the process's start, imports included (the heap is warmed beside them)
                row[f"{name}: with the imports s"] = [round(c["process"], 2) for c in calls]
                row[f"{name}: model alone s"] = [round(a, 2) for a in alone]
                row[f"{name}: of the model alone (median)"] = round(statistics.median(ratios), 2)
                row[f"{name}: cluster start s"] = round(last["start"], 2)
                row[f"{name}: assemble s"] = round(last["assemble"], 2)
                if name == "kept cluster":
                    row[f"{name}: first call on it s"] = round(first["wall"], 2)
            rows.append(row)
            print(row, flush=True)
    finish("small", rows)


if __name__ == "__main__":
    main()
