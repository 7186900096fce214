"""Predicting a scene on a Dask cluster and assembling the class map (the graph stage).

One task per block (:func:`geoseg.tasks.predict.predict_block`); each writes its core to a part file
in a folder beside the output, named for the block. The parts are then copied, block by block, into
one tiled GeoTIFF and turned into a Cloud-Optimized GeoTIFF with the bundle's colour table and class
names, under a temporary name that is renamed onto the output when complete. A mosaic of several
scenes predicts each scene's blocks on its share of the mosaic's grid into a folder of its own,
then composites each mosaic block from them (:func:`geoseg.tasks.predict.composite_block`).

A run that is stopped leaves its part files and a record of its settings; the same command run
again finds them, checks that the settings match, and computes only the blocks that are missing.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import os
import threading
import time
import warnings
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Concatenate, ParamSpec

import numpy as np
import rasterio
import rasterio.shutil
from rasterio.windows import Window
from rasterio.windows import intersect as windows_intersect

from geoseg.blending import resolve_blend
from geoseg.bundle import Bundle, compare_scene, load_bundle
from geoseg.catalog import expand_scenes, open_scene, parse_asset_map, scene_ids
from geoseg.classes import NODATA
from geoseg.cluster import (
    FollowUp,
    chosen_client,
    connect,
    count_workers,
    dashboard_link,
    default_workers,
    model_slots,
    run_tasks,
    scheduler_address,
    session,
    task_resources,
    task_result,
    workers_info,
)
from geoseg.errors import (
    AsCaller,
    BandMismatchError,
    ConfigError,
    Interrupted,
    NoCRSError,
    again,
    check_choice,
    check_range,
    option,
)
from geoseg.io import (
    GEOSEG_TAG,
    RESAMPLINGS,
    Grid,
    SceneProfile,
    atomic_output,
    check_output,
    exclusive,
    folders_for,
    is_url,
    remove_empty,
    resolve_path,
    write_category_names,
    write_class_metadata,
)
from geoseg.mosaic import (
    area_geometry,
    footprint,
    mosaic_grid,
    parse_bounds,
    parse_crs,
    parse_resolution,
)
from geoseg.progress import Progress
from geoseg.provenance import epsg_code, item_path, provenance_tags, stac_item, write_item
from geoseg.stages.vectorize import FORMATS, check_polygon_settings, output_format, vectorize
from geoseg.tasks.predict import (
    COMPOSITES,
    TTAS,
    Accumulated,
    BlockJob,
    BlockResult,
    CompositeJob,
    SceneParts,
    accumulate_block,
    composite_block,
    finish_block,
    part_done,
    part_name,
    predict_block,
    resolve_device,
    resolve_precision,
    share_bundle,
    speeds_kept,
    take_piece,
    window_rates,
)
from geoseg.tiling import MIN_BLOCK, MIN_WINDOW, WindowGrid, block_windows
from geoseg.tuning import (
    MEASURE_BUDGET_S,
    MEASURED,
    Rate,
    best_rates,
    cache_path,
    choose,
    covering,
    measured_windows,
)

log = logging.getLogger("geoseg")
_P = ParamSpec("_P")


@dataclass(frozen=True)
class PredictResult:
    """What :func:`predict_scene` wrote for one scene and how much work it was."""

    path: Path
    blocks: int
    resumed: int  # blocks found finished by an earlier, stopped run
    windows_run: int
    windows_skipped: int  # all-nodata windows, never sent to the model
    valid_pixels: int
    probabilities: Path | None = None
    polygons: Path | None = None
    # wall time: "start" (the cluster), "blocks" (start included), "tasks" (summed over the
    # block tasks of this scene), "assemble"
    seconds: dict[str, float] | None = None
    window: int = 0  # the model window used (chosen, with window="auto")
    batch_size: int | None = None  # None: the device's default for the window


@dataclass(frozen=True)
class PredictOptions:
    """The settings of one prediction run, checked and resolved (the window chosen with
    ``window="auto"``, the overlap from the bundle when not given, the blend from the
    overlap): what every block is computed with.
    A resumed run must have the same (:meth:`run_settings`)."""

    window: int
    overlap: int
    block: int | None  # None: default_block, once the workers are known
    blend: str
    batch_size: int | None
    device: str
    precision: str
    probabilities: bool
    composite: str = "mean"
    resampling: str = "bilinear"
    tta: str = "none"
    overlap_from: str = "exact"  # exact, effective or given: for the plan line, not the parts

    def run_settings(self, bundle_hash: str) -> dict[str, Any]:
        """What the parts of a run depend on: a part of another run is not reused."""
        return {
            "bundle": bundle_hash,
            "window": self.window,
            "overlap": self.overlap,
            "block": self.block,
            "blend": self.blend,
            "precision": self.precision,
            "probabilities": self.probabilities,
            "composite": self.composite,
            "resampling": self.resampling,
            "tta": self.tta,
        }


@dataclass
class _Share:
    """A mosaic scene's share of the mosaic's grid: the part of it over the scene's footprint,
    where its windows lie on their own grid (anchored at the footprint, rounded to the
    model's stride, so each scene runs the windows it would run alone); its blocks, those
    still to run, and the folder their parts go to."""

    index: int  # among the mosaic's scenes
    offset: tuple[int, int]  # (row, col) on the mosaic's grid
    target: Grid
    grid: WindowGrid
    cores: list[Window]
    todo: list[Window]
    parts: Path
    scene: SceneProfile
    resampling: str
    area: bytes | None

    def job(self, core: Window) -> BlockJob:
        return BlockJob(
            core, self.scene, self.grid, str(self.parts), self.target, self.resampling, self.area
        )


@dataclass
class _Plan:
    """One class map's share of a prediction run: its scenes (one, or a mosaic's), the grid
    it lies on, and its blocks (those that touch a scene and the area), each with the scenes
    that touch it. A mosaic of several scenes (``shares``) predicts each scene's blocks on its
    own share of the grid, then composites them block by block of the mosaic."""

    scenes: list[SceneProfile]
    target: Grid
    out: Path
    grid: WindowGrid
    cores: list[Window]
    touching: dict[tuple[int, int], tuple[int, ...]]
    parts: Path
    todo: list[Window]
    probabilities: bool
    opts: PredictOptions
    area: bytes | None = None
    shares: list[_Share] | None = None

    @property
    def name(self) -> str:
        return self.scenes[0].path if len(self.scenes) == 1 else f"mosaic {self.out}"

    @property
    def n_windows(self) -> int:
        if self.shares is None:
            return self.grid.n_windows
        return sum(s.grid.n_windows for s in self.shares)

    @property
    def folders(self) -> set[Path]:
        return {self.parts, *(s.parts for s in self.shares or [])}

    def job(self, core: Window) -> BlockJob:
        return BlockJob(
            core, self.scenes[0], self.grid, str(self.parts), self.target,
            self.opts.resampling, self.area,
        )  # fmt: skip

    def composite_job(self, core: Window, class_ids: tuple[int, ...]) -> CompositeJob:
        """A mosaic block: the parts of the scenes that touch it, in the order they composite."""
        assert self.shares is not None
        sources = []
        for i in self.touching[(int(core.row_off), int(core.col_off))]:
            s = self.shares[i]
            on = [c for c in s.cores if windows_intersect(core, _shifted(c, s.offset))]
            if on:
                sources.append(SceneParts(str(s.parts), s.offset, tuple(on)))
        return CompositeJob(
            core, tuple(sources), str(self.parts), self.target, class_ids,
            self.opts.composite, self.probabilities,
        )  # fmt: skip


@dataclass(frozen=True)
class _Auto:
    """What ``window="auto"`` resolves once the workers are up: the overlap and blend asked
    for (None / "auto": from the bundle and the window)."""

    overlap: int | None
    blend: str


def _auto_window(
    client: Any,
    b: Bundle,
    bundle_path: str,
    sizes: list[tuple[int, int]],
    outs: list[Path],
    opts: PredictOptions,
    auto: _Auto,
    resources: dict[str, float] | None,
    overwrite: bool,
) -> PredictOptions:
    """``opts`` with the window (and, unless given, the batch) chosen for throughput: the
    model's speed is measured on one worker (or read from the cache there), and the window
    that maps the scenes soonest on the cluster's workers is taken
    (:func:`geoseg.tuning.choose`). ``sizes``: those of the grids the windows lie on
    (:func:`_piece_sizes`)."""
    step = _model_step(b)
    whole = covering(sizes, step)

    def overlap_for(w: int) -> int:
        return auto.overlap if auto.overlap is not None else default_overlap(b, w)

    kept = None if overwrite else _stopped_window(outs, b.hash)
    if kept is not None and overlap_for(kept) < kept:
        # a stopped run resumes on the window it chose, whatever the cluster now
        ovl = overlap_for(kept)
        log.info("window auto: %d px, as the stopped run of these outputs chose", kept)
        return replace(
            opts,
            window=kept,
            overlap=ovl,
            blend=resolve_blend(auto.blend, b.contract.receptive_field, ovl, holds=kept >= whole),
            batch_size=opts.batch_size,  # the device's default for that window
        )

    windows = measured_windows(sizes, auto.overlap if auto.overlap is not None else b.overlap)
    if getattr(client, "cluster", None) is not None and not speeds_kept(b):
        # a cluster of this machine shares its cache: say what the silence is about
        log.info(
            "window auto: measuring the model's speed on a worker at windows of %s px (once "
            "per model shape and device on this machine; at most about %d s)",
            ", ".join(map(str, windows)),
            MEASURE_BUDGET_S,
        )
    fut = client.submit(
        AsCaller(window_rates),
        bundle_path,
        [(w, overlap_for(w)) for w in windows],
        device=opts.device,
        precision=opts.precision,
        pure=False,
        resources=resources,
    )
    rates: list[Rate] = task_result(fut, "window auto", windows)
    # every CPU worker thread runs a block's model at once (a small scene's in-process worker
    # has one per core, each with one torch thread, as the speeds were measured); a GPU one
    slots = model_slots(client, opts.device)
    try:
        choice = choose(rates, sizes, overlap_for=overlap_for, slots=slots, step=step)
    except ValueError:
        raise ConfigError(
            f"{option('--overlap', None)} {auto.overlap} leaves no window to choose from "
            f"(measured: {', '.join(map(str, windows))} px); pass a smaller overlap or "
            f"{option('--window', None)}"
        ) from None
    holds = choice.window >= whole
    blend = resolve_blend(auto.blend, b.contract.receptive_field, choice.overlap, holds=holds)
    if not holds:
        _warn_overlap(b, choice.window, choice.overlap, auto.overlap is not None)
    log.info(
        "window auto: %d px, batch %d: %d windows, about %.1f s of model time on %d worker "
        "thread(s), "
        "from the model's speed on a worker (%s Mpx/s; measured once per model, device and "
        "thread count, kept in %s)",
        choice.window,
        opts.batch_size or choice.batch,
        choice.windows,
        choice.seconds,
        slots,
        ", ".join(f"{w}: {r.px_per_s / 1e6:.2f}" for w, r in best_rates(rates).items()),
        cache_path(),
    )
    return replace(
        opts,
        window=choice.window,
        overlap=choice.overlap,
        blend=blend,
        batch_size=opts.batch_size or choice.batch,
    )


def _stopped_window(outs: list[Path], bundle_hash: str) -> int | None:
    """The window of a stopped run of the same bundle on any of ``outs``, if one left parts."""
    for out in outs:
        try:
            run = json.loads((_parts_of(out) / "run.json").read_text())
        except (OSError, ValueError):
            continue
        if isinstance(run, dict) and run.get("bundle") == bundle_hash and run.get("window"):
            return int(run["window"])
    return None


def _piece_sizes(layouts: list[_Layout], step: int) -> list[tuple[int, int]]:
    """The (height, width) of every grid the windows lie on: a scene's, or each scene's share
    of a mosaic's grid."""
    sizes = []
    for lay in layouts:
        t = lay.target
        if lay.mosaic and len(lay.scenes) > 1:
            for sc in lay.scenes:
                f = footprint(sc, t)
                if f is not None:
                    a = _anchored(f, step)
                    sizes.append((int(a.height), int(a.width)))
        else:
            sizes.append((t.height, t.width))
    return sizes


