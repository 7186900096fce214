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
from typing import Any

import numpy as np
import rasterio
import shapely
from rasterio.enums import Resampling
from rasterio.features import rasterize
from rasterio.vrt import WarpedVRT
from rasterio.warp import transform_bounds
from rasterio.windows import Window
from shapely.geometry import box

from geoseg.classes import NODATA, ClassInfo
from geoseg.cluster import run_tasks, session
from geoseg.errors import ConfigError, GridMismatchError, LabelError, check_range, option
from geoseg.io import (
    check_class_map,
    check_input,
    is_vector_path,
    raster_bounds,
    read_profile,
    read_vector,
    resolve_path,
)
from geoseg.labels import (
    LabelSpec,
    check_codes,
    check_labels,
    check_regions,
    map_codes,
    raster_values,
)
from geoseg.report import (
    QUICKLOOK_PX,
    EvaluationReport,
    QuickLook,
    RegionScores,
    check_report_path,
    write_report,
)
from geoseg.scoring import Intervals, block_bootstrap, scores
from geoseg.tasks.evaluate import block_class_ids, block_counts
from geoseg.tiling import MIN_BLOCK, block_windows

log = logging.getLogger("geoseg")


def evaluate(
    class_map: str | os.PathLike[str],
    truth: str | os.PathLike[str],
    output: str | os.PathLike[str] | None = None,
    *,
    truth_field: str | None = None,
    ignore: Sequence[int] = (),
    regions: str | os.PathLike[str] | None = None,
    region_field: str | None = None,
    within: str | os.PathLike[str] | None = None,
    code_map: dict[Any, int] | None = None,
    resample: str | None = None,
    design: str = "stratified",
    design_file: str | os.PathLike[str] | None = None,
    strata: str | os.PathLike[str] | None = None,
    bootstrap: int = 0,
    seed: int = 0,
    block: int = 2048,
    client: Any = None,
    workers: int | None = None,
    scheduler: str | None = None,
    overwrite: bool = False,
) -> EvaluationReport:
    """Score the class map ``class_map`` (a raster of class ids) against ``truth``; write the
    report to ``output``.

    Parameters
    ----------
    class_map
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
    code_map
        Truth code -> class id of the class map, for truth in other codes; codes it does not
        name are taken as they are. For reference points a code may be a label's name.
    resample
        ``"nearest"``: warp a truth raster on another grid onto the class map's.
    design, design_file, strata
        For truth that is points (a reference sample): the design's file (``SAMPLE.design.json``
        of ``geoseg sample``, found beside the points by default), else strata from the raster
        ``strata`` on the class map's grid (by default the class map: its classes are the
        strata), or ``design="simple"`` for a simple random or systematic sample. The report
        then holds the estimates of :mod:`geoseg.accuracy` (``report.sample``).
    bootstrap, seed
        For dense truth: confidence intervals of IoU, mIoU and accuracy from ``bootstrap``
        resamples of the blocks (with replacement; neighbouring pixels are not independent,
        blocks nearly are), drawn from ``seed``.
    client, workers, scheduler
        Where to run (see :func:`geoseg.cluster.session`): a ``distributed.Client``, a local
        cluster of ``workers`` processes or a running scheduler's address; by default the
        current client, else a local cluster made for the call.

    Returns
    -------
    EvaluationReport: the scores and what was scored (:meth:`~geoseg.report.EvaluationReport.to_dict`
    gives the JSON schema of :mod:`geoseg.report`).

    Raises
    ------
    GridMismatchError
        A truth raster on another grid, without ``resample``.
    LabelError
        Truth that does not overlap the class map, or holds codes the class map lacks.
    ConfigError
        A region field that does not exist (the error lists the fields), a bad option.
    """
    check_range("--block", block, MIN_BLOCK)
    if resample not in (None, "nearest"):
        raise ConfigError(
            f"{option('--resample', None)} must be 'nearest' (class codes), got {resample!r}"
        )
    # every path is resolved here: workers may run in other folders, or on other machines
    truth = str(_resolved(truth))
    regions, within = _resolved(regions), _resolved(within)
    if output is not None:
        inputs = [_resolved(class_map), truth, regions, within]
        check_report_path(output, overwrite, inputs=inputs)
    profile = read_profile(str(_resolved(class_map)), "class map")
    classes = check_class_map(profile)
    if classes is None:
        warnings.warn(
            f"class map {profile.path!r} has no class metadata; scoring by class id", stacklevel=2
        )
    check_range("--bootstrap", bootstrap, 0)
    if is_vector_path(truth) and _all_points(truth):
        if bootstrap:
            raise ConfigError(
                f"{option('--bootstrap', bootstrap)} is for dense truth; the estimates from "
                "reference points have their standard errors from the sample's design"
            )
        report = _evaluate_points(
            profile,
            classes,
            truth,
            truth_field,
            code_map or {},
            regions,
            region_field,
            within,
            design,
            None if design_file is None else str(_resolved(design_file)),
            None if strata is None else str(_resolved(strata)),
            block,
            client,
            workers,
            scheduler,
        )
        if output is not None:
            write_report(report, output, overwrite=overwrite)
        return report
    names = [k for k in (code_map or {}) if not isinstance(k, (int, np.integer))]
    if names:
        raise ConfigError(
            f"{option('--class-map', None)} maps label names {names}; names are for reference "
            "points, and this truth holds integer codes: map CODE:ID"
        )
    pairs = tuple(sorted((int(k), int(v)) for k, v in (code_map or {}).items()))
    spec = LabelSpec(str(truth), truth_field, tuple(ignore), pairs)
    if resample and not spec.is_vector:
        _check_overlap(profile, read_profile(spec.path, "truth"), str(truth))
        check_codes(spec, raster_values(spec.path), "truth")
    else:
        try:
            spec = check_labels(spec, profile, "truth", "class map")
        except GridMismatchError as exc:
            raise GridMismatchError(
                f"{exc}; or pass {option('--resample', 'nearest')} to warp the truth onto the "
                "class map's grid",
                filename=exc.filename,
            ) from None
    region_path = regions
    region_names, positions = (
        check_regions(region_path, region_field, profile) if region_path else ([], ())
    )
    if within is not None:
        check_input(within, "area")
    blocks = block_windows(profile.height, profile.width, block)
    if bootstrap and len(blocks) < 2:
        raise ConfigError(
            f"{option('--bootstrap', bootstrap)} resamples blocks, and the class map is "
            f"{len(blocks)} block of {block} px; pass a smaller {option('--block', None)} "
            f"(at least {MIN_BLOCK}) so that it holds several"
        )
    with session(workers, scheduler, client=client) as client:
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
    intervals = None
    if bootstrap:
        intervals = _bootstrap(parts, region_names, bootstrap, seed)
    if total.unknown:
        raise LabelError(
            f"truth {str(truth)!r} holds codes {sorted(total.unknown)} that the class map does not "
            f"have ({list(ids)}); map them with {option('--class-map', None)} or leave them out "
            f"with {option('--ignore', sorted(total.unknown))}"
        )
    report = EvaluationReport(
        prediction=profile.path,
        truth=truth,
        truth_field=spec.field,
        regions_file=region_path,
        region_field=region_field or ("name" if region_path else None),
        within=within,
        code_map=dict(pairs),
        ignore=tuple(ignore),
        resample=resample,
        classes=tuple(classes),
        overall=scores(total.confusion[0], classes),
        regions=tuple(
            RegionScores(
                **vars(scores(total.confusion[i + 1], classes)), name=n, feature=positions[i]
            )
            for i, n in enumerate(region_names)
        ),
        intervals=intervals,
    )
    if report.overall.pixels == 0:
        warnings.warn(
            "no pixel is both predicted and labelled: do the rasters overlap?", stacklevel=2
        )
    if output is not None:
        look = quick_look(report) if str(output).lower().endswith(".html") else None
        write_report(report, output, overwrite=overwrite, look=look)
    return report


