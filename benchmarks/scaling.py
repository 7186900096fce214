"""Prediction throughput as workers are added: a running cluster of `dask worker` processes on
127.0.0.1 with 1 and 2 CPU workers (and 1 GPU worker with --gpu, on a machine that has one),
against the model alone on the same windows (the limit).

    python benchmarks/scaling.py [--size 4096] [--base-width 32] [--gpu]

The scene is the NC sample tiled to the size; the model a random U-Net (speed does not depend on
training). Each cluster is started before the clock starts and warmed with one call (the
workers' torch import and model load), then timed over the next call: the steady throughput a
user with a cluster up gets. CPU workers get one thread each and the cores divided among them
for torch; the limit runs in this process on all cores (CPU) or on the GPU. Prints a table and
appends it to benchmarks/results/scaling.json.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import psutil
import torch
from _results import finish, under_worker_malloc
from predict import make_bundle, make_scene, model_alone

from geoseg.allocator import WORKER_MALLOC_ENV
from geoseg.stages.predict import predict_scene
from geoseg.tasks.predict import default_batch_size
from tests.clusters import loopback_cluster


def timed_call(
    bundle: Path, scene: Path, out: Path, address: str, **kw: object
) -> tuple[float, int]:
    """Seconds of the second of two calls, and the windows it ran."""
    predict_scene(bundle, scene, out, scheduler=address, overwrite=True, **kw)  # warm-up
    t = time.perf_counter()
    result = predict_scene(bundle, scene, out, scheduler=address, overwrite=True, **kw)
    return time.perf_counter() - t, result.windows_run


def row(workers: str, size: int, window: int, windows: int, wall: float, limit: float) -> dict:
    out = {
        "workers": workers,
        "size": size,
        "windows": windows,
        "scene_mpx_s": round(size**2 / 1e6 / wall, 3),
        "window_mpx_s": round(windows * window**2 / 1e6 / wall, 3),
        "limit_window_mpx_s": round(windows * window**2 / 1e6 / limit, 3),
        "of_limit": round(limit / wall, 3),
    }
    print(out, flush=True)
    return out


def main() -> None:
    under_worker_malloc()
    logging.basicConfig(level=logging.WARNING)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--base-width", type=int, default=32)
    ap.add_argument("--gpu", action="store_true", help="also 1 GPU worker (needs CUDA)")
    args = ap.parse_args()
    cores = psutil.cpu_count()
    torch.set_num_threads(cores)
    batch = default_batch_size("cpu", args.window)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        bundle = make_bundle(d / "unet.bundle", args.window, args.base_width)
        scene = d / "scene.tif"
        make_scene(scene, args.size)
        for workers in (1, 2):
            env = {**WORKER_MALLOC_ENV, "GEOSEG_TORCH_THREADS": str(max(1, cores // workers))}
            with loopback_cluster(workers, env=env) as (address, _):
                wall, windows = timed_call(bundle, scene, d / "c.tif", address, batch_size=batch)
            limit = model_alone(bundle, windows, args.window, batch, bf16=True)
            rows.append(row(f"{workers} CPU", args.size, args.window, windows, wall, limit))
        if args.gpu:
            gpu_batch = default_batch_size("cuda", args.window)
            with loopback_cluster(1, "--resources", "GPU=1", env=WORKER_MALLOC_ENV) as (address, _):
                wall, windows = timed_call(
                    bundle, scene, d / "g.tif", address, batch_size=gpu_batch, device="cuda"
                )
            limit = gpu_model_alone(bundle, windows, args.window, gpu_batch)
            rows.append(row("1 GPU", args.size, args.window, windows, wall, limit))
    finish("scaling", rows, torch=torch.__version__)


def gpu_model_alone(bundle: Path, windows: int, window: int, batch: int) -> float:
    """Seconds for the model on the GPU over ``windows`` windows already on the GPU (bf16)."""
    from geoseg import load_bundle

    model = load_bundle(bundle, device="cuda").model.to(memory_format=torch.channels_last)
    x = torch.randn(batch, 6, window, window, device="cuda")
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        model(x)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(-(-windows // batch)):
            model(x)
        torch.cuda.synchronize()
    return time.perf_counter() - t


if __name__ == "__main__":
    main()