def _shifted(w: Window, offset: tuple[int, int]) -> Window:
    return Window(w.col_off + offset[1], w.row_off + offset[0], w.width, w.height)


def predict_scenes(
    bundle: str | os.PathLike[str],
    scenes: Sequence[str | os.PathLike[str]],
    output: str | os.PathLike[str],
    *,
    window: int | str | None = "auto",
    overlap: int | str | None = None,
    block: int | None = None,
    batch_size: int | None = None,
    blend: str = "auto",
    device: str = "auto",
    precision: str = "auto",
    tta: str = "none",
    probabilities: bool = False,
    allow_no_crs: bool = False,
    strict: bool = False,
    polygons: str | os.PathLike[str] | None = None,
    min_area: float = 0.0,
    simplify: float = 0.0,
    mosaic: bool = False,
    composite: str = "mean",
    within: str | os.PathLike[str] | None = None,
    bounds: str | Sequence[float] | None = None,
    crs: str | None = None,
    resolution: float | Sequence[float] | str | None = None,
    resampling: str = "bilinear",
    mask: str | int | None = None,
    mask_values: Sequence[float] = (),
    asset_map: str | dict[str, str] | None = None,
    client: Any = None,
    workers: int | None = None,
    scheduler: str | None = None,
    overwrite: bool = False,
) -> list[PredictResult]:
    """Predict every scene with ``bundle`` in one Dask graph and write their class maps (COGs),
    or with ``mosaic`` one class map of them all.

    Parameters
    ----------
    bundle, scenes
        The model bundle; the scenes: raster paths or GDAL URLs (``/vsis3/...``), band files
        joined with commas (``B2.tif,B3.tif,B4.tif``: one scene, its bands in that order), STAC
        Items (``.json``), ItemCollections (a scene per Item) or text files listing one scene
        per line (:func:`geoseg.catalog.expand_scenes`). Bands at other resolutions or in
        another CRS are resampled per block onto the scene's finest grid (``resampling``).
    output
        With one scene or ``mosaic``, the class map to write; with several scenes, a folder
        that receives ``<scene name>.tif`` for each. Beside every class map: a STAC Item
        (``classes.json``) naming its grid, classes and inputs.
    window, overlap
        Model window and overlap in pixels. ``window="auto"`` (the default; also ``None``):
        the window and batch that map these scenes soonest on these workers, counted from the
        model's speed measured on a worker at a few windows (once per model, device and
        thread count; kept in :func:`geoseg.tuning.cache_path`). The overlap defaults to the
        bundle's (from the model's receptive field, at most half the window, aligned to the
        model's stride: ``"exact"``, the tiled map equals a whole-scene prediction);
        ``"effective"`` is the overlap measured at training, at which tiles change fewer than
        0.05 % of pixels (:func:`geoseg.tuning.effective_overlap`).
    block
        Block size in pixels: the unit of scheduling, writing and resuming; memory per task
        grows with it. Default: :func:`default_block`, about two blocks per local worker, at
        most 2048.
    batch_size
        Windows per forward pass; default :func:`geoseg.tasks.predict.default_batch_size` (8 on a
        GPU, one 512 px window's worth of pixels on a CPU).
    blend
        How overlapping windows are weighted: ``trim`` (each pixel from the window where it is
        farthest from an edge; every window then runs once), ``gaussian``, ``cosine``, ``none``
        (equal weights), or ``auto``: ``trim`` when the overlap covers the model's receptive
        field, else ``gaussian``.
    device
        ``auto`` (a GPU when the worker has one), ``cpu`` or ``cuda``.
    precision
        ``auto`` (bf16 where the hardware has it, else fp32 on a CPU, fp16 on an older GPU),
        ``fp32``, ``bf16`` or ``fp16`` (GPU only). Channels-last layout in every case.
    tta
        Test-time augmentation: ``none``, ``flips`` (4 passes per window: as is, flipped
        left-right, turned 180 degrees, flipped top-bottom) or ``d4`` (8: every flip and
        quarter turn); the passes' class probabilities are averaged. It costs one model pass
        per transform.
    probabilities
        Also write ``<class map name>_probabilities.tif``: one band per class, the probability
        scaled to 0-254, 255 for nodata.
    allow_no_crs
        Predict a scene without a CRS (the class map then has none either).
    strict
        Refuse a scene whose values, pixel size or CRS differ from the training scene's
        (:func:`geoseg.bundle.compare_scene`); without it each difference is a warning.
    polygons, min_area, simplify
        Also turn each class map into polygons on the same cluster
        (:func:`geoseg.stages.vectorize.vectorize`, with its ``min_area`` and ``simplify``):
        with one scene, the polygon file to write; with several, a folder that receives
        ``<scene name>.gpkg`` for each.
    client, workers, scheduler
        Where to run: a ``distributed.Client``; else a local cluster of ``workers`` processes,
        or the address of an existing scheduler; with none of them, the current client
        (``distributed.get_client()``), else a local cluster made for the call.
    mosaic, composite
        One class map over all the scenes, on one grid (``crs``, ``resolution``; default the
        first scene's CRS and the finest pixel size, aligned to the first scene's pixels): each
        scene is predicted in blocks of its share of the grid, then the map is composited block
        by block; where scenes overlap, their class probabilities are composited:
        ``mean`` (over the scenes with valid data there), ``max-confidence``, ``first`` or
        ``last``. Pixels no scene covers are nodata.
    within, bounds
        Map only this area: a vector file's features, or ``W,S,E,N`` in the output CRS (a
        scene's own without ``mosaic``). Only blocks that touch it run; outside it the map is
        nodata. With ``mosaic`` the map's extent is the area's.
    resampling
        How bands on another grid are resampled (:data:`geoseg.io.RESAMPLINGS`).
    mask, mask_values
        A band of each scene (a number; for STAC items an asset key) whose ``mask_values``
        mark pixels not to predict (clouds): they are nodata, or in a mosaic, do not vote.
    asset_map
        For STAC items: which asset holds each band the bundle reads (``red=B04,nir=B08``);
        otherwise assets are matched by key, ``eo:bands`` name, then common name.
    overwrite
        Replace outputs that exist.

    Returns
    -------
    list of PredictResult, one per class map.

    Raises
    ------
    BandMismatchError
        A scene's bands are not those the bundle was trained on.
    OutputExistsError
        An output exists and ``overwrite`` is false.
    """
    if not scenes:
        raise ConfigError("no scene to predict")
    b = load_bundle(bundle)
    source = (
        overlap if overlap in ("exact", "effective") else "exact" if overlap is None else "given"
    )
    overlap = _overlap_asked(b, overlap)
    if device == "cuda" and client is None and not scheduler_address(scheduler, workers):
        resolve_device("cuda")  # a local cluster: fail here, not on every worker
    resolve_precision(precision, "cuda" if device == "cuda" else "cpu")
    check_range("--batch-size", batch_size, 1)
    auto = _Auto(overlap, blend) if window is None or window == "auto" else None
    if auto is not None and overlap is not None and overlap >= MEASURED[-1]:
        raise ConfigError(
            f"{option('--overlap', overlap)} needs a window larger than it, and "
            f"{option('--window', 'auto')} chooses windows up to {MEASURED[-1]} px; pass "
            f"{option('--window', None)} too"
        )
    if auto is None:
        if not isinstance(window, int):
            raise ConfigError(
                f"{option('--window', None)} must be a number of pixels or auto, got {window!r}"
            )
        check_range("--window", window, MIN_WINDOW)
    check_range("--block", block, MIN_BLOCK)
    check_range("--overlap", overlap, 0)
    win = window if isinstance(window, int) else 0  # 0: chosen once the workers are up
    if overlap is not None and win and not overlap < win:
        raise ConfigError(
            f"{option('--overlap', None)} must be at least 0 and less than the window ({win} px), "
            f"got {overlap}"
        )
    check_choice("composite", composite, COMPOSITES)
    check_choice("tta", tta, TTAS)
    check_choice("resampling", resampling, RESAMPLINGS)
    region = _Region.check(mosaic, within, bounds, crs, resolution)
    # every path is resolved here: workers may run in other folders, or on other machines;
    # each scene's header is read once, here: for a GDAL URL every read is a request
    amap = parse_asset_map(asset_map)
    profiles = [
        open_scene(
            ref,
            bands=b.band_names,
            asset_map=amap,
            mask=None if mask is None else str(mask),
            mask_values=mask_values,
        )
        for ref in expand_scenes(scenes)
    ]
    inputs = [resolve_path(bundle), *(f for p in profiles for f in p.files)]
    if within is not None:
        inputs.append(resolve_path(within))
    outs = [_mosaic_output(Path(output))] if mosaic else _outputs(profiles, Path(output))
    for out in outs:
        check_output(out, overwrite, inputs=inputs, what="class map")
        check_output(item_path(out), overwrite, inputs=inputs, what="STAC item")
        if probabilities:
            check_output(probabilities_path(out), overwrite, inputs=inputs, what="probabilities")
    polygon_outs = _polygon_outputs(outs, polygons, overwrite, inputs)
    check_polygon_settings(min_area, simplify)
    for profile in profiles:
        _check_scene(b, profile, allow_no_crs=allow_no_crs, polygons=polygons)
    _compare_scenes(b, profiles, strict=strict)
    layouts = region.layouts(profiles)
    # the grids the windows lie on; no window need be larger than the one that holds them
    step = _model_step(b)
    sizes = _piece_sizes(layouts, step)
    whole = covering(sizes, step)
    if win > whole:
        log.info(
            "window %d px is larger than the scene%s: predicting with %d px, which holds %s whole",
            win, "s" if len(profiles) > 1 else "", whole, "each" if len(profiles) > 1 else "it",
        )  # fmt: skip
        win = whole
        if overlap is not None and overlap >= win:
            overlap = win // 2  # one window a scene: no neighbour to overlap
    ovl = overlap if overlap is not None else default_overlap(b, win) if win else 0
    blend = (
        resolve_blend(blend, b.contract.receptive_field, ovl, holds=win >= whole) if win else blend
    )
    if win and win < whole:
        _warn_overlap(b, win, ovl, overlap is not None)
    opts = PredictOptions(
        window=win, overlap=ovl, block=block, blend=blend, batch_size=batch_size,
        device=device, precision=precision, probabilities=probabilities,
        composite=composite, resampling=resampling, tta=tta, overlap_from=str(source),
    )  # fmt: skip
    _look_up_epsg([lay.target for lay in layouts if lay.target.crs is not None])
    plans: list[_Plan] = []
    with contextlib.ExitStack() as locks:
        locks.enter_context(folders_for(*outs, *(polygon_outs or [])))
        try:
            return _run(
                b, bundle, plans, layouts, outs, polygon_outs, locks, opts,
                polygon_settings=(min_area, simplify), client=client, workers=workers,
                scheduler=scheduler, overwrite=overwrite, auto=auto, sizes=sizes,
            )  # fmt: skip
        except KeyboardInterrupt:
            raise Interrupted(_progress_note(plans)) from None
        finally:  # still holding the locks
            for out in outs:  # a run that finished no block leaves no part folder behind
                parts = _parts_of(out)
                done = [*parts.glob("*.done"), *parts.glob("scene_*/*.done")]
                if parts.exists() and not done:
                    remove_parts(parts)