def _bootstrap(
    parts: Sequence[Any], region_names: Sequence[str], resamples: int, seed: int
) -> Intervals:
    """Bootstrap intervals over the blocks' confusion matrices, for the whole area and for
    each region (each from its own blocks and its own random stream)."""
    conf = np.stack([p.confusion for p in parts])  # (blocks, regions + 1, K, K)
    seeds = np.random.SeedSequence(seed).spawn(len(region_names) + 1)
    return Intervals(
        resamples=resamples,
        seed=seed,
        overall=block_bootstrap(conf[:, 0], resamples, np.random.default_rng(seeds[0])),
        regions=tuple(
            block_bootstrap(conf[:, i + 1], resamples, np.random.default_rng(seeds[i + 1]), n)
            for i, n in enumerate(region_names)
        ),
    )


def _all_points(path: str) -> bool:
    """Whether the vector file's features are all points (a reference sample)."""
    import pyogrio

    kind = str(pyogrio.read_info(path).get("geometry_type") or "")
    return kind.replace(" Z", "").replace("Multi", "") == "Point"


def _evaluate_points(
    profile: Any,
    classes: list[ClassInfo] | None,
    truth: str,
    truth_field: str | None,
    code_map: dict[Any, int],
    regions: str | None,
    region_field: str | None,
    within: str | None,
    design: str,
    design_file: str | None,
    strata: str | None,
    block: int,
    client: Any,
    workers: int | None,
    scheduler: str | None,
) -> EvaluationReport:
    """The estimates from reference points, and the plain counts of the sample."""
    from geoseg.stages.sample import design_path, point_accuracy

    if classes is None:
        raise LabelError(
            f"class map {profile.path!r} has no class metadata: the estimates need its classes; "
            "estimate on a class map geoseg wrote"
        )
    if design_file is None and strata is None and design == "stratified":
        beside = design_path(truth)
        if beside.exists():
            design_file = str(beside)
    region_names, positions = check_regions(regions, region_field, profile) if regions else ([], ())
    if within is not None:
        check_input(within, "area")
    with session(workers, scheduler, client=client) as client:
        whole, per_region, counts, pairs = point_accuracy(
            profile.path,
            profile,
            classes,
            truth,
            truth_field,
            code_map=code_map,
            design=design,
            design_file=design_file,
            strata=strata,
            regions=regions,
            positions=positions,
            region_names=region_names,
            within=within,
            block=block,
            client=client,
        )
    k = len(classes)
    slot = {c.id: i for i, c in enumerate(classes)}
    conf = np.zeros((k, k), dtype=np.int64)
    for t, p in pairs.T:
        if int(t) in slot and int(p) in slot:
            conf[slot[int(t)], slot[int(p)]] += 1
    return EvaluationReport(
        prediction=profile.path,
        truth=truth,
        truth_field=truth_field,
        regions_file=regions,
        region_field=region_field or ("name" if regions else None),
        within=within,
        code_map={},
        classes=tuple(classes),
        overall=scores(conf, classes),
        sample=whole,
        sample_regions=per_region,
        sample_points=counts.note(),
    )


