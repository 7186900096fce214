"""The GPU path: the model alone against geoseg predict, per GPU.

    python benchmarks/gpu.py [--size 8192] [--windows 512 1024] [--batches 4 8 16]

On a machine without a CUDA GPU it says so, measures nothing and exits 0. With one: (a) the
model alone (the default U-Net, 6 bands, random weights) on windows from GPU memory, fp16 and
bf16 autocast, channels-last, for each window and batch: the limit; (b) geoseg predict on the NC
scene tiled to ``--size`` with ``device="cuda"`` at its defaults (window auto, precision auto, a
local cluster of one worker per GPU, two blocks at once on it), once as a command runs (the
call starts its cluster) and then on one cluster kept across calls: at the defaults, one block
at a time (what reading one block while the other's model runs is worth), and at the fastest
window and batch of (a); each as window Mpx/s and as a ratio to the limit at the same window,
batch and precision;
(c) the reads alone: every block of the scene at geoseg's default block and overlap read and
normalised as a block task does, one block after another, each read by one thread and by the
threads a GPU worker reads with, as scene Mpx/s: where they read slower than the model runs,
the reads set the pace.
Prints a table and appends it to benchmarks/results/gpu.json.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _results import finish


def model_alone(bundle: Path, window: int, batch: int, dtype: torch.dtype, seconds: float) -> float:
    """Window Mpx/s of the model on one GPU, inputs already there, for about ``seconds``."""
    from geoseg import load_bundle

    model = load_bundle(bundle).model.cuda().to(memory_format=torch.channels_last)
    x = torch.randn(batch, 6, window, window, device="cuda").contiguous(
        memory_format=torch.channels_last
    )
    with torch.inference_mode(), torch.autocast("cuda", dtype=dtype):
        for _ in range(3):
            model(x).argmax(1)  # warm-up: cuDNN picks its kernels
        torch.cuda.synchronize()
        n, t = 0, time.perf_counter()
        while time.perf_counter() - t < seconds:
            model(x).argmax(1)
            n += 1
        torch.cuda.synchronize()
        wall = time.perf_counter() - t
    return n * batch * window * window / 1e6 / wall


def reads_alone(bundle: Path, scene: Path, block: int, overlap: int, threads: int) -> float:
    """Scene Mpx/s of reading and normalising every ``block`` px block of ``scene`` with an
    ``overlap`` px margin one after another, each read by ``threads`` threads, as a GPU
    worker's block tasks do."""
    from rasterio.windows import Window

    from geoseg import load_bundle
    from geoseg.io import read_profile, read_scene
    from geoseg.tasks.predict import normalize
    from geoseg.tiling import block_windows, spans

    b = load_bundle(bundle)
    profile = read_profile(scene)
    bands = b.indexes_in(profile)
    pixels = 0
    t = time.perf_counter()
    for core in block_windows(profile.height, profile.width, block):
        (r0, r1), (c0, c1) = spans(core)
        r0, c0 = max(0, r0 - overlap), max(0, c0 - overlap)
        r1, c1 = min(profile.height, r1 + overlap), min(profile.width, c1 + overlap)
        window = Window(c0, r0, c1 - c0, r1 - r0)
        data, valid = read_scene(profile, window, bands, b.contract.nodata, threads=threads)
        normalize(data, valid, b)
        pixels += int(core.height * core.width)
    assert pixels == profile.height * profile.width  # every pixel read once as a core
    return pixels / 1e6 / (time.perf_counter() - t)


