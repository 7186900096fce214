"""Prediction throughput and memory: the model alone (the limit), geoseg predict on 1 and 2
workers, and MONAI's sliding_window_inference, on scenes made by tiling the NC Landsat 7 scene.

    python benchmarks/predict.py --sizes 2048 [8192 16384] [--window 512 --batch N --base-width 32]
        [--blend gaussian] [--predict-window auto]

Same model (the default U-Net, 6 bands, 7 classes, random weights: speed does not depend on
training) in every row. geoseg predicts at ``--predict-window`` (default: a fixed 512 px, as in the
rows recorded before window auto; ``auto`` is what users get) and ``--blend`` (default: the
bundle's, trim for the U-Net); the model alone runs the window and batch that geoseg ran, as many
windows as it ran, two ways (one process with a torch thread per core; a process of one thread
per core, all at once), and the faster is the limit. Peak memory is the sum of resident memory over this
process and all its children (Dask workers), sampled every 50 ms. Prints a table and appends it to
benchmarks/results/predict.json. Needs `pip install monai psutil` for row (c).

The script re-runs itself with the allocator settings geoseg gives its Dask workers, so the
model-alone limit and MONAI run under the same malloc as geoseg's workers.
"""

from __future__ import annotations

import argparse
import gc
import logging
import multiprocessing
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import rasterio
import torch
from _results import PeakMemory, finish, under_worker_malloc

from geoseg import load_bundle
from geoseg.allocator import WORKER_MALLOC_ENV
from geoseg.bundle import BandInfo, Contract, save_bundle
from geoseg.classes import ClassInfo
from geoseg.models import create_model, receptive_field
from geoseg.pipeline import demo_workflow
from geoseg.stages.predict import predict_scene
from geoseg.tasks.predict import default_batch_size
from tests.clusters import loopback_cluster

SAMPLE = demo_workflow().parent / "nc_landsat7_2000.tif"


