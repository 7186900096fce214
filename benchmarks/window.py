"""The window predict chooses by default (``--window auto``) against a sweep of fixed windows,
for every architecture, on a tiled NC Landsat 7 scene.

    python benchmarks/window.py [--size 2048] [--archs unet fcn8s deeplabv3plus segformer]

For each architecture (default configuration, 6 bands, 7 classes, random weights: speed does
not depend on training): ``geoseg predict`` of the SIZE² scene at windows 256, 512, 768, 1024,
1536 and 2048 (each with the device's default batch, the overlap from the bundle), then with the
default ``--window auto`` twice: cold (the model's speed measured on a worker first, into an
empty cache) and warm (read from the cache). Each run makes its local cluster (2 workers), as a
user's command does. Prints the figures and appends them to benchmarks/results/window.json.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

from _results import finish, under_worker_malloc
from predict import make_bundle, make_scene

from geoseg.stages.predict import predict_scene

SWEEP = (256, 512, 768, 1024, 1536, 2048)


def timed(bundle: Path, scene: Path, out: Path, **kw: object) -> tuple[float, object]:
    t = time.perf_counter()
    r = predict_scene(bundle, scene, out, overwrite=True, **kw)  # type: ignore[arg-type]
    return time.perf_counter() - t, r


def main() -> None:
    under_worker_malloc()
    logging.basicConfig(level=logging.WARNING)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--archs", nargs="+", default=["unet", "fcn8s", "deeplabv3plus", "segformer"])
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        os.environ["GEOSEG_CACHE"] = str(d / "cache")  # cold: nothing measured yet
        scene = d / "scene.tif"
        make_scene(scene, args.size)
        px = args.size * args.size
        for arch in args.archs:
            bundle = make_bundle(d / f"{arch}.bundle", 256, arch=arch)
            sweep = {}
            for w in SWEEP:
                if w > 2 * args.size:
                    continue
                s, _ = timed(bundle, scene, d / "c.tif", window=w)
                sweep[w] = round(px / s / 1e6, 3)
                print(arch, w, sweep[w], "Mpx/s", flush=True)
            cold, _ = timed(bundle, scene, d / "c.tif")
            warm, r2 = timed(bundle, scene, d / "c.tif")
            best = max(sweep, key=sweep.__getitem__)
            rows.append(
                {
                    "arch": arch,
                    "size": args.size,
                    "sweep_mpx_s": sweep,
                    "best_window": best,
                    "best_mpx_s": sweep[best],
                    "auto_window": r2.window,  # type: ignore[attr-defined]
                    "auto_batch": r2.batch_size,  # type: ignore[attr-defined]
                    "auto_warm_mpx_s": round(px / warm / 1e6, 3),
                    "auto_cold_mpx_s": round(px / cold / 1e6, 3),
                    "auto_warm_over_best": round(px / warm / 1e6 / sweep[best], 2),
                    "auto_cold_over_best": round(px / cold / 1e6 / sweep[best], 2),
                    "bundle_window_256_over_best": round(sweep[256] / sweep[best], 2),
                }
            )
            print(rows[-1], flush=True)
    finish("window", rows)


if __name__ == "__main__":
    main()
