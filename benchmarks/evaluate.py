"""Scoring throughput: geoseg evaluate on 1 and 2 workers against numpy's bincount over the same
arrays held in memory (the limit), per region; the bootstrap's cost; and the sample-based path.

    python benchmarks/evaluate.py [--sizes 4096 16384] [--block 2048]

The class map is the NC 1996 land-cover map upsampled 4x and tiled to the size; the truth is the
same tiling shifted by 37 px (so the two disagree where a real map would); the regions are a 4 x 4
grid of polygons over the map, in a GeoPackage. geoseg reads both rasters and rasterizes the
regions block by block on the workers. The limit reads nothing: the class map, the truth and a
raster of region ids are already in memory, and one ``np.bincount`` per region counts the pairs.
Wall time of each, scene Mpx/s. Then, on 2 workers: the same evaluation with ``bootstrap=1000``
(against the plain one), and the sample-based path: ``geoseg sample`` of 1000 points from the
class map, the points labelled from the truth raster (here, by reading it), and the stratified
estimate from them with the sample's design; time and peak memory (this process and its
children) of each against the dense evaluation of the map (without regions). Prints a table and appends it to
benchmarks/results/evaluate.json.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import geopandas as gpd
import numpy as np
import rasterio
import shapely
from _results import PeakMemory, finish, make_class_map, size_arguments

from geoseg.stages.evaluate import evaluate
from geoseg.stages.sample import sample

GRID = 4


def make_regions(classes: Path, out: Path) -> None:
    with rasterio.open(classes) as src:
        left, bottom, right, top = src.bounds
        crs = src.crs
    xs, ys = np.linspace(left, right, GRID + 1), np.linspace(bottom, top, GRID + 1)
    boxes = [
        shapely.box(xs[i], ys[j], xs[i + 1], ys[j + 1]) for j in range(GRID) for i in range(GRID)
    ]
    gdf = gpd.GeoDataFrame({"name": [f"r{k}" for k in range(len(boxes))]}, geometry=boxes, crs=crs)
    gdf.to_file(out)


def in_memory(classes: Path, truth: Path) -> tuple[float, np.ndarray]:
    """Seconds for the bincounts alone, over arrays read beforehand (the limit)."""
    with rasterio.open(classes) as a, rasterio.open(truth) as b:
        pred, ref = a.read(1).astype(np.int64), b.read(1).astype(np.int64)
    h, w = pred.shape
    rows = np.minimum(np.arange(h) * GRID // h, GRID - 1)
    cols = np.minimum(np.arange(w) * GRID // w, GRID - 1)
    region = ((GRID - 1 - rows)[:, None] * GRID + cols[None, :]).astype(np.int64)
    k = 8
    t = time.perf_counter()
    valid = (pred != 255) & (ref != 255)
    pair = ref * k + pred
    overall = np.bincount(pair[valid], minlength=k * k)
    per_region = np.bincount((region * k * k + pair)[valid], minlength=GRID * GRID * k * k)
    seconds = time.perf_counter() - t
    return seconds, np.concatenate([overall, per_region])


def label_from(points: Path, truth: Path, out: Path) -> Path:
    """The points with their ``reference`` read from the truth raster (as a person would
    label them)."""
    gdf = gpd.read_file(points)
    with rasterio.open(truth) as src:
        values = [int(v[0]) for v in src.sample([(g.x, g.y) for g in gdf.geometry])]
    gdf["reference"] = [str(v) if v != 255 else None for v in values]
    gdf.to_file(out)
    return out


def main() -> None:
    args = size_arguments(__doc__)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        for size in args.sizes:
            classes, truth, regions = d / "c.tif", d / "t.tif", d / "regions.gpkg"
            make_class_map(classes, size)
            make_class_map(truth, size, shift=37)
            make_regions(classes, regions)
            mpx = size * size / 1e6
            limit_s, counts = in_memory(classes, truth)
            row: dict[str, object] = {
                "size": size,
                "block": args.block,
                "regions": GRID * GRID,
                "numpy_bincount_s": round(limit_s, 2),
                "numpy_bincount_mpx_s": round(mpx / limit_s, 1),
            }
            for workers in (1, 2):
                with PeakMemory() as mem:
                    t = time.perf_counter()
                    report = evaluate(
                        classes, truth, regions=regions, block=args.block, workers=workers
                    )
                    wall = time.perf_counter() - t
                # the same pixels were counted: the limit is a fair one
                assert report.overall.pixels == int(counts[:64].sum())
                row[f"geoseg_{workers}w_s"] = round(wall, 2)
                row[f"geoseg_{workers}w_mpx_s"] = round(mpx / wall, 1)
                row[f"geoseg_{workers}w_of_limit"] = round(limit_s / wall, 3)
                row[f"geoseg_{workers}w_peak_gb"] = round(mem.peak / 1e9, 2)
            plain_s = float(row["geoseg_2w_s"])  # type: ignore[arg-type]
            with PeakMemory() as mem:
                t = time.perf_counter()
                boot = evaluate(
                    classes, truth, regions=regions, block=args.block, workers=2, bootstrap=1000
                )
                wall = time.perf_counter() - t
            assert boot.intervals is not None
            row["bootstrap_1000_s"] = round(wall, 2)
            row["bootstrap_of_plain"] = round(wall / plain_s, 2)
            row["bootstrap_blocks"] = boot.intervals.overall.blocks
            row["bootstrap_peak_gb"] = round(mem.peak / 1e9, 2)
            # the sample path against the dense evaluation of the whole map, without regions
            with PeakMemory() as mem:
                t = time.perf_counter()
                dense = evaluate(classes, truth, block=args.block, workers=2)
                dense_s = time.perf_counter() - t
            row["dense_noregions_2w_s"] = round(dense_s, 2)
            row["dense_noregions_peak_gb"] = round(mem.peak / 1e9, 2)
            with PeakMemory() as mem:
                t = time.perf_counter()
                drawn = sample(classes, d / f"s{size}.gpkg", size=1000, block=args.block, workers=2)
                sample_s = time.perf_counter() - t
            sample_gb = mem.peak / 1e9
            labelled = label_from(drawn.points, truth, d / f"labelled{size}.gpkg")
            labelled.with_name(labelled.stem + ".design.json").write_text(drawn.design.read_text())
            with PeakMemory() as mem:
                t = time.perf_counter()
                est = evaluate(
                    classes, labelled, truth_field="reference", block=args.block, workers=2
                )
                estimate_s = time.perf_counter() - t
            assert est.sample is not None and est.sample.points == 1000
            row["sample_1000_s"] = round(sample_s, 2)
            row["sample_peak_gb"] = round(sample_gb, 2)
            row["estimate_1000_s"] = round(estimate_s, 2)
            row["estimate_peak_gb"] = round(mem.peak / 1e9, 2)
            row["sample_plus_estimate_of_dense"] = round((sample_s + estimate_s) / dense_s, 2)
            row["estimated_overall_accuracy"] = est.sample.overall.to_dict()
            row["dense_overall_accuracy"] = dense.overall.overall_accuracy
            rows.append(row)
            print(row, flush=True)
    finish("evaluate", rows)


if __name__ == "__main__":
    main()