def main() -> int:
    logging.basicConfig(level=logging.WARNING)
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--size", type=int, default=8192)
    ap.add_argument("--windows", type=int, nargs="+", default=[512, 1024])
    ap.add_argument("--batches", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--seconds", type=float, default=3.0, help="per model-alone point")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print(
            f"no GPU: torch {torch.__version__} sees no CUDA device "
            f"(torch.version.cuda={torch.version.cuda}); nothing measured"
        )
        return 0
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from predict import make_bundle, make_scene

    from geoseg.stages.predict import predict_scene
    from geoseg.tasks.predict import default_batch_size

    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        bundle = make_bundle(d / "unet.bundle", 256)
        limits: dict[tuple[int, int, str], float] = {}
        for window in args.windows:
            for batch in args.batches:
                for name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
                    rate = model_alone(bundle, window, batch, dtype, args.seconds)
                    limits[(window, batch, name)] = rate
                    rows.append(
                        {"what": "model alone", "window": window, "batch": batch,
                         "precision": name, "window_mpx_s": round(rate, 2)}
                    )  # fmt: skip
        best = max(limits, key=lambda k: limits[k])
        scene = d / "scene.tif"
        make_scene(scene, args.size)
        mpx = args.size * args.size / 1e6
        windows_used: dict[str, int] = {}
        import geoseg.cluster

        gpu_blocks = geoseg.cluster.GPU_BLOCKS
        prec = "bf16" if torch.cuda.is_bf16_supported() else "fp16"  # precision auto's

        def timed(label: str, kw: dict[str, Any], blocks: int, client: Any) -> None:
            """One predict call, after one untimed (the window's measurement, the cache)."""
            # a task's share of the GPU is read at each call: 1 runs one block at a time
            geoseg.cluster.GPU_BLOCKS = blocks
            try:
                run = {"device": "cuda", "overwrite": True, "client": client, **kw}
                predict_scene(bundle, scene, d / "c.tif", **run)
                t = time.perf_counter()
                r = predict_scene(bundle, scene, d / "c.tif", **run)
                wall = time.perf_counter() - t
            finally:
                geoseg.cluster.GPU_BLOCKS = gpu_blocks
            windows_used[label] = r.window
            win_mpx = r.windows_run * r.window**2 / 1e6 / wall
            # as the run resolved them: the device's default batch for the window, precision
            # auto; the fastest point of (a) where that one was not measured
            batch = r.batch_size or default_batch_size("cuda", r.window)
            limit = limits.get((r.window, batch, prec)) or limits[best]
            rows.append(
                {"what": label, "window": r.window, "batch": batch, "precision": prec,
                 "blocks_at_once": blocks, "cluster": "kept" if client else "the call's",
                 "window_mpx_s": round(win_mpx, 2), "scene_mpx_s": round(mpx / wall, 2),
                 "of_limit": round(win_mpx / limit, 3), "wall_s": round(wall, 2)}
            )  # fmt: skip

        # as a command runs: the call starts its local cluster (one worker per GPU)
        timed("geoseg defaults", {}, gpu_blocks, None)
        # on one cluster kept across the calls, as `geoseg cluster start` or a Python session
        with geoseg.cluster.local_cluster(gpu=True) as client:
            timed("geoseg defaults", {}, gpu_blocks, client)
            # what the worker's second block task (read while the other's model runs) is worth
            timed("geoseg defaults, one block at a time", {}, 1, client)
            best_point = {"window": best[0], "batch_size": best[1]}
            timed("geoseg at the best point", best_point, gpu_blocks, client)
        from geoseg import load_bundle
        from geoseg.io import read_profile
        from geoseg.stages.predict import default_block, default_overlap
        from geoseg.tasks.predict import read_threads

        # as the defaults' run: a worker per GPU, its window
        block = default_block([read_profile(scene)], torch.cuda.device_count(), None)
        overlap = default_overlap(load_bundle(bundle), windows_used["geoseg defaults"])
        for threads in (1, read_threads("cuda")):
            rate = reads_alone(bundle, scene, block, overlap, threads)
            rows.append(
                {"what": "reads alone", "threads": threads, "block": block,
                 "overlap": overlap, "scene_mpx_s": round(rate, 2)}
            )  # fmt: skip
    finish("gpu", rows, gpu=torch.cuda.get_device_name(0), torch=torch.__version__)
    return 0


if __name__ == "__main__":
    sys.exit(main())
