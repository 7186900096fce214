"""Scoring a class map against reference labels: confusion matrices per block and per region,
summed, then IoU, precision, recall, F1, mIoU, accuracy and kappa.

Confusion matrices are additive counts: each block counts ``(region, truth, prediction)`` with one
``bincount`` and the client adds the blocks up, so the scene is never whole in memory. Rows are
truth, columns are prediction, in the order of the class list.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import rasterio
from rasterio.features import rasterize
from rasterio.windows import Window
from rasterio.windows import transform as window_transform

from geoseg.cluster import run_tasks, session
from geoseg.data import (
    LabelSpec,
    area_mask,
    check_codes,
    check_labels,
    raster_values,
    read_codes,
    vector_in_window,
)
from geoseg.errors import ConfigError, GridMismatchError, LabelError, check_range
from geoseg.io import (
    NODATA_CLASS,
    ClassInfo,
    check_class_map,
    check_input,
    read_profile,
    read_vector,
    resolve_path,
)
from geoseg.tiling import MIN_BLOCK, block_windows

log = logging.getLogger("geoseg")


@dataclass
class BlockCounts:
    """Confusion matrices of one block: ``(regions + 1, K, K)``, index 0 for the whole area;
    and truth codes found that are not in the class list."""

    confusion: np.ndarray
    unknown: set[int]

    def __add__(self, other: BlockCounts) -> BlockCounts:
        return BlockCounts(self.confusion + other.confusion, self.unknown | other.unknown)


def region_masks(
    path: str | None, window: Window, profile: Any, positions: tuple[int, ...]
) -> np.ndarray:
    """``(n, h, w)`` bool: pixels of ``window`` inside each region, the regions being the
    features of ``path`` at ``positions``. Regions may overlap; each is rasterized on its own."""
    h, w = int(window.height), int(window.width)
    masks = np.zeros((len(positions), h, w), dtype=bool)
    if path is None:
        return masks
    slot = {p: i for i, p in enumerate(positions)}
    gdf = vector_in_window(path, window, profile)
    t = window_transform(window, profile.transform)
    for geom, pos in zip(gdf.geometry, gdf.index):  # the index is the feature's position
        if int(pos) in slot:
            masks[slot[int(pos)]] |= rasterize(
                [(geom, 1)], out_shape=(h, w), transform=t, fill=0, dtype="uint8"
            ).astype(bool)
    return masks


def truth_codes(
    spec: LabelSpec, window: Window, profile: Any, resample: bool = False
) -> np.ndarray:
    """Truth codes in ``window`` of the class map's grid (-1: none); with ``resample``, a truth
    raster on another grid is warped onto it with nearest neighbour."""
    if not resample or spec.is_vector:
        return read_codes(spec, window, profile)
    from rasterio.enums import Resampling
    from rasterio.vrt import WarpedVRT

    with (
        rasterio.open(spec.path) as src,
        WarpedVRT(
            src,
            crs=profile.crs or src.crs,
            transform=profile.transform,
            width=profile.width,
            height=profile.height,
            resampling=Resampling.nearest,
        ) as vrt,
    ):
        return read_codes(spec, window, profile, src=vrt)


def block_counts(
    window: Window,
    prediction: str,
    truth: LabelSpec,
    class_ids: tuple[int, ...],
    regions: str | None,
    positions: tuple[int, ...],
    within: str | None,
    resample: bool = False,
) -> BlockCounts:
    """Count one block (a Dask task); ``truth`` carries its ignored codes and class map."""
    profile = read_profile(prediction)
    with rasterio.open(prediction) as src:
        pred = src.read(1, window=window).astype(np.int64)
        nodata = src.nodata if src.nodata is not None else NODATA_CLASS
    codes = truth_codes(truth, window, profile, resample)
    k = len(class_ids)
    lut = np.full(
        max(max(class_ids), int(codes.max(initial=0)), int(pred.max(initial=0))) + 1,
        -1,
        dtype=np.int64,
    )
    lut[list(class_ids)] = np.arange(k)
    labelled = (codes >= 0) & area_mask(within, window, profile)
    t = lut[np.where(codes >= 0, codes, 0)]
    p = lut[pred]
    unknown = set(np.unique(codes[labelled & (t < 0)]).tolist())
    valid = labelled & (pred != nodata) & (t >= 0) & (p >= 0)
    pair = t * k + p
    conf = np.zeros((len(positions) + 1, k, k), dtype=np.int64)
    conf[0] = np.bincount(pair[valid], minlength=k * k).reshape(k, k)
    for r, m in enumerate(region_masks(regions, window, profile, positions), start=1):
        conf[r] = np.bincount(pair[valid & m], minlength=k * k).reshape(k, k)
    return BlockCounts(conf, unknown)


def scores(confusion: np.ndarray, classes: Sequence[ClassInfo]) -> dict[str, Any]:
    """Metrics from one ``K x K`` confusion matrix (rows truth, columns prediction).

    mIoU is the macro mean over classes present in truth or prediction; a class absent from
    both has ``null`` scores and ``"present": false``.
    """
    cm = confusion.astype(np.float64)
    tp = np.diag(cm)
    truth = cm.sum(1)
    pred = cm.sum(0)
    total = cm.sum()
    present = (truth + pred) > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = tp / (truth + pred - tp)
        precision = tp / pred
        recall = tp / truth
        f1 = 2 * tp / (truth + pred)
    per_class = []
    for i, c in enumerate(classes):

        def val(a: np.ndarray, i: int = i) -> float | None:
            return None if not np.isfinite(a[i]) else round(float(a[i]), 6)

        per_class.append(
            {
                "id": c.id,
                "name": c.name,
                "present": bool(present[i]),
                "iou": val(iou) if present[i] else None,
                "precision": val(precision),
                "recall": val(recall),
                "f1": val(f1) if present[i] else None,
                "truth_pixels": int(truth[i]),
                "predicted_pixels": int(pred[i]),
            }
        )
    if total == 0:
        return {
            "pixels": 0,
            "miou": None,
            "fw_iou": None,
            "overall_accuracy": None,
            "kappa": None,
            "per_class": per_class,
            "confusion_matrix": confusion.tolist(),
        }
    oa = tp.sum() / total
    pe = (truth * pred).sum() / total**2
    kappa = (oa - pe) / (1 - pe) if pe < 1 else 1.0
    iou_present = np.where(present, np.nan_to_num(iou), 0.0)
    return {
        "pixels": int(total),
        "miou": round(float(iou_present[present].mean()), 6),
        "fw_iou": round(float((truth / total * np.nan_to_num(iou)).sum()), 6),
        "overall_accuracy": round(float(oa), 6),
        "kappa": round(float(kappa), 6),
        "per_class": per_class,
        "confusion_matrix": confusion.tolist(),
    }


def evaluate(
    prediction: str | os.PathLike[str],
    truth: str | os.PathLike[str],
    output: str | os.PathLike[str] | None = None,
    *,
    truth_field: str | None = None,
    ignore: Sequence[int] = (),
    regions: str | os.PathLike[str] | None = None,
    region_field: str | None = None,
    within: str | os.PathLike[str] | None = None,
    class_map: dict[int, int] | None = None,
    resample: str | None = None,
    block: int = 2048,
    workers: int | None = None,
    scheduler: str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Score the class map ``prediction`` against ``truth``; write the report to ``output``.

    Parameters
    ----------
    prediction
        A class map, such as the output of ``geoseg predict``.
    truth
        A class raster on the class map's grid (another grid needs ``resample="nearest"``), or
        a vector file whose ``truth_field`` holds the codes, rasterized block by block on the
        class map's grid (reprojected as needed).
    output
        ``.json`` (the schema is in :mod:`geoseg.report`), ``.csv`` (a row per region and
        class), ``.md`` or ``.html`` (one self-contained page); ``None`` writes nothing.
    ignore
        Truth codes that mean unlabelled.
    regions, region_field
        Polygons scored one by one, each in full (they may overlap), named by that column.
    within
        Polygons: only pixels inside them count at all.
    class_map
        Truth code -> class id of the class map, for truth in other codes; codes it does not
        name are taken as they are.
    resample
        ``"nearest"``: warp a truth raster on another grid onto the class map's.

    Returns
    -------
    dict: the report (see :mod:`geoseg.report` for its keys).

    Raises
    ------
    GridMismatchError
        A truth raster on another grid, without ``resample``.
    LabelError
        Truth that does not overlap the class map, or holds codes the class map lacks.
    ConfigError
        A region field that does not exist (the error lists the fields), a bad option.
    """
    from geoseg.report import check_report_path, write_report

    check_range("--block", block, MIN_BLOCK)
    if resample not in (None, "nearest"):
        raise ConfigError(f"--resample must be 'nearest' (class codes), got {resample!r}")
    # every path is resolved here: workers may run in other folders, or on other machines
    truth = str(_resolved(truth))
    regions, within = _resolved(regions), _resolved(within)
    if output is not None:
        inputs = [_resolved(prediction), truth, regions, within]
        check_report_path(output, overwrite, inputs=inputs)
    profile = read_profile(str(_resolved(prediction)), "class map")
    classes = check_class_map(profile)
    if classes is None:
        warnings.warn(
            f"class map {profile.path!r} has no class metadata; scoring by class id", stacklevel=2
        )
    pairs = tuple(sorted((int(k), int(v)) for k, v in (class_map or {}).items()))
    spec = LabelSpec(str(truth), truth_field, tuple(ignore), pairs)
    if resample and not spec.is_vector:
        _check_overlap(profile, read_profile(spec.path, "truth"), str(truth))
        check_codes(spec, raster_values(spec.path), "truth")
    else:
        try:
            spec = check_labels(spec, profile, "truth", "class map")
        except GridMismatchError as exc:
            raise GridMismatchError(
                f"{exc}; or pass --resample nearest to warp the truth onto the class map's grid"
            ) from None
    region_path = regions
    region_names, positions = (
        _check_regions(region_path, region_field, profile) if region_path else ([], ())
    )
    if within is not None:
        check_input(within, "area")
    blocks = block_windows(profile.height, profile.width, block)
    with session(workers, scheduler) as client:
        if classes is None:
            classes = _classes_from_data(client, blocks, profile.path)
        ids = tuple(c.id for c in classes)
        parts = run_tasks(
            client,
            block_counts,
            blocks,
            "evaluate",
            profile.path,
            spec,
            ids,
            region_path,
            positions,
            within,
            resample is not None,
            cpu_only=True,
        )
    total = parts[0]
    for p in parts[1:]:
        total = total + p
    if total.unknown:
        raise LabelError(
            f"truth {str(truth)!r} holds codes {sorted(total.unknown)} that the class map does not "
            f"have ({list(ids)}); map them with --class-map CODE:ID,... or leave them out with "
            f"--ignore {','.join(map(str, sorted(total.unknown)))}"
        )
    report: dict[str, Any] = {
        "prediction": profile.path,
        "truth": truth,
        "truth_field": spec.field,
        "regions_file": region_path,
        "region_field": region_field or ("name" if region_path else None),
        "within": within,
        "class_map": {str(k): v for k, v in (class_map or {}).items()},
        "ignore": list(ignore),
        "resample": resample,
        "classes": [c.__dict__ for c in classes],
        "miou_definition": "mean IoU over classes present in truth or prediction",
        "overall": scores(total.confusion[0], classes),
        "regions": [
            {"name": n, "feature": positions[i], **scores(total.confusion[i + 1], classes)}
            for i, n in enumerate(region_names)
        ],
    }
    if report["overall"]["pixels"] == 0:
        warnings.warn(
            "no pixel is both predicted and labelled: do the rasters overlap?", stacklevel=2
        )
    if output is not None:
        write_report(report, output, overwrite=overwrite)
    return report


