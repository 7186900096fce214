"""Predicting a scene on a Dask cluster and assembling the class map (the graph stage).

One task per block (:func:`geoseg.inference.predict_block`); each writes its core to a part file
in a folder beside the output, named for the block. The parts are then copied, block by block, into
one tiled GeoTIFF and turned into a Cloud-Optimized GeoTIFF with the bundle's colour table and class
names, under a temporary name that is renamed onto the output when complete.

A run that is stopped leaves its part files and a record of its settings; the same command run
again finds them, checks that the settings match, and computes only the blocks that are missing.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.shutil

from geoseg.blending import check_blend, resolve_blend
from geoseg.bundle import Bundle, load_bundle
from geoseg.cluster import run_tasks, session
from geoseg.errors import ConfigError, NotARasterError
from geoseg.inference import BlockResult, part_name, predict_block, resolve_precision
from geoseg.io import (
    NODATA_CLASS,
    SceneProfile,
    atomic_output,
    check_output,
    is_url,
    read_profile,
    write_class_metadata,
)
from geoseg.tiling import WindowGrid

log = logging.getLogger("geoseg")


@dataclass(frozen=True)
class PredictResult:
    """What :func:`predict_scene` wrote and how much work it was."""

    path: Path
    blocks: int
    resumed: int  # blocks found finished by an earlier, stopped run
    windows_run: int
    windows_skipped: int  # all-nodata windows, never sent to the model
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
    blend: str = "auto",
    device: str = "auto",
    precision: str = "auto",
    allow_no_crs: bool = False,
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
        Model window and overlap in pixels; default to the bundle's (the overlap from the model's
        receptive field, at most half the window).
    block
        Block size in pixels: the unit of scheduling, writing and resuming. Memory per task
        grows with it.
    batch_size
        Windows per forward pass.
    blend
        How overlapping windows are weighted: ``trim`` (each pixel from the window where it is
        farthest from an edge), ``gaussian``, ``cosine``, ``none`` (equal weights), or ``auto``:
        ``trim`` when the overlap covers the model's receptive field, else ``gaussian``.
    device
        ``auto`` (a GPU when the worker has one), ``cpu`` or ``cuda``.
    precision
        ``auto`` (bf16 where the hardware has it, else fp32 on a CPU, fp16 on an older GPU),
        ``fp32``, ``bf16`` or ``fp16`` (GPU only). Channels-last layout in every case.
    allow_no_crs
        Predict a scene without a CRS (the class map then has none either).
    workers, scheduler
        A local cluster of ``workers`` processes, or the address of an existing scheduler.
    overwrite
        Replace ``output`` if it exists.

    Returns
    -------
    PredictResult

    Raises
    ------
    BandMismatchError
        The scene's bands are not those the bundle was trained on.
    OutputExistsError
        ``output`` exists and ``overwrite`` is false.
    """
    out = check_output(output, overwrite)
    _check_writable(out.parent)
    b = load_bundle(bundle)
    profile = read_profile(scene)
    if profile.crs is None and not allow_no_crs:
        raise NotARasterError(
            f"scene {profile.path!r} has no CRS, so its class map could not be placed on a map; "
            "assign one (gdal_edit.py -a_srs) or pass --allow-no-crs"
        )
    b.check_scene(profile)
    check_blend(blend)
    if device == "cuda":
        from geoseg.inference import resolve_device

        resolve_device("cuda")  # fail here, not on every worker, when there is no GPU
    resolve_precision(precision, "cuda" if device == "cuda" else "cpu")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
    win = window or b.window
    ovl = overlap if overlap is not None else default_overlap(b, win)
    if not 0 <= ovl < win:
        raise ConfigError(f"overlap must be at least 0 and less than the window ({win}), got {ovl}")
    blend = resolve_blend(blend, b.contract.receptive_field, ovl)
    grid = WindowGrid(profile.height, profile.width, win, ovl, trim=blend == "trim")
    cores = grid.blocks(block)
    scene_path = str(scene) if is_url(scene) else str(Path(scene).resolve())
    settings = {
        "bundle": b.hash,
        "scene": scene_path,
        "scene_stamp": _stamp(scene_path),
        "window": win,
        "overlap": ovl,
        "block": block,
        "blend": blend,
        "precision": precision,
    }
    parts = _parts_folder(out, settings)
    todo = [c for c in cores if not (parts / part_name(c)).exists()]
    resumed = len(cores) - len(todo)
    with session(workers, scheduler) as client:
        log.info(
            "predict %s: %dx%d px, %d blocks of %d px%s, window %d, overlap %d (%d windows), blend %s",
            profile.path,
            profile.width,
            profile.height,
            len(cores),
            block,
            f" ({resumed} already done, resuming)" if resumed else "",
            win,
            ovl,
            grid.n_windows,
            blend,
        )
        _log_dashboard(client)
        results: list[BlockResult] = run_tasks(
            client,
            predict_block,
            todo,
            "predict",
            str(Path(bundle).resolve()),
            scene_path,
            grid,
            str(parts.resolve()),
            batch_size=batch_size,
            blend=blend,
            device=device,
            precision=precision,
            pixels=[int(c.width * c.height) for c in todo],
        )
    valid = assemble_class_map(parts, cores, profile, b, out, overwrite=overwrite)
    shutil.rmtree(parts, ignore_errors=True)
    return PredictResult(
        path=out,
        blocks=len(cores),
        resumed=resumed,
        windows_run=sum(r.windows_run for r in results),
        windows_skipped=sum(r.windows_skipped for r in results),
        valid_pixels=valid,
    )


