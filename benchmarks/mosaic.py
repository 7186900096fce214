"""A mosaic of many overlapping scenes against one scene of their union and against predicting
each scene then merging the maps with rasterio.merge, on crops of a tiled NC Landsat 7 scene.

    python benchmarks/mosaic.py [--size 2048] [--counts 4 16] [--overlap 128]

The union is a SIZE x SIZE scene (the NC scene tiled); it is cut into a k x k grid of crops
(4 = 2 x 2, 16 = 4 x 4) that overlap their neighbours by OVERLAP px. Three rows per count, each
at geoseg's defaults (the default U-Net, window 512, random weights; a local cluster made for
the call):

- ``one_scene``: ``geoseg predict`` of the union as one scene: the model work of the map, the
  limit;
- ``mosaic``: ``geoseg predict --mosaic`` of the crops (mean composite);
- ``per_scene_merge``: what a user would do without ``--mosaic``: predict every crop into a
  folder, then ``rasterio.merge.merge`` the class maps (first scene wins; no compositing, and
  every crop's own edges stay in the map).

Each run is also set against the model alone on its own windows (their count, size and batch,
bf16, all cores): the mosaic's windows cover the crops, and the overlaps between crops are
predicted once per crop, since the mean composite needs each crop's probabilities there; the
ratio of the two runs' shares of that limit is the mosaic's cost over one scene with the same
windows.

Peak memory is the sum of resident memory over this process and its children (Dask workers),
sampled every 50 ms. Prints the figures and appends them to benchmarks/results/mosaic.json.
"""

from __future__ import annotations

import argparse
import gc
import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import rasterio
from _results import PeakMemory, finish, under_worker_malloc
from predict import make_bundle, make_scene, model_alone
from rasterio.merge import merge
from rasterio.windows import Window

from geoseg.stages.predict import predict_scene, predict_scenes
from geoseg.tasks.predict import default_batch_size


def cut(scene: Path, k: int, overlap: int, folder: Path) -> list[Path]:
    """A k x k grid of crops of ``scene`` that overlap their neighbours by ``overlap`` px."""
    folder.mkdir()
    with rasterio.open(scene) as src:
        side = math.ceil((src.width + (k - 1) * overlap) / k)
        step = side - overlap
        paths = []
        for i in range(k):
            for j in range(k):
                win = Window(j * step, i * step, side, side).intersection(
                    Window(0, 0, src.width, src.height)
                )
                path = folder / f"crop_{i}_{j}.tif"
                prof = src.profile | {
                    "width": win.width,
                    "height": win.height,
                    "transform": src.window_transform(win),
                }
                with rasterio.open(path, "w", **prof) as dst:
                    dst.write(src.read(window=win))
                paths.append(path)
    return paths


def timed(fn, *args, **kwargs) -> tuple[object, float, int]:  # type: ignore[no-untyped-def]
    gc.collect()
    with PeakMemory() as mem:
        t = time.perf_counter()
        result = fn(*args, **kwargs)
        wall = time.perf_counter() - t
    return result, wall, mem.peak


def _alone(bundle: Path, result: object) -> float:
    """Seconds for the model alone on the windows a run computed (its count, size and batch)."""
    r: Any = result
    batch = r.batch_size or default_batch_size("cpu", r.window)
    return model_alone(bundle, r.windows_run, r.window, batch, bf16=True)


def per_scene_merge(bundle: Path, crops: list[Path], folder: Path, out: Path) -> None:
    predict_scenes(bundle, crops, folder)
    maps = sorted(folder.glob("*.tif"))
    data, transform = merge(maps, nodata=255)
    with rasterio.open(maps[0]) as first:
        profile = first.profile | {
            "width": data.shape[2],
            "height": data.shape[1],
            "transform": transform,
            "driver": "GTiff",
        }
    with rasterio.open(out, "w", **profile) as dst:
        dst.write(data)


def main() -> None:
    under_worker_malloc()
    logging.basicConfig(level=logging.WARNING)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--counts", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--overlap", type=int, default=128)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        bundle = make_bundle(d / "unet.bundle", 512)
        union = d / "union.tif"
        make_scene(union, args.size)
        # window auto measures the model once per machine: measured here, untimed, so that
        # every row reads the same cached speeds (as every run after a user's first does)
        os.environ["GEOSEG_CACHE"] = str(d / "cache")
        predict_scene(bundle, union, d / "warm.tif")
        whole, t_one, mem_one = timed(predict_scene, bundle, union, d / "one.tif")
        with rasterio.open(whole.path) as src:  # type: ignore[attr-defined]
            one = src.read(1)
        alone_one = _alone(bundle, whole)
        for n in args.counts:
            k = round(math.sqrt(n))
            crops = cut(union, k, args.overlap, d / f"crops{n}")
            [m], t_mosaic, mem_mosaic = timed(  # type: ignore[misc]
                predict_scenes, bundle, crops, d / f"mosaic{n}.tif", mosaic=True
            )
            merged = d / f"merged{n}.tif"
            _, t_merge, mem_merge = timed(per_scene_merge, bundle, crops, d / f"maps{n}", merged)
            with rasterio.open(m.path) as a, rasterio.open(merged) as b:
                mosaic, naive = a.read(1), b.read(1)
            alone_mosaic = _alone(bundle, m)
            # each run against the model alone on its own windows: the mosaic's windows cover
            # the crops, whose overlaps are predicted once per crop (the mean needs them)
            of_limit_one, of_limit_mosaic = alone_one / t_one, alone_mosaic / t_mosaic
            rows.append(
                {
                    "scenes": n,
                    "size": args.size,
                    "crop_overlap_px": args.overlap,
                    "one_scene_s": round(t_one, 2),
                    "mosaic_s": round(t_mosaic, 2),
                    "per_scene_merge_s": round(t_merge, 2),
                    "mosaic_over_one_scene": round(t_mosaic / t_one, 2),
                    "per_scene_merge_over_mosaic": round(t_merge / t_mosaic, 2),
                    "one_scene_model_alone_s": round(alone_one, 2),
                    "mosaic_model_alone_s": round(alone_mosaic, 2),
                    "one_scene_of_model_alone": round(of_limit_one, 2),
                    "mosaic_of_model_alone": round(of_limit_mosaic, 2),
                    "mosaic_over_one_scene_same_windows": round(of_limit_one / of_limit_mosaic, 2),
                    "one_scene_peak_gb": round(mem_one / 1e9, 2),
                    "mosaic_peak_gb": round(mem_mosaic / 1e9, 2),
                    "per_scene_merge_peak_gb": round(mem_merge / 1e9, 2),
                    "mosaic_blocks": m.blocks,
                    "mosaic_windows_run": m.windows_run,
                    "mosaic_window": m.window,
                    "one_scene_window": whole.window,  # type: ignore[attr-defined]
                    "one_scene_windows_run": whole.windows_run,  # type: ignore[attr-defined]
                    "mosaic_shape_is_union": list(mosaic.shape) == list(one.shape),
                    "merge_shape_is_union": list(naive.shape) == list(one.shape),
                }
            )
            print(rows[-1], flush=True)
    finish("mosaic", rows)


if __name__ == "__main__":
    main()