@dataclass(frozen=True)
class _Layout:
    """Where one class map lies: its scenes, its grid, and the area (WKB, in the grid's CRS)
    outside which it is nodata."""

    scenes: list[SceneProfile]
    target: Grid
    area: bytes | None
    mosaic: bool


@dataclass(frozen=True)
class _Region:
    """What the user asked of the map's extent and grid, checked before any work."""

    mosaic: bool
    within: str | None
    bounds: Any
    crs: Any
    resolution: tuple[float, float] | None

    @classmethod
    def check(cls, mosaic: bool, within: Any, bounds: Any, crs: Any, resolution: Any) -> _Region:
        if within is not None and bounds is not None:
            raise ConfigError(
                f"give {option('--within', None)} or {option('--bounds', None)}, not both"
            )
        if not mosaic and (crs is not None or resolution is not None):
            raise ConfigError(
                f"{option('--crs', None)} and {option('--resolution', None)} set the grid of a "
                f"mosaic; add {option('--mosaic')}, or reproject the scene first"
            )
        area = resolve_path(within) if within is not None else None
        return cls(mosaic, area, parse_bounds(bounds), parse_crs(crs), parse_resolution(resolution))

    def _area(self, crs: Any) -> Any:
        return area_geometry(self.within, self.bounds, crs)

    def layouts(self, profiles: list[SceneProfile]) -> list[_Layout]:
        if not self.mosaic:
            areas: dict[Any, bytes | None] = {}  # the area read once per CRS, not per scene
            out = []
            for p in profiles:
                if p.crs not in areas:
                    geom = self._area(p.crs) if (self.within or self.bounds) else None
                    areas[p.crs] = None if geom is None else geom.wkb
                out.append(_Layout([p], p.grid, areas[p.crs], False))
            return out
        import shapely

        first_crs = self.crs or profiles[0].crs
        geom = self._area(first_crs) if first_crs is not None else None
        extent = None if geom is None else rasterio.coords.BoundingBox(*geom.bounds)
        grid = mosaic_grid(profiles, crs=self.crs, resolution=self.resolution, extent=extent)
        if geom is not None and shapely.equals(geom, shapely.box(*geom.bounds)):
            geom = None  # a box is the grid's extent already: no mask needed
        return [_Layout(profiles, grid, None if geom is None else geom.wkb, True)]