def default_overlap(bundle: Bundle, window: int) -> int:
    """The bundle's overlap, capped at half of ``window``, then raised so the stride between
    windows is a multiple of the model's own stride: every window then sees each pixel at the
    same offset of the model's pooling grid."""
    ovl = min(bundle.overlap, window // 2)
    step = int(getattr(bundle.model, "stride", 1))
    stride = (window - ovl) // step * step
    return window - stride if stride > 0 else ovl


def _check_writable(folder: Path) -> None:
    if not os.access(folder, os.W_OK):
        raise ConfigError(
            f"cannot write to {str(folder)!r}; choose an output in a folder you can write to"
        )


def _stamp(path: str) -> list[float]:
    if is_url(path):
        return []
    st = os.stat(path)
    return [st.st_size, st.st_mtime]


def _parts_folder(out: Path, settings: dict[str, Any]) -> Path:
    """The folder of block parts beside ``out``: kept from a stopped run with the same settings,
    else started afresh."""
    parts = out.parent / f".{out.name}.parts"
    record = parts / "run.json"
    if parts.exists():
        try:
            same = json.loads(record.read_text()) == settings
        except (OSError, ValueError):
            same = False
        if not same:
            log.info("settings differ from the stopped run's: starting %s afresh", out.name)
            shutil.rmtree(parts)
    if not parts.exists():
        parts.mkdir()
        record.write_text(json.dumps(settings))
    return parts


def _log_dashboard(client: Any) -> None:
    link = getattr(client, "dashboard_link", None)
    if link:
        log.info("Dask dashboard: %s", link)


def assemble_class_map(
    parts: Path,
    cores: list[Any],
    profile: SceneProfile,
    bundle: Bundle,
    output: Path,
    *,
    overwrite: bool,
) -> int:
    """Copy the block parts into one tiled GeoTIFF, then write it as a COG at ``output``;
    return the number of valid (predicted) pixels."""
    staging = parts / "assembled.tif"
    valid = 0
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
        for core in cores:
            with rasterio.open(parts / part_name(core)) as src:
                data = src.read(1)
            dst.write(data, 1, window=core)
            valid += int(np.count_nonzero(data != NODATA_CLASS))
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
    return valid