def make_scene(path: Path, size: int) -> None:
    with rasterio.open(SAMPLE) as src:
        tile, profile = src.read(), src.profile
    reps = (1, -(-size // tile.shape[1]), -(-size // tile.shape[2]))
    with rasterio.open(
        path,
        "w",
        **{
            **profile,
            "width": size,
            "height": size,
            "tiled": True,
            "blockxsize": 512,
            "blockysize": 512,
            "compress": "deflate",
        },
    ) as dst:
        for r in range(0, size, 2048):  # written in strips: the scene never is whole in memory
            h = min(2048, size - r)
            rows = np.arange(r, r + h) % tile.shape[1]
            strip = np.tile(tile[:, rows], (1, 1, reps[2]))[:, :, :size]
            dst.write(strip, window=rasterio.windows.Window(0, r, size, h))


def make_bundle(path: Path, window: int, base_width: int = 32, arch: str = "unet") -> Path:
    arch_args: dict[str, int] = {"base_width": base_width} if arch == "unet" else {}
    model = create_model(arch, 6, 7, **arch_args).eval()
    rf = receptive_field(model, 6)
    with rasterio.open(SAMPLE) as src:
        crs, res = src.crs, src.res
    contract = Contract(
        arch=arch,
        arch_args=arch_args,
        bands=[BandInfo(i, f"band {i}") for i in range(1, 7)],
        mean=[90.0] * 6,
        std=[30.0] * 6,
        classes=[ClassInfo(i, f"class {i}", "#808080") for i in range(1, 8)],
        window=window,
        overlap=min(rf or window // 4, window // 2),
        receptive_field=rf,
        crs=crs.to_string(),
        pixel_size=res,
        nodata=0,
    )
    save_bundle(path, model, contract, overwrite=True)
    return path


def model_alone(
    bundle: Path, windows: int, window: int, batch: int, bf16: bool, start: Any = None
) -> float:
    """Seconds for the model on ``windows`` windows from memory, all cores (torch's threads
    as set); ``start``: a barrier to pass after the warm-up, before the clock starts."""
    model = load_bundle(bundle).model.to(memory_format=torch.channels_last)
    x = torch.randn(batch, 6, window, window).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        model(x)  # warm-up
        if start is not None:
            start.wait()
        t = time.perf_counter()
        for _ in range(-(-windows // batch)):
            model(x)
    return time.perf_counter() - t


def _alone_in_process(
    bundle: Path, windows: int, window: int, batch: int, start: Any, out: Any
) -> None:
    torch.set_num_threads(1)
    out.put(model_alone(bundle, windows, window, batch, bf16=True, start=start))


def model_alone_processes(
    bundle: Path, windows: int, window: int, batch: int, processes: int
) -> float:
    """Seconds for the model on ``windows`` windows from memory split over ``processes``
    processes of one torch thread each, all running at once (bf16): on this machine's two
    cores faster than one process of two threads at some windows (benchmarks/README)."""
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Barrier(processes), ctx.Queue()
    share = -(-windows // processes)
    procs = [
        ctx.Process(target=_alone_in_process, args=(bundle, share, window, batch, start, out))
        for _ in range(processes)
    ]
    for p in procs:
        p.start()
    seconds = max(out.get() for _ in procs)
    for p in procs:
        p.join()
    return seconds


def monai_run(bundle: Path, scene: Path, out: Path, window: int, batch: int) -> float:
    from monai.inferers import sliding_window_inference

    t = time.perf_counter()
    model = load_bundle(bundle).model
    with rasterio.open(scene) as src:
        data, profile = src.read().astype(np.float32), src.profile
    data -= 90.0  # in place, as a careful user would: the scene is held whole
    data /= 30.0
    x = torch.from_numpy(data)[None]
    with torch.inference_mode():
        logits = sliding_window_inference(
            x, (window, window), batch, model, overlap=0.25, mode="gaussian"
        )
    classes = (logits[0].argmax(0) + 1).numpy().astype(np.uint8)
    profile.update(count=1, dtype="uint8", nodata=255, compress="deflate", tiled=True)
    with rasterio.open(out, "w", **profile) as dst:
        dst.write(classes, 1)
    return time.perf_counter() - t


def warm_calls(
    bundle: Path, scene: Path, out: Path, window: int | str, fixed: dict, calls: int = 3
) -> list[float]:
    """Wall times of ``calls`` predictions in a row against an already running cluster of 2
    ``dask worker`` processes (one thread each, half the cores for torch, geoseg's allocator
    settings): what a user with a cluster up pays per scene, without starting one."""
    env = {**WORKER_MALLOC_ENV, "GEOSEG_TORCH_THREADS": str(max(1, psutil.cpu_count() // 2))}
    walls = []
    with loopback_cluster(2, env=env) as (address, _):
        for _ in range(calls):
            t = time.perf_counter()
            predict_scene(
                bundle, scene, out, window=window, scheduler=address, overwrite=True, **fixed
            )
            walls.append(time.perf_counter() - t)
    return walls


def main() -> None:
    under_worker_malloc()
    logging.basicConfig(level=logging.WARNING)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[2048])
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--batch", type=int, help="default: geoseg's default on a CPU")
    ap.add_argument("--base-width", type=int, default=32, help="the U-Net's first width")
    ap.add_argument("--no-monai", action="store_true")
    ap.add_argument("--blend", default=None, help="geoseg's --blend (default: the bundle's)")
    ap.add_argument(
        "--predict-window", default=None, help="geoseg's --window (default: --window; or auto)"
    )
    ap.add_argument("--block", type=int, default=None, help="geoseg's --block (default: auto)")
    ap.add_argument(
        "--overlap", type=int, default=None, help="geoseg's --overlap in px (default: exact)"
    )
    ap.add_argument(
        "--warm-up-to",
        type=int,
        default=4096,
        help="for scenes up to this size, also time 3 calls against a running 2-worker cluster",
    )
    args = ap.parse_args()
    args.batch = args.batch or default_batch_size("cpu", args.window)
    predict_window: int | str = (
        "auto" if args.predict_window == "auto" else int(args.predict_window or args.window)
    )
    fixed = {"batch_size": args.batch} if predict_window != "auto" else {}
    if args.blend:
        fixed["blend"] = args.blend
    if args.block:
        fixed["block"] = args.block
    if args.overlap is not None:
        fixed["overlap"] = args.overlap
    torch.set_num_threads(psutil.cpu_count())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        bundle = make_bundle(d / "unet.bundle", args.window, args.base_width)
        for size in args.sizes:
            scene = d / f"scene_{size}.tif"
            make_scene(scene, size)
            mpx = size * size / 1e6
            runs = {}
            # the limit is taken after each geoseg run, on the windows that run ran (window auto
            # may choose another window for 1 worker than for 2); the machine drifts
            # the limit is the faster of two ways to run the model alone: one process with a
            # torch thread per core, or a process of one thread per core
            limits, limit_ways = {}, {}
            for workers in (1, 2):
                gc.collect()
                with PeakMemory() as mem:
                    t = time.perf_counter()
                    r = predict_scene(
                        bundle,
                        scene,
                        d / f"c{workers}.tif",
                        window=predict_window,
                        workers=workers,
                        **fixed,
                        overwrite=True,
                    )
                    wall = time.perf_counter() - t
                runs[workers] = (r, wall, mem.peak)
                alone = model_alone(bundle, r.windows_run, r.window, r.batch_size, bf16=True)
                apart = model_alone_processes(
                    bundle, r.windows_run, r.window, r.batch_size, psutil.cpu_count()
                )
                limits[workers] = min(alone, apart)
                limit_ways[workers] = (alone, apart)
            r = runs[2][0]
            # fp32 only sets the scale of MONAI's row: a rate from at most 64 windows
            fp32_windows = min(r.windows_run, 64)
            limit_fp32 = model_alone(bundle, fp32_windows, r.window, r.batch_size, bf16=False)
            row = {
                "size": size,
                "window_asked": predict_window,
                "blend": args.blend or "the bundle's",
                "block": args.block or "auto",
                "overlap": "exact" if args.overlap is None else args.overlap,
                "base_width": args.base_width,
                "model_alone_fp32_window_mpx_s": round(
                    fp32_windows * r.window**2 / 1e6 / limit_fp32, 3
                ),
            }
            for workers, (r, wall, peak) in runs.items():
                win_mpx = r.windows_run * r.window**2 / 1e6
                row[f"geoseg_{workers}w_window"] = r.window
                row[f"geoseg_{workers}w_batch"] = r.batch_size
                row[f"geoseg_{workers}w_windows"] = r.windows_run
                row[f"model_alone_{workers}w_bf16_window_mpx_s"] = round(
                    win_mpx / limits[workers], 3
                )
                alone, apart = limit_ways[workers]
                row[f"model_alone_{workers}w_one_process_mpx_s"] = round(win_mpx / alone, 3)
                row[f"model_alone_{workers}w_process_per_core_mpx_s"] = round(win_mpx / apart, 3)
                row[f"geoseg_{workers}w_scene_mpx_s"] = round(mpx / wall, 3)
                row[f"geoseg_{workers}w_window_mpx_s"] = round(win_mpx / wall, 3)
                row[f"geoseg_{workers}w_ratio_to_limit"] = round(limits[workers] / wall, 3)
                row[f"geoseg_{workers}w_peak_gb"] = round(peak / 1e9, 2)
                row[f"geoseg_{workers}w_writer_share"] = round(r.seconds["assemble"] / wall, 3)
                row[f"geoseg_{workers}w_cluster_start_s"] = round(r.seconds["start"], 2)
                # the workers' busy share of the time after the cluster started
                row[f"geoseg_{workers}w_task_share"] = round(
                    r.seconds["tasks"] / workers / (r.seconds["blocks"] - r.seconds["start"]), 3
                )
            if size <= args.warm_up_to:
                walls = warm_calls(bundle, scene, d / "warm.tif", predict_window, fixed)
                row["geoseg_2w_running_cluster_calls_s"] = [round(w, 2) for w in walls]
                row["geoseg_2w_running_cluster_ratio_to_limit"] = round(limits[2] / walls[-1], 3)
            if not args.no_monai:
                gc.collect()
                with PeakMemory() as mem:
                    t_monai = monai_run(bundle, scene, d / "monai.tif", args.window, args.batch)
                row["monai_fp32_scene_mpx_s"] = round(mpx / t_monai, 3)
                row["monai_peak_gb"] = round(mem.peak / 1e9, 2)
                row["geoseg_2w_over_monai"] = round(t_monai / runs[2][1], 2)
            rows.append(row)
            print(row, flush=True)
    finish("predict", rows, torch=torch.__version__)


if __name__ == "__main__":
    main()