def _mosaic_output(output: Path) -> Path:
    if output.is_dir() or output.suffix.lower() not in (".tif", ".tiff"):
        raise ConfigError(
            f"a mosaic is one class map: -o needs a .tif file name, not {str(output)!r}"
        )
    return output


def _for_one_scene(
    many: Callable[Concatenate[Any, Sequence[Any], Any, _P], list[PredictResult]],
) -> Callable[Concatenate[Any, Any, Any, _P], PredictResult]:
    """``predict_scenes`` for one scene, with the same options (one signature, not two)."""

    def predict_scene(
        bundle: str | os.PathLike[str],
        scene: str | os.PathLike[str],
        output: str | os.PathLike[str],
        /,
        *args: _P.args,
        **kwargs: _P.kwargs,
    ) -> PredictResult:
        return many(bundle, [scene], output, *args, **kwargs)[0]

    params = list(inspect.signature(many).parameters.values())
    params[1] = params[1].replace(name="scene", annotation="str | os.PathLike[str]")
    predict_scene.__signature__ = inspect.signature(many).replace(  # type: ignore[attr-defined]
        parameters=params, return_annotation="PredictResult"
    )
    predict_scene.__doc__ = """Predict ``scene`` with ``bundle`` and write the class map to
    ``output`` (a COG); the options are those of :func:`predict_scenes`."""
    return predict_scene


predict_scene = _for_one_scene(predict_scenes)


def _progress_note(plans: list[_Plan]) -> str:
    """What an interrupted run leaves: the blocks done per class map, and how to go on."""
    done = [
        (p, sum(part_done(p.parts, c, p.probabilities) for c in p.cores))
        for p in plans
        if p.parts.exists()
    ]
    if not any(n for _, n in done):
        return "no block was finished"
    counts = ", ".join(f"{n} of {len(p.cores)} blocks of {p.out}" for p, n in done)
    return f"{counts} are done; {again()} run again computes only the others"