def _resolved(path: str | os.PathLike[str] | None) -> str | None:
    return None if path is None else resolve_path(path)


def _check_overlap(profile: Any, other: Any, what: str) -> None:
    """Refuse a truth raster whose footprint misses the class map's."""

    bounds = raster_bounds(other)
    if other.crs and profile.crs and other.crs != profile.crs:
        bounds = transform_bounds(other.crs, profile.crs, *bounds)
    if not box(*bounds).intersects(box(*raster_bounds(profile))):
        raise LabelError(
            f"truth {what!r} does not overlap the class map {profile.path!r} (bounds {bounds} "
            f"against {raster_bounds(profile)}); check that both cover the same area"
        )


def _classes_from_data(client: Any, blocks: list[Window], path: str) -> list[ClassInfo]:
    found: set[int] = set().union(
        *run_tasks(client, block_class_ids, blocks, "class ids", path, cpu_only=True)
    )
    return [ClassInfo(i, f"class {i}", "#808080") for i in sorted(found)]


def quick_look(report: EvaluationReport, max_px: int = QUICKLOOK_PX) -> QuickLook:
    """Read what the HTML report pictures (:class:`geoseg.report.QuickLook`): the class map
    and the truth of ``report`` on one small grid (nearest neighbour; the longer side
    ``max_px``), truth codes ignored or mapped as they were scored, and the scored regions'
    outlines on that grid."""
    with rasterio.open(report.prediction) as src:
        scale = max(src.height, src.width) / max_px
        shape = (max(1, round(src.height / scale)), max(1, round(src.width / scale)))
        pred = src.read(1, out_shape=shape, resampling=Resampling.nearest).astype(np.int64)
        nodata = src.nodata if src.nodata is not None else NODATA
        pred[pred == nodata] = -1
        transform = src.transform * src.transform.scale(src.width / shape[1], src.height / shape[0])
        crs, grid = src.crs, (src.crs, src.transform, src.width, src.height)
    left, top = transform * (0, 0)
    right, bottom = transform * (shape[1], shape[0])
    truth_path = report.truth
    if is_vector_path(truth_path):
        gdf = read_vector(truth_path, "truth", crs, bounds=(left, bottom, right, top))
        field = report.truth_field
        truth = rasterize(
            ((g, int(v)) for g, v in zip(gdf.geometry, gdf[field]) if v is not None),
            out_shape=shape,
            transform=transform,
            fill=-1,
            dtype="int32",
        ).astype(np.int64)
    else:
        with rasterio.open(truth_path) as tsrc:
            vrt_crs, vrt_t, w, h = grid
            with WarpedVRT(
                tsrc,
                crs=vrt_crs or tsrc.crs,
                transform=vrt_t,
                width=w,
                height=h,
                resampling=Resampling.nearest,
            ) as vrt:
                masked = vrt.read(1, out_shape=shape, resampling=Resampling.nearest, masked=True)
        truth = np.where(np.ma.getmaskarray(masked), -1, masked.filled(0)).astype(np.int64)
    ignored = np.isin(truth, list(report.ignore))  # truth codes, before mapping
    truth = map_codes(truth, report.code_map)
    truth[ignored] = -1
    regions: dict[int, Any] = {}
    if report.regions_file:
        frame = shapely.box(left, bottom, right, top)
        gdf = read_vector(report.regions_file, "regions", crs, bounds=frame.bounds)
        inv = ~transform
        for r in report.regions:
            geom = gdf.geometry.loc[r.feature].intersection(frame)
            px = shapely.transform(geom, lambda xy: np.column_stack(inv * (xy[:, 0], xy[:, 1])))
            regions[r.feature] = px.simplify(0.5)
    return QuickLook(pred, truth, regions)
