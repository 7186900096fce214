"""Running the model on one block: the worker's side of prediction.

A block reads its core plus halo once, runs every grid window that touches its core in batches,
blends the windows' class probabilities with normalised weights, and keeps its core. The model is
loaded once per worker process (cached by the bundle's path and modification time) and never sent
through the graph.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import torch
from rasterio.errors import RasterioError
from rasterio.windows import Window

from geoseg.blending import window_weights
from geoseg.bundle import Bundle, load_bundle
from geoseg.cluster import torch_threads
from geoseg.errors import ConfigError, NotARasterError
from geoseg.io import NODATA_CLASS, read_window
from geoseg.tiling import WindowGrid

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_BUNDLES: dict[tuple[str, float, str], Bundle] = {}


def resolve_device(device: str) -> str:
    if device not in DEVICES:
        raise ConfigError(f"unknown device {device!r}; expected one of {', '.join(DEVICES)}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "--device cuda was asked for but this worker has no CUDA GPU; use auto or cpu"
        )
    return device


def resolve_precision(precision: str, device: str) -> str:
    """``auto``: bf16 on a GPU that has it (else fp16), bf16 on a CPU with native bf16
    instructions, fp32 otherwise."""
    if precision not in PRECISIONS:
        raise ConfigError(
            f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}"
        )
    if precision != "auto":
        if precision == "fp16" and device == "cpu":
            raise ConfigError("--precision fp16 needs a GPU; use bf16 or fp32 on a CPU")
        return precision
    if device == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"


def cached_bundle(path: str, device: str) -> Bundle:
    """The bundle at ``path``, loaded once per process and device, in channels-last layout."""
    key = (path, os.path.getmtime(path), device)
    if key not in _BUNDLES:
        _BUNDLES.clear()  # one model per worker at a time
        bundle = load_bundle(path, device=device)
        bundle.model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        _BUNDLES[key] = bundle
    return _BUNDLES[key]


def normalize(data: np.ndarray, valid: np.ndarray, bundle: Bundle) -> np.ndarray:
    """Scale bands with the bundle's statistics; invalid pixels become 0 (the mean)."""
    mean = np.asarray(bundle.contract.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(bundle.contract.std, dtype=np.float32)[:, None, None]
    out = (data - mean) / std
    out[:, ~valid] = 0.0
    return out


@dataclass(frozen=True)
class BlockResult:
    """What a block task reports back: where its core went and what it cost."""

    core: Window
    path: str
    windows_run: int
    windows_skipped: int


def part_name(core: Window) -> str:
    """The part file of a block: named for its position, so a later run can find it."""
    return f"block_{int(core.row_off)}_{int(core.col_off)}.tif"


def _batches(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def predict_probabilities(
    bundle: Bundle,
    x: np.ndarray,
    valid: np.ndarray,
    origin: tuple[int, int],
    windows: list[Window],
    *,
    batch_size: int,
    blend: str,
    device: str,
    precision: str = "fp32",
    grid: WindowGrid | None = None,
) -> tuple[np.ndarray, int]:
    """Blend the model's probabilities over ``windows`` (in scene pixels) into the array ``x``
    whose top-left pixel is ``origin`` (row, col). Returns ``(probabilities, windows run)``;
    pixels no window covered have all-zero probabilities."""
    k = len(bundle.classes)
    acc = np.zeros((k, *x.shape[1:]), dtype=np.float32)
    wsum = np.zeros(x.shape[1:], dtype=np.float32)
    if not windows:
        return acc, 0
    size = int(windows[0].height)
    fixed = None if blend == "trim" else window_weights(size, blend)
    # (window, its top-left in x) for the windows holding any valid pixel
    todo = [
        (w, (r, c))
        for w in windows
        for r, c in [(int(w.row_off) - origin[0], int(w.col_off) - origin[1])]
        if valid[r : r + size, c : c + size].any()
    ]
    run = 0
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    with torch.inference_mode(), torch.autocast(device, dtype=dtype, enabled=dtype is not None):
        for batch in _batches(todo, batch_size):
            xb = torch.from_numpy(
                np.stack([x[:, r : r + size, c : c + size] for _, (r, c) in batch])
            )
            logits = bundle.model(xb.to(device).contiguous(memory_format=torch.channels_last))
            probs = torch.softmax(logits.float(), dim=1).cpu().numpy()
            for p, (win, (r, c)) in zip(probs, batch):
                weights = fixed if fixed is not None else grid.weights(win)  # type: ignore[union-attr]
                acc[:, r : r + size, c : c + size] += p * weights
                wsum[r : r + size, c : c + size] += weights
            run += len(batch)
    np.divide(acc, wsum, out=acc, where=wsum > 0)
    return acc, run


@dataclass(frozen=True)
class BlockJob:
    """One block of one scene: what a task needs besides the bundle and the settings."""

    core: Window
    scene: str
    grid: WindowGrid
    parts: str  # the folder its part files go to


def predict_block(
    job: BlockJob,
    bundle_path: str,
    *,
    batch_size: int = 8,
    blend: str = "gaussian",
    device: str = "auto",
    precision: str = "auto",
    probabilities: bool = False,
) -> BlockResult:
    """Predict the class map of one block's core and write it to ``job.parts`` (a Dask task);
    with ``probabilities``, also each class's probability scaled to 0-254 (255: nodata)."""
    torch.set_num_threads(torch_threads())
    core, scene_path, grid = job.core, job.scene, job.grid
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    bundle = cached_bundle(bundle_path, dev)
    halo = grid.halo_window(core)
    failure = None
    try:
        with rasterio.open(scene_path) as src:
            # the scene's own nodata wins; else the fill value the bundle was trained with
            nodata = None if src.nodata is not None else bundle.contract.nodata
            data, valid = read_window(src, halo, [b.index for b in bundle.bands], nodata)
            profile = src.profile
    except RasterioError as exc:
        failure = str(exc)
    if failure is not None:  # raised outside the handler: GDAL's error must not travel with it
        raise NotARasterError(
            f"scene {scene_path!r} could not be read at rows {int(core.row_off)}-"
            f"{int(core.row_off + core.height)}, columns {int(core.col_off)}-"
            f"{int(core.col_off + core.width)} ({failure}); the file may be truncated or damaged"
        )
    x = normalize(data, valid, bundle)
    windows = grid.windows_for(core)
    probs, run = predict_probabilities(
        bundle,
        x,
        valid,
        (int(halo.row_off), int(halo.col_off)),
        windows,
        batch_size=batch_size,
        blend=blend,
        device=dev,
        precision=prec,
        grid=grid,
    )
    r0, c0 = int(core.row_off - halo.row_off), int(core.col_off - halo.col_off)
    h, w = int(core.height), int(core.width)
    core_probs = probs[:, r0 : r0 + h, c0 : c0 + w]
    core_valid = valid[r0 : r0 + h, c0 : c0 + w]
    classes = bundle.class_ids[np.argmax(core_probs, axis=0)]
    classes[~core_valid] = NODATA_CLASS

    final = Path(job.parts) / part_name(core)
    transform = rasterio.windows.transform(core, profile["transform"])
    if probabilities:
        scaled = np.rint(core_probs * 254).astype(np.uint8)
        scaled[:, ~core_valid] = NODATA_CLASS
        _write_part(final.with_suffix(".prob.tif"), scaled, profile["crs"], transform)
    _write_part(final, classes[None], profile["crs"], transform)  # last: marks the block done
    return BlockResult(core, str(final), run, len(windows) - run)


def _write_part(path: Path, data: np.ndarray, crs: Any, transform: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with rasterio.open(
        tmp,
        "w",
        driver="GTiff",
        width=data.shape[2],
        height=data.shape[1],
        count=data.shape[0],
        dtype="uint8",
        nodata=NODATA_CLASS,
        crs=crs,
        transform=transform,
    ) as dst:
        dst.write(data)
    os.replace(tmp, path)