def _run(
    b: Bundle,
    bundle: str | os.PathLike[str],
    plans: list[_Plan],
    layouts: list[_Layout],
    outs: list[Path],
    polygon_outs: list[Path] | None,
    locks: contextlib.ExitStack,
    opts: PredictOptions,
    *,
    polygon_settings: tuple[float, float],
    client: Any,
    workers: int | None,
    scheduler: str | None,
    overwrite: bool,
    auto: _Auto | None = None,
    sizes: list[tuple[int, int]],
) -> list[PredictResult]:
    """Plan the blocks of every scene (``plans`` is filled as they are made), run them and
    assemble the outputs. ``sizes``: those of the grids the windows lie on."""
    for layout, out in zip(layouts, outs):
        _check_touching(layout, out)
        _lock_parts(out, locks)  # before any cluster starts: a second run is refused at once
    # one connection to a running cluster serves both counting its workers and the run
    address = scheduler_address(scheduler, workers)
    client = chosen_client(client, workers, address)
    opened = connect(address) if client is None and address else contextlib.nullcontext(client)
    with opened as remote:
        t0 = time.perf_counter()
        gpu = opts.device != "cpu"
        small = sum(lay.target.height * lay.target.width for lay in layouts) <= IN_PROCESS_PX
        where = (
            session(client=remote)
            if remote is not None
            else session(workers, scheduler, gpu=gpu, small=small)
        )
        with where as client:
            t_start = time.perf_counter() - t0
            bundle_path = str(Path(bundle).resolve())
            if opts.device != "cuda" and resolve_device(opts.device) == "cpu":
                share_bundle(bundle_path, b)  # a worker in this process takes it as it is
            resources = task_resources(client, opts.device, blocks=True)
            if auto is not None:
                opts = _auto_window(
                    client, b, bundle_path, sizes, outs, opts, auto, resources, overwrite
                )
            win, ovl, blend, probabilities = (
                opts.window,
                opts.overlap,
                opts.blend,
                opts.probabilities,
            )
            whole = covering(sizes, _model_step(b))
            targets = [lay.target for lay in layouts]
            opts = replace(opts, block=opts.block or default_block(targets, workers, client))
            settings = opts.run_settings(b.hash)
            for layout, out in zip(layouts, outs):
                plans.append(
                    _plan(layout, out, settings, opts, step=_model_step(b), overwrite=overwrite)
                )
            # a mosaic's scenes' blocks, predicted first and composited after
            shares = [s for p in plans for s in p.shares or []]
            jobs = [s.job(c) for s in shares for c in s.todo]
            jobs += [p.job(c) for p in plans if p.shares is None for c in p.todo]
            # blocks with the most windows first (Dask starts tasks in the order they came): the
            # last to run are then the shortest, and the workers finish together. In the order of
            # the scene, a 2048 px scene's four blocks of 4, 6, 6 and 9 windows left one worker 15
            # windows and the other 10.
            jobs.sort(key=lambda j: -len(j.grid.windows_for(j.core)))
            for p in plans:
                resumed = len(p.cores) - len(p.todo)
                log.info(
                    "predict %s%s: %dx%d px, %d blocks of %d px%s, window %d, overlap %d%s "
                    "(%d windows), blend %s",
                    p.name,
                    f" ({len(p.scenes)} scenes, {sum(len(s.todo) for s in p.shares)} scene "
                    f"blocks to predict, composite {opts.composite})"
                    if p.shares is not None
                    else "",
                    p.target.width,
                    p.target.height,
                    len(p.cores),
                    settings["block"],
                    f" ({resumed} already done, resuming)" if resumed else "",
                    win,
                    ovl,
                    _overlap_note(b, win, ovl, opts.overlap_from, win >= whole),
                    p.n_windows,
                    blend,
                )
            _log_dashboard(client)
            options: dict[str, Any] = {
                "batch_size": opts.batch_size,
                "device": opts.device,
                "precision": opts.precision,
                "tta": opts.tta,
            }
            # a mosaic's scenes need their probabilities to composite (unless the first or
            # last wins, and none are asked for)
            voting = probabilities or (
                bool(shares) and opts.composite in ("mean", "max-confidence")
            )
            composites = [
                p.composite_job(c, tuple(int(i) for i in b.class_ids))
                for p in plans
                if p.shares is not None
                for c in p.todo
            ]
            if blend == "trim":
                # each mosaic block composites as soon as the scene blocks under it are done
                results: list[BlockResult] = run_tasks(
                    client,
                    predict_block,
                    jobs,
                    "predict",
                    bundle_path,
                    blend=blend,
                    probabilities=voting,
                    pixels=[int(j.core.width * j.core.height) for j in jobs],
                    resources=resources,
                    paced=True,
                    then=FollowUp(
                        composite_block,
                        composites,
                        _composite_needs(composites, jobs),
                        pixels=[int(j.core.width * j.core.height) for j in composites],
                    ),
                    **options,
                )
            else:
                results = _run_shared_windows(
                    client,
                    shares or plans,
                    bundle_path,
                    blend,
                    voting,
                    options,
                    resources,
                )
                if composites:
                    results += run_tasks(
                        client,
                        composite_block,
                        composites,
                        "composite",
                        pixels=[int(j.core.width * j.core.height) for j in composites],
                        cpu_only=True,
                    )
            t_blocks = time.perf_counter() - t0
            done = []
            for i, p in enumerate(plans):
                t1 = time.perf_counter()
                mine = [r for r in results if Path(r.path).parent in p.folders]
                ids = scene_ids(p.scenes)
                made = {**settings, "precision": _precision_used(mine, opts.precision)}
                if len(p.scenes) == 1:
                    made.pop("composite")
                tags = provenance_tags(made, ids)
                valid = assemble_class_map(
                    p.parts, p.cores, p.target, b, p.out, overwrite=overwrite, tags=tags
                )
                prob_path = None
                if probabilities:
                    prob_path = probabilities_path(p.out)
                    assemble_probabilities(
                        p.parts, p.cores, p.target, b, prob_path, overwrite=overwrite, tags=tags
                    )
                item = stac_item(
                    p.out,
                    p.target,
                    b.classes,
                    {**made, "scenes": ids},
                    [h for sc in p.scenes for h in (sc.files if not sc.by_name else [sc.path])],
                    probabilities=prob_path,
                    datetimes=[d for sc in p.scenes for d in [sc.datetime] if d],
                )
                write_item(item_path(p.out), item, overwrite)
                remove_parts(p.parts)
                t_assemble = time.perf_counter() - t1
                poly_path = polygon_outs[i] if polygon_outs else None
                if poly_path is not None:
                    vectorize(
                        p.out,
                        poly_path,
                        min_area=polygon_settings[0],
                        simplify=polygon_settings[1],
                        client=client,
                        overwrite=overwrite,
                    )
                done.append(
                    PredictResult(
                        path=p.out,
                        window=win,
                        batch_size=opts.batch_size,
                        blocks=len(p.cores),
                        resumed=len(p.cores) - len(p.todo),
                        windows_run=sum(r.windows_run for r in mine),
                        windows_skipped=sum(r.windows_skipped for r in mine),
                        valid_pixels=valid,
                        probabilities=prob_path,
                        polygons=poly_path,
                        seconds={
                            "start": t_start,
                            "blocks": t_blocks,
                            "tasks": sum(r.seconds for r in mine),
                            "assemble": t_assemble,
                        },
                    )
                )
        return done


def _run_shared_windows(
    client: Any,
    plans: Sequence[_Plan | _Share],
    bundle_path: str,
    blend: str,
    probabilities: bool,
    options: dict[str, Any],
    resources: dict[str, float] | None,
) -> list[BlockResult]:
    """Weighted blending with every window run once: each block runs the windows it owns and
    sums their weighted probabilities (:func:`accumulate_block`); each unfinished block then
    adds up the pieces of those sums that fall on its core (:func:`finish_block`). Blocks
    finished by an earlier run are accumulated again only where a neighbour needs them."""
    from distributed import as_completed

    finals: list[Any] = []
    counted: list[tuple[int | None, list[Any]]] = []  # per scene: first result, window counts
    for p in plans:
        reach, sources = _sources(p.grid, p.cores, p.todo)
        by_key = {(int(c.row_off), int(c.col_off)): c for c in p.cores}
        # submitted in the order the finished blocks need them, so that Dask (which runs
        # earlier submissions first) keeps a front of about two block rows in memory
        futures: dict[tuple[int, int], Any] = {}
        first = len(finals) if p.todo else None
        for t in p.todo:
            key = (int(t.row_off), int(t.col_off))
            for k in sources[key]:
                if k not in futures:
                    futures[k] = client.submit(
                        AsCaller(accumulate_block),
                        p.job(by_key[k]),
                        bundle_path,
                        [x for x in p.todo if _touches(reach[k], x)],
                        blend=blend,
                        pure=False,
                        resources=resources,
                        **options,
                    )
            pieces = [client.submit(take_piece, futures[k], key, pure=False) for k in sources[key]]
            finals.append(
                client.submit(
                    finish_block,
                    p.job(t),
                    bundle_path,
                    *pieces,
                    probabilities=probabilities,
                    device=options["device"],
                    pure=False,
                )
            )
        counted.append((first, [client.submit(_counts, f, pure=False) for f in futures.values()]))
        del futures  # each block's sums are freed once its pieces have been taken
    index = {f.key: i for i, f in enumerate(finals)}
    jobs = [j for p in plans for j in p.todo]
    results: list[BlockResult] = [None] * len(finals)  # type: ignore[list-item]
    with Progress("predict", len(finals)) as progress:
        for fut in as_completed(finals, loop=client.loop):
            i = index[fut.key]
            r = results[i] = task_result(fut, "predict", jobs[i])
            progress.update(pixels=int(r.core.width * r.core.height))
    # windows are counted where they ran: each scene's accumulations go to its first result
    for first, futs in counted:
        counts = client.gather(futs)
        if first is not None and counts:
            r = results[first]
            results[first] = BlockResult(
                r.core,
                r.path,
                sum(c[0] for c in counts),
                sum(c[1] for c in counts),
                r.seconds + sum(c[2] for c in counts),
            )
    return results