def _resolved(path: str | os.PathLike[str] | None) -> str | None:
    return None if path is None else resolve_path(path)


def _check_overlap(profile: Any, other: Any, what: str) -> None:
    """Refuse a truth raster whose footprint misses the class map's."""
    from rasterio.warp import transform_bounds
    from shapely.geometry import box

    from geoseg.io import raster_bounds

    bounds = raster_bounds(other)
    if other.crs and profile.crs and other.crs != profile.crs:
        bounds = transform_bounds(other.crs, profile.crs, *bounds)
    if not box(*bounds).intersects(box(*raster_bounds(profile))):
        raise LabelError(
            f"truth {what!r} does not overlap the class map {profile.path!r} (bounds {bounds} "
            f"against {raster_bounds(profile)}); check that both cover the same area"
        )


def _block_class_ids(window: Window, path: str) -> set[int]:
    with rasterio.open(path) as src:
        a = src.read(1, window=window)
        nd = src.nodata if src.nodata is not None else NODATA_CLASS
    return set(np.unique(a[a != nd]).tolist())


def _classes_from_data(client: Any, blocks: list[Window], path: str) -> list[ClassInfo]:
    found: set[int] = set().union(
        *run_tasks(client, _block_class_ids, blocks, "class ids", path, cpu_only=True)
    )
    return [ClassInfo(i, f"class {i}", "#808080") for i in sorted(found)]


def _check_regions(path: str, field: str | None, profile: Any) -> tuple[list[str], tuple[int, ...]]:
    """Names and file positions of the regions that overlap the class map (tasks refer to
    regions by position in the file)."""
    from shapely.geometry import box

    from geoseg.io import raster_bounds

    gdf = read_vector(path, "regions", profile.crs, bounds=raster_bounds(profile))
    columns = [c for c in gdf.columns if c != "geometry"]
    if field is None:
        if "name" not in gdf.columns:
            raise ConfigError(
                f"regions {path!r}: say which column names the regions with --region-field; "
                f"columns: {', '.join(columns)}"
            )
        field = "name"
    if field not in gdf.columns:
        raise ConfigError(
            f"regions {path!r} have no column {field!r}; columns: {', '.join(columns)}"
        )
    inside = gdf[gdf.intersects(box(*raster_bounds(profile))).to_numpy()]
    if inside.empty:
        warnings.warn(f"no region of {path!r} overlaps the class map", stacklevel=3)
    # the index holds each feature's position in the file, which the tasks refer to
    return [str(v) for v in inside[field]], tuple(int(i) for i in inside.index)
