"""The overlap the model needs: `--overlap effective` against `--overlap exact` (the default), at
the defaults otherwise, on a model trained here.

    python benchmarks/overlap.py [--sizes 4096] [--epochs 3]

Trains the default U-Net on the western 60 % of the NC scene (`geoseg train` defaults, the given
epochs, 2 local workers), which measures its effective overlap; then predicts the NC scene tiled to
each size with the exact overlap and with the effective one (window auto, the window cache filled
first, untimed) and counts the pixels where the two maps differ. Prints a table and appends it to
benchmarks/results/overlap.json.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
from _results import finish, under_worker_malloc

from geoseg import load_bundle
from geoseg.stages.predict import default_overlap, predict_scene
from geoseg.stages.train import train


def main() -> None:
    under_worker_malloc()
    logging.basicConfig(level=logging.WARNING)
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[4096])
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from predict import make_scene

    from tests.conftest import LABELS, SCENE, WEST

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        bundle = d / "nc.bundle"
        t = time.perf_counter()
        train(SCENE, LABELS, bundle, within=WEST, epochs=args.epochs, workers=2)
        train_s = time.perf_counter() - t
        b = load_bundle(bundle)
        measured = b.contract.training["effective_overlap"]
        for size in args.sizes:
            scene = d / f"scene_{size}.tif"
            make_scene(scene, size)
            row: dict[str, object] = {
                "size": size,
                "train_s": round(train_s, 1),
                "effective_overlap": b.contract.effective_overlap,
                "measured_on": f"{measured['crop']}, window {measured['window']}",
                "differing_share_tried": measured["differing_share"],
            }
            maps = {}
            for kind in ("exact", "effective"):
                out = d / f"{kind}.tif"
                predict_scene(bundle, scene, out, overlap=kind, overwrite=True)  # fills the cache
                t = time.perf_counter()
                r = predict_scene(bundle, scene, out, overlap=kind, overwrite=True)
                wall = time.perf_counter() - t
                with rasterio.open(out) as src:
                    maps[kind] = src.read(1)
                row[f"{kind}: window"] = r.window
                row[f"{kind}: overlap"] = (
                    default_overlap(b, r.window)
                    if kind == "exact"
                    else b.contract.effective_overlap
                )
                row[f"{kind}: windows"] = r.windows_run
                row[f"{kind}: wall s"] = round(wall, 2)
                row[f"{kind}: scene Mpx/s"] = round(size * size / 1e6 / wall, 3)
            valid = maps["exact"] != 255
            row["differing pixels, effective vs exact"] = round(
                float(np.mean(maps["effective"][valid] != maps["exact"][valid])), 6
            )
            row["effective / exact speed"] = round(
                float(row["exact: wall s"]) / float(row["effective: wall s"]),  # type: ignore[arg-type]
                2,
            )
            rows.append(row)
            print(row, flush=True)
    finish("overlap", rows)


if __name__ == "__main__":
    main()