def _composite_needs(composites: list[CompositeJob], jobs: list[BlockJob]) -> list[set[int]]:
    """For each mosaic block, the scene blocks of this run (indexes into ``jobs``) whose parts
    it composites; those an earlier run finished are not waited for."""
    where = {(j.parts, int(j.core.row_off), int(j.core.col_off)): i for i, j in enumerate(jobs)}
    return [
        {
            where[key]
            for src in c.sources
            for core in src.cores
            if (key := (src.folder, int(core.row_off), int(core.col_off))) in where
        }
        for c in composites
    ]


def _touches(a: Window | None, b: Window) -> bool:
    return a is not None and windows_intersect(a, b)


def _sources(
    grid: WindowGrid, cores: list[Window], todo: list[Window]
) -> tuple[dict[tuple[int, int], Window | None], dict[tuple[int, int], list[tuple[int, int]]]]:
    """For every block, the area its owned windows cover (``reach``); for every block to
    finish, the blocks whose reach falls on its core (``sources``), keyed by core offsets."""
    reach: dict[tuple[int, int], Window | None] = {}
    for c in cores:
        owned = grid.owned_windows(c)
        reach[(int(c.row_off), int(c.col_off))] = grid.extent(owned) if owned else None
    row_offs = sorted({k[0] for k in reach})
    col_offs = sorted({k[1] for k in reach})
    span = grid.window + max(max(int(c.height), int(c.width)) for c in cores)
    sources = {}
    for t in todo:
        r0, c0 = int(t.row_off), int(t.col_off)
        rows = row_offs[bisect_left(row_offs, r0 - span) : bisect_right(row_offs, r0 + span)]
        cols = col_offs[bisect_left(col_offs, c0 - span) : bisect_right(col_offs, c0 + span)]
        sources[(r0, c0)] = [(r, c) for r in rows for c in cols if _touches(reach[(r, c)], t)]
    return reach, sources


def _counts(acc: Accumulated) -> tuple[int, int, float]:
    return acc.windows_run, acc.windows_skipped, acc.seconds


def probabilities_path(class_map: Path) -> Path:
    return class_map.with_name(f"{class_map.stem}_probabilities{class_map.suffix}")


def _polygon_outputs(
    outs: list[Path],
    polygons: str | os.PathLike[str] | None,
    overwrite: bool,
    inputs: Sequence[str],
) -> list[Path] | None:
    """The polygon file of each class map, checked before any work starts."""
    if polygons is None:
        return None
    p = Path(polygons)
    if len(outs) > 1:
        if p.suffix.lower() in FORMATS or (p.exists() and not p.is_dir()):
            raise ConfigError(
                f"{len(outs)} scenes need a folder for {option('--polygons', None)}, not the file "
                f"{str(p)!r}"
            )
        paths = [p / f"{o.stem}.gpkg" for o in outs]
    else:
        output_format(p)
        paths = [p]
    for path in paths:
        check_output(path, overwrite, inputs=inputs, what="polygons")
    return paths


def _outputs(profiles: Sequence[SceneProfile], output: Path) -> list[Path]:
    if len(profiles) == 1:
        return [output]
    if output.suffix.lower() in (".tif", ".tiff") or (output.exists() and not output.is_dir()):
        raise ConfigError(
            f"{len(profiles)} scenes need an output folder, not the file {str(output)!r}; pass "
            f"-o DIR, or {option('--mosaic')} for one map of them all"
        )
    names = [p.name for p in profiles]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"scenes share the names {dupes}; predict them into separate folders")
    return [output / f"{n}.tif" for n in names]


def _check_scene(b: Bundle, profile: SceneProfile, *, allow_no_crs: bool, polygons: Any) -> None:
    """Refuse a scene the bundle cannot read (no CRS, bands missing)."""
    if profile.crs is None:
        if not allow_no_crs:
            raise NoCRSError(
                f"scene {profile.path!r} has no CRS, so its class map could not be placed on a "
                f"map; assign one (gdal_edit.py -a_srs) or pass {option('--allow-no-crs')}",
                filename=profile.path,
            )
        if polygons is not None:
            raise NoCRSError(
                f"scene {profile.path!r} has no CRS, and polygons need one (GeoJSON is WGS84 "
                "lon/lat, the other formats carry the CRS): assign one (gdal_edit.py -a_srs) or "
                f"drop {option('--polygons', None)}",
                filename=profile.path,
            )
    b.check_scene(profile)


