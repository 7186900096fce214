"""A seed ensemble on the NC scene's held-out east: is the mean of several trainings worth their
cost? Trains one bundle per seed with ``geoseg train``'s defaults (only ``--within`` given, as
``accuracy.py --recipe defaults`` does), predicts each with its class probabilities, and scores
each seed alone, the class of the seeds' mean probabilities (as written, in 0-254 steps) and the
map of the bundles combined by ``geoseg ensemble`` on the same test pixels, against the forest's
row in ``accuracy.py``; with each prediction's time.

    python benchmarks/ensemble.py [--seeds 0 1 2] [--workers 2] [--set KEY=VALUE ...]

Prints the figures and appends them to benchmarks/results/ensemble.json.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
from _results import append_result
from accuracy import confusion, nc_split, parse_settings

from geoseg import load_bundle
from geoseg.bundle import combine_bundles
from geoseg.scoring import scores
from geoseg.stages.predict import predict_scene
from geoseg.stages.train import train


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a training setting for every seed, as in accuracy.py")  # fmt: skip
    args = ap.parse_args()
    settings = parse_settings(args.set)
    split = nc_split()
    preds: dict[str, np.ndarray] = {}  # the class ids each way calls the test pixels
    rows: dict[str, dict[str, float]] = {}
    mean = None
    bundles: list[str | Path] = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            bundle, classes = Path(tmp) / f"seed{seed}.bundle", Path(tmp) / f"seed{seed}.tif"
            t = time.perf_counter()
            train(split.scene, split.labels, bundle, within=split.within, workers=args.workers,
                  seed=seed, **settings)  # fmt: skip
            rows[f"seed {seed}"] = {"train_seconds": round(time.perf_counter() - t, 1)}
            t = time.perf_counter()
            r = predict_scene(bundle, split.scene, classes, workers=args.workers,
                              probabilities=True)  # fmt: skip
            rows[f"seed {seed}"]["predict_seconds"] = round(time.perf_counter() - t, 1)
            bundles.append(bundle)
            with rasterio.open(classes) as src:
                preds[f"seed {seed}"] = src.read(1)[split.test_px]
            with rasterio.open(r.probabilities) as src:  # a band per class, in 0-254 steps
                probs = src.read()[:, split.test_px].astype(np.float64)
            mean = probs if mean is None else mean + probs
        class_list = load_bundle(bundle).classes
        # what a user gets: the bundles combined by `geoseg ensemble`, predicted once
        both, classes = Path(tmp) / "ensemble.bundle", Path(tmp) / "ensemble.tif"
        combine_bundles(bundles, both)
        t = time.perf_counter()
        predict_scene(both, split.scene, classes, workers=args.workers)
        rows["geoseg ensemble"] = {"predict_seconds": round(time.perf_counter() - t, 1)}
        with rasterio.open(classes) as src:
            preds["geoseg ensemble"] = src.read(1)[split.test_px]
    ids = np.array([c.id for c in class_list])
    assert mean is not None
    name = f"mean of {len(args.seeds)}"
    preds[name], rows[name] = ids[mean.argmax(0)], {}
    index = np.full(256, -1)
    index[ids] = np.arange(len(ids))
    truth = index[split.codes[split.test_px]]
    for name, row in rows.items():
        sc = scores(confusion(truth, index[preds[name]], len(ids)), class_list)
        row.update(miou=round(sc.miou, 3), accuracy=round(sc.overall_accuracy, 3),
                   water_iou=round(sc.iou_by_name()["water"], 3))  # fmt: skip
        print(f"{name:>10}: " + ", ".join(f"{k} {v}" for k, v in row.items()))
    append_result("ensemble", {"scene": "nc", "seeds": args.seeds, **settings, "rows": rows})


if __name__ == "__main__":
    main()
