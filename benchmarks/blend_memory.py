"""Peak memory of weighted (Gaussian) blending as the scene grows: does it stay flat?

    python benchmarks/blend_memory.py [--sizes 2048 4096 8192] [--block 1024] [--window 256]

Gaussian blending sums every window's weighted probabilities into pieces that move between
blocks (issue 14: it held every block's sums of a scene until the scene's last block was
submitted). A small U-Net (width 8) keeps the model's share of the time low, so the run is about
the plumbing; 7 classes, 2 workers, overlap 32, the scene made by tiling the NC scene. Peak
memory is the summed resident memory of this process and its workers, sampled every 50 ms.
Prints a row per size and appends them to benchmarks/results/blend_memory.json.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

from _results import PeakMemory, finish, under_worker_malloc
from predict import make_bundle, make_scene

import geoseg
from geoseg.stages.predict import predict_scene


def main() -> None:
    under_worker_malloc()
    logging.basicConfig(level=logging.WARNING)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096, 8192])
    ap.add_argument("--block", type=int, default=1024)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--blend", default="gaussian")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        bundle = make_bundle(d / "unet.bundle", args.window, base_width=8)
        for size in args.sizes:
            scene = d / f"scene_{size}.tif"
            make_scene(scene, size)
            with PeakMemory() as mem:
                t = time.perf_counter()
                predict_scene(
                    bundle,
                    scene,
                    d / f"c{size}.tif",
                    overlap=32,
                    block=args.block,
                    blend=args.blend,
                    workers=2,
                )
                wall = time.perf_counter() - t
            rows.append(
                {
                    "scene px": f"{size}²",
                    "blocks": (-(-size // args.block)) ** 2,
                    "wall s": round(wall, 1),
                    "peak GB": round(mem.peak / 1e9, 2),
                }
            )
            scene.unlink()
    finish(
        "blend_memory",
        rows,
        geoseg=str(Path(geoseg.__file__).parent),
        block=args.block,
        window=args.window,
        blend=args.blend,
    )


if __name__ == "__main__":
    main()
