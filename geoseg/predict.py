"""Predicting a scene on a Dask cluster and assembling the class map (the graph stage).

One task per block (:func:`geoseg.inference.predict_block`); each writes its core to a part file
beside the output. The parts are then copied, block by block, into one tiled GeoTIFF and turned
into a Cloud-Optimized GeoTIFF with the bundle's colour table and class names, under a temporary
name that is renamed onto the output when complete.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import rasterio
import rasterio.shutil

from geoseg.blending import check_blend
from geoseg.bundle import Bundle, load_bundle
from geoseg.cluster import run_tasks, session
from geoseg.errors import ConfigError
from geoseg.inference import BlockResult, predict_block
from geoseg.io import (
    NODATA_CLASS,
    SceneProfile,
    atomic_output,
    check_output,
    is_url,
    read_profile,
    write_class_metadata,
)
from geoseg.tiling import WindowGrid, block_windows

log = logging.getLogger("geoseg")


@dataclass(frozen=True)
class PredictResult:
    """What :func:`predict_scene` wrote and how much work it was."""

    path: Path
    blocks: int
    windows_run: int
    windows_skipped: int
    valid_pixels: int


def predict_scene(
    bundle: str | os.PathLike[str],
    scene: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    window: int | None = None,
    overlap: int | None = None,
    block: int = 2048,
    batch_size: int = 8,
    blend: str = "gaussian",
    device: str = "auto",
    workers: int | None = None,
    scheduler: str | None = None,
    overwrite: bool = False,
) -> PredictResult:
    """Predict ``scene`` with ``bundle`` and write the class map to ``output`` (a COG).

    Parameters
    ----------
    bundle, scene, output
        Paths: the model bundle, the scene (a path or GDAL URL), the class map to write.
    window, overlap
        Model window and overlap in pixels; default to the bundle's.
    block
        Block size in pixels: the unit of scheduling and writing. Memory per task grows with it.
    batch_size
        Windows per forward pass.
    blend
        ``gaussian``, ``cosine`` or ``none``: how overlapping windows are weighted.
    device
        ``auto`` (a GPU when the worker has one), ``cpu`` or ``cuda``.
    workers, scheduler
        A local cluster of ``workers`` processes, or the address of an existing scheduler.
    overwrite
        Replace ``output`` if it exists.

    Raises
    ------
    BandMismatchError
        The scene's bands are not those the bundle was trained on.
    OutputExistsError
        ``output`` exists and ``overwrite`` is false.
    """
    out = check_output(output, overwrite)
    b = load_bundle(bundle)
    profile = read_profile(scene)
    b.check_scene(profile)
    check_blend(blend)
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
    win = window or b.window
    # the bundle's overlap, capped for a window smaller than the bundle's; a given one as given
    ovl = min(b.overlap, win // 2) if overlap is None else overlap
    grid = WindowGrid(profile.height, profile.width, win, ovl)
    cores = block_windows(profile.height, profile.width, block)
    plan = (
        "predict %s: %dx%d px, %d blocks of %d px, window %d, overlap %d (%d windows)",
        profile.path,
        profile.width,
        profile.height,
        len(cores),
        block,
        win,
        ovl,
        grid.n_windows,
    )
    parts = out.parent / f".{out.name}.parts"
    if parts.exists():
        shutil.rmtree(parts)
    parts.mkdir()
    try:
        with session(workers, scheduler) as client:
            log.info(*plan)
            results: list[BlockResult] = run_tasks(
                client,
                predict_block,
                cores,
                "predict",
                str(Path(bundle).resolve()),
                str(scene) if is_url(scene) else str(Path(scene).resolve()),
                grid,
                str(parts.resolve()),
                batch_size=batch_size,
                blend=blend,
                device=device,
            )
        assemble_class_map(results, profile, b, out, overwrite=overwrite)
    finally:
        shutil.rmtree(parts, ignore_errors=True)
    return PredictResult(
        path=out,
        blocks=len(results),
        windows_run=sum(r.windows_run for r in results),
        windows_skipped=sum(r.windows_skipped for r in results),
        valid_pixels=sum(r.valid_pixels for r in results),
    )


def assemble_class_map(
    parts: list[BlockResult],
    profile: SceneProfile,
    bundle: Bundle,
    output: Path,
    *,
    overwrite: bool,
) -> None:
    """Copy block parts into one tiled GeoTIFF, then write it as a COG at ``output``."""
    staging = Path(parts[0].path).parent / "assembled.tif"
    with rasterio.open(
        staging,
        "w",
        driver="GTiff",
        width=profile.width,
        height=profile.height,
        count=1,
        dtype="uint8",
        nodata=NODATA_CLASS,
        crs=profile.crs,
        transform=profile.transform,
        tiled=True,
        blockxsize=512,
        blockysize=512,
    ) as dst:
        for part in parts:
            with rasterio.open(part.path) as src:
                dst.write(src.read(1), 1, window=part.core)
        write_class_metadata(dst, bundle.classes)
        dst.update_tags(GEOSEG_BUNDLE_HASH=bundle.hash)
    with atomic_output(output, overwrite) as tmp:
        rasterio.shutil.copy(
            staging,
            tmp,
            driver="COG",
            COMPRESS="DEFLATE",
            BLOCKSIZE=512,
            OVERVIEW_RESAMPLING="MODE",
            OVERVIEWS="AUTO",
        )