def _compare_scenes(b: Bundle, profiles: list[SceneProfile], *, strict: bool) -> None:
    """Warn (refuse with ``strict``) for each scene that differs from the training scene in
    scale, pixel size or CRS (:func:`compare_scene`), before any work: a scene that cannot be
    read is found here too. The scenes' samples are read in threads (GDAL reads outside the
    GIL): one at a time, 16 crops of 4096² px took 2.1 s before the first block ran, 13 % of
    their mosaic's time. Many scenes are sampled more thinly, about 32 windows in all (16
    each for one or two scenes, 4 each for four, the centre only from 16 on): 16 crops of
    1120² px took 2.2 s at 16 windows each, 14 % of their mosaic's time, and 1.0 s at 4 each
    (each 128 px window decodes a whole internal tile of every band)."""
    from concurrent.futures import ThreadPoolExecutor

    samples = max(1, min(16, 32 // len(profiles)))
    with ThreadPoolExecutor(min(8, len(profiles))) as pool:
        found = list(pool.map(lambda p: compare_scene(b, p, samples=samples), profiles))
    for profile, problems in zip(profiles, found):
        for line in problems:
            if strict:
                raise BandMismatchError(f"{line} ({option('--strict')})", filename=profile.path)
            warnings.warn(f"{line}; pass {option('--strict')} to refuse such scenes", stacklevel=3)


def _look_up_epsg(grids: list[Grid]) -> None:
    """The EPSG codes of the maps' CRSs, looked up in a thread beside the run for their STAC
    items (:func:`epsg_code` keeps them, across runs too: GDAL's lookup holds the GIL, so a
    thread hides it only where the run waits elsewhere). A failure here is left for the item
    to meet and report."""

    def look() -> None:
        for g in grids:
            with contextlib.suppress(Exception):
                epsg_code(g.crs)

    threading.Thread(target=look, name="geoseg-epsg", daemon=True).start()


def _overlap_asked(b: Bundle, overlap: int | str | None) -> int | None:
    """``overlap`` as px: ``"exact"`` (or None) leaves it to the receptive field (None);
    ``"effective"`` is the bundle's measured effective overlap."""
    if overlap is None or overlap == "exact":
        return None
    if overlap == "effective":
        if b.contract.effective_overlap is None:
            raise ConfigError(
                f"{option('--overlap', 'effective')}: this bundle has no measured effective "
                "overlap (trained before geoseg measured it, on a scene too small to hold a "
                "window edge, or no overlap below half its window was enough); use "
                f"{option('--overlap', 'exact')} or a number of pixels"
            )
        return b.contract.effective_overlap
    if isinstance(overlap, str):
        try:
            return int(overlap)
        except ValueError:
            raise ConfigError(
                f"{option('--overlap', None)} must be a number of pixels, exact or effective, "
                f"got {overlap!r}"
            ) from None
    return overlap


def _warn_overlap(b: Bundle, window: int, overlap: int, given: bool) -> None:
    """Warn when windows overlap by less than the model needs: its measured effective overlap,
    else its receptive field. Pixels near window edges then see less context than in training,
    and faint seams can show."""
    rf = b.contract.receptive_field
    effective = b.contract.effective_overlap
    if effective is not None and overlap >= effective:
        return
    if rf is None or overlap >= rf:
        return
    fix = (
        f"leave {option('--overlap', None)} at its default or pass {option('--overlap', rf + rf % 2)}"
        if given
        else f"use {option('--window', max(2 * (rf + rf % 2), window))} or more"
    )
    warnings.warn(
        f"overlap {overlap} px is less than the model's receptive field ({rf} px), so the map "
        f"can show faint seams along window edges; {fix}",
        stacklevel=3,
    )


def _overlap_note(b: Bundle, window: int, overlap: int, source: str, holds: bool) -> str:
    """Where the overlap came from (``source``: exact, effective or given) when it is not
    plainly the bundle's, and the other overlaps the bundle offers, for the plan line."""
    if holds:
        return " (a window holds each scene whole: no seams to hide)"
    effective = b.contract.effective_overlap
    exact = default_overlap(b, window)
    if source == "given":
        return f" (as given; exact {exact}" + (
            f", effective {effective})" if effective is not None else ")"
        )
    if source == "effective":
        return f" (effective, measured at training; exact {exact})"
    note = _exact_note(b, window, overlap)
    return note + (
        f" (effective {effective}: --overlap effective)" if effective is not None else ""
    )


def _exact_note(b: Bundle, window: int, overlap: int) -> str:
    """Why the overlap differs from the bundle's."""
    if overlap == b.overlap:
        return ""
    step = _model_step(b)
    capped = min(b.overlap, window // 2)
    if overlap != capped and step > 1:
        return (
            f" (the bundle's {b.overlap}"
            + (f", capped at half the window to {capped}" if capped != b.overlap else "")
            + f", raised so the stride is a multiple of the model's stride {step})"
        )
    if capped != b.overlap and overlap == capped:
        return f" (the bundle's {b.overlap}, capped at half the window)"
    return ""


def _plan(
    layout: _Layout,
    out: Path,
    settings: dict[str, Any],
    opts: PredictOptions,
    *,
    step: int,
    overwrite: bool,
) -> _Plan:
    """The blocks of one class map; for a mosaic of several scenes, also each scene's share
    of the grid (its windows anchored on its footprint, rounded down to ``step``, the model's
    stride) and its blocks there."""
    import shapely

    probabilities = bool(settings["probabilities"])
    target = layout.target
    trim = settings["blend"] == "trim"
    grid = WindowGrid(target.height, target.width, settings["window"], settings["overlap"], trim)
    feet = [footprint(sc, target) for sc in layout.scenes] if layout.mosaic else None
    area = None if layout.area is None else shapely.from_wkb(layout.area)

    def in_area(c: Window, on: Grid) -> bool:
        return area is None or area.intersects(
            shapely.box(*rasterio.windows.bounds(c, on.transform))
        )

    several = feet is not None and len(feet) > 1
    blocks = (
        block_windows(target.height, target.width, settings["block"])
        if several
        else grid.blocks(settings["block"])
    )
    cores, touching = [], {}
    for c in blocks:
        if not in_area(c, target):
            continue
        hits = (
            tuple(i for i, f in enumerate(feet) if f is not None and windows_intersect(c, f))
            if feet is not None
            else (0,)
        )
        if hits:
            cores.append(c)
            touching[(int(c.row_off), int(c.col_off))] = hits
    if not cores:
        _nothing_touches(area is not None, out)
    run = {
        **settings,
        "scenes": [sc.path for sc in layout.scenes],
        "scene_stamp": [_stamp(f) for sc in layout.scenes for f in sc.files],
        # the CRS as WKT: str() of a CRS without an EPSG code asks PROJ to identify it (55-63
        # ms, holding the GIL, for the NC scene's), on every run
        "grid": [target.crs.to_wkt() if target.crs else None, list(target.transform)[:6],
                 target.width, target.height],
        "area": None if layout.area is None else hashlib.sha256(layout.area).hexdigest(),
        "mask": [[sc.mask.path, sc.mask.band, list(sc.mask_values)] for sc in layout.scenes
                 if sc.mask is not None],
        "shares": step if several else None,
    }  # fmt: skip
    parts = _parts_folder(out, run, overwrite)
    todo = [c for c in cores if not part_done(parts, c, probabilities)]
    damaged = sum((parts / part_name(c)).exists() for c in todo)  # written, but not whole
    shares = None
    if several:
        assert feet is not None
        voting = probabilities or settings["composite"] in ("mean", "max-confidence")
        shares = []
        for i, f in enumerate(feet):
            on = _anchored(f, step) if f is not None else Window(0, 0, 0, 0)
            sub = Grid(
                target.crs, rasterio.windows.transform(on, target.transform),
                int(on.width), int(on.height),
            )  # fmt: skip
            sgrid = WindowGrid(sub.height, sub.width, grid.window, grid.overlap, trim)
            offset = (int(on.row_off), int(on.col_off))
            mine = [c for c in sgrid.blocks(settings["block"]) if in_area(c, sub)] if f else []
            needed = [
                c for c in mine if any(windows_intersect(_shifted(c, offset), t) for t in todo)
            ]
            folder = parts / f"scene_{i:04d}"
            folder.mkdir(exist_ok=True)
            left = [c for c in needed if not part_done(folder, c, voting)]
            damaged += sum((folder / part_name(c)).exists() for c in left)
            shares.append(
                _Share(i, offset, sub, sgrid, mine, left, folder, layout.scenes[i],
                       opts.resampling, layout.area)
            )  # fmt: skip
    if damaged:
        log.warning(
            "%d part file(s) of %s were incomplete or damaged; computing those blocks again",
            damaged,
            out,
        )
    return _Plan(
        list(layout.scenes), target, out, grid, cores, touching, parts, todo, probabilities,
        opts, layout.area, shares,
    )  # fmt: skip


def _nothing_touches(has_area: bool, out: Path) -> None:
    what = "the area" if has_area else "the map's extent"
    raise ConfigError(
        f"no scene touches {what} of {str(out)!r}; check {option('--within', None)} / "
        f"{option('--bounds', None)} (in the output CRS) against the scenes' footprints"
    )


def _check_touching(layout: _Layout, out: Path) -> None:
    """Refuse, before any cluster starts, a map that no scene touches (the blocks are then
    planned with the same test)."""
    import shapely

    t = layout.target
    area = None if layout.area is None else shapely.from_wkb(layout.area)
    feet = (
        [footprint(sc, t) for sc in layout.scenes]
        if layout.mosaic
        else [Window(0, 0, t.width, t.height)]
    )
    boxes = [shapely.box(*rasterio.windows.bounds(f, t.transform)) for f in feet if f is not None]
    if not boxes or (area is not None and not any(area.intersects(bx) for bx in boxes)):
        _nothing_touches(area is not None, out)


def _anchored(foot: Window, step: int) -> Window:
    """``foot`` grown up and left to the nearest multiple of ``step``: a scene's windows start
    there, so a downsampling model sees its pixels at the phase it would on the mosaic's grid."""
    r0 = int(foot.row_off) // step * step
    c0 = int(foot.col_off) // step * step
    return Window(c0, r0, int(foot.col_off + foot.width) - c0, int(foot.row_off + foot.height) - r0)


def _precision_used(results: Sequence[BlockResult], asked: str) -> str:
    used = sorted({r.precision for r in results if r.precision})
    return ",".join(used) if used else asked


IN_PROCESS_PX = 4096 * 4096
"""Scenes of at most this many pixels (all scenes of a call together) run in the calling process
when no cluster is given (:func:`geoseg.cluster.session`, ``small``). Measured on 2 cores with the
default U-Net: a 4096² scene ran as fast in this process (0.98 of the model alone) as on 2
worker processes (1.01, starting them included), a 2048² scene at 0.73-0.90 against 0.52."""


def default_block(
    profiles: Sequence[SceneProfile | Grid], workers: int | None, scheduler: str | Any | None
) -> int:
    """2048 px, or less where a scene is small, so that every worker
    thread gets at least two blocks of it (a multiple of 256, at least 256). The worker threads
    of a connected client (``scheduler``), or the workers at a scheduler's address, are
    counted."""
    if scheduler is not None and not isinstance(scheduler, str):
        n = max(1, sum(int(w.get("nthreads", 1)) for w in workers_info(scheduler).values()))
    else:
        address = scheduler_address(scheduler, workers)
        n = max(1, count_workers(address)) if address else (workers or default_workers())
    largest = max(p.height * p.width for p in profiles)
    side = (largest / (2 * n)) ** 0.5
    return int(min(2048, max(256, -(-side // 256) * 256)))


def _model_step(bundle: Bundle) -> int:
    """The model's own stride (its pooling grid), px."""
    return int(getattr(bundle.model, "stride", 1))


def default_overlap(bundle: Bundle, window: int) -> int:
    """The bundle's overlap, capped at half of ``window``, then raised so the stride between
    windows is a multiple of the model's own stride: every window then sees each pixel at the
    same offset of the model's pooling grid."""
    ovl = min(bundle.overlap, window // 2)
    step = _model_step(bundle)
    stride = (window - ovl) // step * step
    return window - stride if stride > 0 else ovl


def _stamp(path: str) -> list[float]:
    if is_url(path):
        return []
    st = os.stat(path)
    return [st.st_size, st.st_mtime]


def _lock_parts(out: Path, locks: contextlib.ExitStack) -> Path:
    """The folder of block parts beside ``out``, locked for this run: a second run on the
    same output is refused, naming this one."""
    parts = _parts_of(out)
    locks.enter_context(exclusive(parts / "lock", f"output {str(out)!r}"))
    return parts


def _parts_of(out: Path) -> Path:
    return (out.parent / f".{out.name}.parts").resolve()


def _parts_folder(out: Path, settings: dict[str, Any], overwrite: bool) -> Path:
    """The folder of block parts beside ``out`` (locked by :func:`_lock_parts`): kept from a
    stopped run with the same settings, else, and always with ``overwrite``, started afresh."""
    parts = _parts_of(out)
    record = parts / "run.json"
    try:
        same = json.loads(record.read_text()) == settings
    except (OSError, ValueError):
        same = False
    if not same or overwrite:
        if any(parts.glob("block_*")):
            log.info(
                "%s: starting %s afresh",
                "--overwrite" if same else "settings differ from the stopped run's",
                out.name,
            )
        remove_parts(parts, keep_lock=True)
        tmp = record.with_name(record.name + ".tmp")
        tmp.write_text(json.dumps(settings))
        os.replace(tmp, record)
    return parts


# the files geoseg writes into a parts folder; nothing else there is ever removed
_PART_FILES = ("block_*", "scene_*/block_*", "run.json", "run.json.tmp", "assembled*")


def remove_parts(parts: Path, *, keep_lock: bool = False) -> None:
    """Remove geoseg's files from a parts folder (a mosaic's scenes' parts are in a folder
    each), and the folders if that empties them."""
    for pattern in (*_PART_FILES, *(() if keep_lock else ("lock",))):
        for f in parts.glob(pattern):
            f.unlink(missing_ok=True)
    remove_empty(sorted(parts.glob("scene_*")))
    if not keep_lock:
        remove_empty([parts])


def _log_dashboard(client: Any) -> None:
    link = dashboard_link(client)
    if link:
        log.info("Dask dashboard: %s", link)


def _assemble(
    parts: Path,
    cores: list[Any],
    profile: Grid,
    output: Path,
    *,
    overwrite: bool,
    count: int,
    suffix: str,
    resampling: str,
    describe: Callable[[Any], None],
) -> int:
    """Copy the ``suffix`` parts of every block, block by block, into one tiled GeoTIFF, then
    write it as a COG at ``output``; return the number of valid pixels (band 1 not nodata)."""
    staging = parts / f"assembled{suffix}"
    valid = 0
    with rasterio.open(
        staging,
        "w",
        driver="GTiff",
        width=profile.width,
        height=profile.height,
        count=count,
        dtype="uint8",
        nodata=NODATA,
        crs=profile.crs,
        transform=profile.transform,
        tiled=True,
        blockxsize=512,
        blockysize=512,
        interleave="band",
    ) as dst:
        # colour table and tags first: GDAL cannot change the photometric tag of a GeoTIFF
        # whose blocks it has begun to write ("Cannot modify tag ... while writing")
        describe(dst)
        for core in cores:
            with rasterio.open(parts / Path(part_name(core)).with_suffix(suffix)) as src:
                data = src.read()
            dst.write(data, window=core)
            valid += int(np.count_nonzero(data[0] != NODATA))
    with atomic_output(output, overwrite) as tmp:
        rasterio.shutil.copy(
            staging,
            tmp,
            driver="COG",
            COMPRESS="DEFLATE",
            BLOCKSIZE=512,
            OVERVIEW_RESAMPLING=resampling,
            OVERVIEWS="AUTO",
        )
    return valid


def assemble_class_map(
    parts: Path,
    cores: list[Any],
    profile: Grid,
    bundle: Bundle,
    output: Path,
    *,
    overwrite: bool,
    tags: dict[str, str] | None = None,
) -> int:
    """The class map COG from the block parts (mode-resampled overviews, colour table, class
    names); returns the number of valid (predicted) pixels."""

    def describe(dst: Any) -> None:
        write_class_metadata(dst, bundle.classes)
        dst.update_tags(
            **{**(tags or {}), "GEOSEG_BUNDLE_HASH": bundle.hash, GEOSEG_TAG: "class map"}
        )

    valid = _assemble(
        parts,
        cores,
        profile,
        output,
        overwrite=overwrite,
        count=1,
        suffix=".tif",
        resampling="MODE",
        describe=describe,
    )
    write_category_names(output, bundle.classes)  # for gdalinfo and QGIS
    return valid


def assemble_probabilities(
    parts: Path,
    cores: list[Any],
    profile: Grid,
    bundle: Bundle,
    output: Path,
    *,
    overwrite: bool,
    tags: dict[str, str] | None = None,
) -> None:
    """The probabilities COG from the block parts: a band per class, 0-254, nodata 255."""

    def describe(dst: Any) -> None:
        for i, c in enumerate(bundle.classes, start=1):
            dst.set_band_description(i, f"{c.name} (class {c.id}), probability x 254")
        dst.update_tags(
            **(tags or {}),
            GEOSEG_SCALE="probability = value / 254; 255 = nodata",
            **{GEOSEG_TAG: "probabilities"},
        )

    _assemble(
        parts,
        cores,
        profile,
        output,
        overwrite=overwrite,
        count=len(bundle.classes),
        suffix=".prob.tif",
        resampling="AVERAGE",
        describe=describe,
    )
