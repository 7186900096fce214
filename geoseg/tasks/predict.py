"""Running the model on one block: the worker's side of prediction.

A block reads its core plus halo once, runs every grid window that touches its core in batches,
blends the windows' class probabilities with normalised weights, and keeps its core. The model is
loaded once per worker process (cached by the bundle's path and modification time) and never sent
through the graph.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import torch
from rasterio.windows import Window
from rasterio.windows import intersect as windows_intersect
from rasterio.windows import intersection as window_intersection

from geoseg.blending import window_weights
from geoseg.bundle import Bundle, load_bundle
from geoseg.classes import NODATA
from geoseg.errors import ConfigError, check_choice, option
from geoseg.io import Grid, SceneProfile, read_scene, standardize
from geoseg.tasks import torch_threads
from geoseg.tiling import WindowGrid, spans

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
COMPOSITES = ("mean", "max-confidence", "first", "last")
"""How scenes that overlap give one class per pixel: the mean of their class probabilities
(over the scenes with valid data there), the scene most confident there, the first or the last
scene (in the order given) with valid data there."""
_BUNDLES: dict[tuple[str, float, str], Bundle] = {}


def resolve_device(device: str) -> str:
    check_choice("device", device, DEVICES)
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"{option('--device', 'cuda')} was asked for but this worker has no CUDA GPU; "
            "use auto or cpu"
        )
    return device


def resolve_precision(precision: str, device: str) -> str:
    """``auto``: bf16 on a GPU that has it (else fp16), bf16 on a CPU with native bf16
    instructions, fp32 otherwise."""
    check_choice("precision", precision, PRECISIONS)
    if precision != "auto":
        if precision == "fp16" and device == "cpu":
            raise ConfigError(
                f"{option('--precision', 'fp16')} needs a GPU; use bf16 or fp32 on a CPU"
            )
        return precision
    if device == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"


def default_batch_size(device: str, window: int) -> int:
    """Windows per forward pass: 8 on a GPU; on a CPU about one 512 px window's worth of pixels
    (one 512 px window, four of 256 px), because buffers larger than glibc's 32 MiB mmap ceiling
    are mapped afresh on every call: batch 8 ran the default U-Net 1.48x slower per window than
    batch 1 here (``benchmarks/README.md``)."""
    if device == "cuda":
        return 8
    return max(1, (512 * 512) // (window * window))


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
    return standardize(data, valid, bundle.contract.mean, bundle.contract.std)


@dataclass(frozen=True)
class BlockResult:
    """What a block task reports back: where its core went and what it cost."""

    core: Window
    path: str
    windows_run: int
    windows_skipped: int
    seconds: float = 0.0  # the task's own wall time, model loading included
    precision: str = ""  # as resolved on the worker


def part_name(core: Window) -> str:
    """The part file of a block: named for its position, so a later run can find it."""
    return f"block_{int(core.row_off)}_{int(core.col_off)}.tif"


def _batches(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


@dataclass
class WindowsPrediction:
    """The blended prediction over an array: per pixel, the index of the winning class (-1
    where no window ran) and, when asked for, every class's probability."""

    index: np.ndarray  # (H, W) int16
    probabilities: np.ndarray | None  # (classes, H, W) float32
    windows_run: int
    weights: np.ndarray | None = None  # with ``raw``: the summed weights; probabilities unscaled


def predict_windows(
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
    probabilities: bool = False,
    raw: bool = False,
) -> WindowsPrediction:
    """Run the model over ``windows`` (in scene pixels) of the array ``x``, whose top-left pixel
    is ``origin`` (row, col), and blend them. Windows with no valid pixel are skipped.

    With ``trim`` blending (needs ``grid``), each window gives only its plateau: the class is the
    argmax of its logits there, and probabilities are computed only if asked for. Otherwise the
    windows' softmax probabilities are summed with the blend's weights and normalised; with
    ``raw`` the weighted sums and the summed weights are returned as they are, for adding to
    other blocks' sums (no index then).
    """
    k = len(bundle.classes)
    shape = x.shape[1:]
    trim = blend == "trim"
    if trim and grid is None:
        raise ConfigError("trim blending needs the window grid")
    index = np.full(shape, -1, dtype=np.int16)
    acc = None if trim and not probabilities else np.zeros((k, *shape), dtype=np.float32)
    wsum = None if trim else np.zeros(shape, dtype=np.float32)
    size = int(windows[0].height) if windows else 0
    fixed = None if trim or not windows else window_weights(size, blend)
    # (window, its top-left in x) for the windows holding any valid pixel where their output
    # is used: with trim blending only on the plateau (a window whose plateau is all nodata,
    # say a scene's edge seen only by a window's margin in a mosaic, would write nothing)
    todo = []
    for w in windows:
        r, c = int(w.row_off) - origin[0], int(w.col_off) - origin[1]
        if trim:
            (pr0, pr1), (pc0, pc1) = spans(grid.plateau(w))  # type: ignore[union-attr]
            used = valid[pr0 - origin[0] : pr1 - origin[0], pc0 - origin[1] : pc1 - origin[1]]
        else:
            used = valid[r : r + size, c : c + size]
        if used.any():
            todo.append((w, (r, c)))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    with torch.inference_mode():
        for batch in _batches(todo, batch_size):
            xb = torch.from_numpy(
                np.stack([x[:, r : r + size, c : c + size] for _, (r, c) in batch])
            )
            xb = xb.to(device).contiguous(memory_format=torch.channels_last)
            with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
                logits = bundle.model(xb)
            logits = logits.float()
            for lg, (win, (r, c)) in zip(logits, batch):
                if trim:
                    (pr0, pr1), (pc0, pc1) = spans(grid.plateau(win))  # type: ignore[union-attr]
                    wr, wc = int(win.row_off), int(win.col_off)
                    part = lg[:, pr0 - wr : pr1 - wr, pc0 - wc : pc1 - wc]
                    rows = slice(pr0 - origin[0], pr1 - origin[0])
                    cols = slice(pc0 - origin[1], pc1 - origin[1])
                    index[rows, cols] = part.argmax(0).cpu().numpy()
                    if acc is not None:
                        acc[:, rows, cols] = torch.softmax(part, 0).cpu().numpy()
                else:
                    assert acc is not None and wsum is not None and fixed is not None
                    p = torch.softmax(lg, 0).cpu().numpy()
                    acc[:, r : r + size, c : c + size] += p * fixed
                    wsum[r : r + size, c : c + size] += fixed
    if raw:
        return WindowsPrediction(index, acc, len(todo), wsum)
    if wsum is not None and acc is not None:
        covered = wsum > 0
        np.divide(acc, wsum, out=acc, where=covered)
        index[covered] = np.argmax(acc[:, covered], axis=0)
    return WindowsPrediction(index, acc if probabilities else None, len(todo))


@dataclass(frozen=True)
class BlockJob:
    """One block of an output grid: what a task needs besides the bundle and the settings.
    ``scenes``: those that touch the block, in the order they composite; ``target``: the grid
    the window grid lies on (a scene's own, or a mosaic's); ``area``: WKB of the area in the
    target's CRS outside which the map is nodata."""

    core: Window
    scenes: tuple[SceneProfile, ...]
    grid: WindowGrid
    parts: str  # the folder its part files go to
    target: Grid
    composite: str = "mean"
    resampling: str = "bilinear"
    area: bytes | None = None
    footprints: tuple[Window, ...] = ()  # of the scenes, on the target grid (a mosaic's)


def _area_mask(job: BlockJob, window: Window) -> np.ndarray | None:
    """Inside the job's area, per pixel of ``window`` (None: no area)."""
    if job.area is None:
        return None
    import shapely
    from rasterio.features import geometry_mask

    t = rasterio.windows.transform(window, job.target.transform)
    shape = (int(window.height), int(window.width))
    return geometry_mask([shapely.from_wkb(job.area)], shape, t, invert=True)


def _read_block(
    job: BlockJob,
    area: Window,
    bundle: Bundle,
    scene: SceneProfile | None = None,
    inside: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The bundle's bands of ``area`` (on the job's target grid) of one scene (the job's
    only one by default), with validity: the scene's own nodata, else the fill value the
    bundle was trained with; outside the job's area (``inside``, when the caller has it for
    ``area`` already) nothing is valid."""
    scene = scene or job.scenes[0]
    data, valid = read_scene(
        scene,
        area,
        bundle.indexes_in(scene),
        bundle.contract.nodata,
        onto=job.target,
        resampling=job.resampling,
    )
    if inside is None:
        inside = _area_mask(job, area)
    if inside is not None:
        valid &= inside
    return data, valid


def _setup(device: str, precision: str, bundle_path: str) -> tuple[str, str, Bundle]:
    torch.set_num_threads(torch_threads())
    dev = resolve_device(device)
    return dev, resolve_precision(precision, dev), cached_bundle(bundle_path, dev)


def _write_block(
    job: BlockJob,
    bundle: Bundle,
    valid: np.ndarray,
    index: np.ndarray,
    probs: np.ndarray | None,
) -> str:
    """Write the core's class map (and probabilities) as the block's part files, then the
    record that marks the block done (:func:`part_done`)."""
    classes = bundle.class_ids[index]
    classes[~valid] = NODATA
    final = Path(job.parts) / part_name(job.core)
    transform = rasterio.windows.transform(job.core, job.target.transform)
    crs = job.target.crs
    written = [final]
    if probs is not None:
        scaled = np.rint(probs * 254).astype(np.uint8)
        scaled[:, ~valid] = NODATA
        written.append(final.with_suffix(".prob.tif"))
        _write_part(written[-1], scaled, crs, transform)
    _write_part(final, classes[None], crs, transform)
    record = final.with_suffix(".done")
    tmp = record.with_name(record.name + ".tmp")
    tmp.write_text(json.dumps({f.name: _fingerprint(f) for f in written}))
    os.replace(tmp, record)  # last: only now is the block done
    return str(final)


def _fingerprint(path: Path) -> list[Any]:
    """Size and SHA-256 of a part file."""
    return [path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest()]


def part_done(parts: Path, core: Window, probabilities: bool) -> bool:
    """Whether the block at ``core`` was written completely by an earlier run: its record
    exists and every part file it needs has the size and checksum recorded when it was
    written. A truncated or overwritten part is not done, so it is computed again."""
    final = parts / part_name(core)
    needed = [final.name] + ([final.with_suffix(".prob.tif").name] if probabilities else [])
    try:
        record = json.loads(final.with_suffix(".done").read_text())
        return all(name in record and _fingerprint(parts / name) == record[name] for name in needed)
    except (OSError, ValueError):
        return False


def predict_block(
    job: BlockJob,
    bundle_path: str,
    *,
    batch_size: int | None = None,
    blend: str = "trim",
    device: str = "auto",
    precision: str = "auto",
    probabilities: bool = False,
) -> BlockResult:
    """Predict the class map of one block's core and write it to ``job.parts`` (a Dask task);
    with ``probabilities``, also each class's probability scaled to 0-254 (255: nodata).

    The block runs every window that touches its core: with ``trim`` blending (blocks cut on
    plateau edges) no other block runs them. For weighted blends of one scene see
    :func:`accumulate_block` and :func:`finish_block`, which run each window once. Where
    several scenes touch the block, each is read onto the target grid and predicted, and
    their probabilities are composited (``job.composite``) where each has valid data.
    """
    t0 = time.perf_counter()
    dev, prec, bundle = _setup(device, precision, bundle_path)
    core, grid = job.core, job.grid
    settings = {
        "batch_size": batch_size or default_batch_size(dev, grid.window),
        "blend": blend,
        "device": dev,
        "precision": prec,
        "grid": grid,
    }
    if len(job.scenes) > 1:
        valid, index, probs, run, skipped = _composite(job, bundle, probabilities, settings)
    else:
        halo = grid.halo_window(core)
        rows, cols = _slices(core, halo)
        windows = grid.windows_for(core)
        pred, read_valid, _ = _predicted(
            job, bundle, job.scenes[0], halo, windows, probabilities, settings
        )
        index = pred.index[rows, cols]
        valid = read_valid[rows, cols] & (index >= 0)
        probs = None if pred.probabilities is None else pred.probabilities[:, rows, cols]
        run, skipped = pred.windows_run, len(windows) - pred.windows_run
    path = _write_block(job, bundle, valid, index, probs)
    return BlockResult(core, path, run, skipped, time.perf_counter() - t0, prec)


def _predicted(
    job: BlockJob,
    bundle: Bundle,
    scene: SceneProfile,
    area: Window,
    windows: list[Window],
    probabilities: bool,
    settings: dict[str, Any],
    inside: np.ndarray | None = None,
) -> tuple[WindowsPrediction, np.ndarray, np.ndarray]:
    """One scene read over ``area`` (on the job's target grid) and predicted in ``windows``:
    the prediction, the validity, and the scene's data read."""
    data, valid = _read_block(job, area, bundle, scene, inside)
    x = normalize(data, valid, bundle)
    origin = (int(area.row_off), int(area.col_off))
    pred = predict_windows(
        bundle, x, valid, origin, windows, probabilities=probabilities, **settings
    )
    return pred, valid, data


def _composite(
    job: BlockJob, bundle: Bundle, probabilities: bool, settings: dict[str, Any]
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int, int]:
    """The block's core from every scene that touches it: each scene is read and predicted
    only over its own footprint (the windows that touch it), and its class probabilities are
    composited (``job.composite``) where it has valid data. Returns the core's validity,
    class index and (with ``probabilities``) probabilities, and the windows run and skipped."""
    core, grid = job.core, job.grid
    shape = (int(core.height), int(core.width))
    valid_core = np.zeros(shape, dtype=bool)
    probs_core = np.zeros((len(bundle.classes), *shape), np.float32)
    count = np.zeros(shape, np.float32)  # mean: the scenes that voted
    best = np.full(shape, -1.0, np.float32)  # max-confidence: the winner's confidence
    halo = grid.halo_window(core)
    inside = _area_mask(job, halo)  # once for the block, not once per scene
    run = skipped = 0
    for scene, foot in zip(job.scenes, job.footprints or [halo] * len(job.scenes)):
        windows = [w for w in grid.windows_for(core) if windows_intersect(w, foot)]
        if not windows or not windows_intersect(core, foot):
            continue
        area = grid.extent(windows)
        part = window_intersection(core, area)
        sub = None
        if inside is not None:
            r, c = _slices(area, halo)
            sub = inside[r, c]
        pred, valid, _ = _predicted(job, bundle, scene, area, windows, True, settings, sub)
        run += pred.windows_run
        skipped += len(windows) - pred.windows_run
        a_rows, a_cols = _slices(part, area)
        ok = valid[a_rows, a_cols] & (pred.index[a_rows, a_cols] >= 0)
        assert pred.probabilities is not None
        p = pred.probabilities[:, a_rows, a_cols]
        # views of the core's arrays over this scene's part: writes go through
        c_rows, c_cols = _slices(part, core)
        probs, filled = probs_core[:, c_rows, c_cols], valid_core[c_rows, c_cols]
        if job.composite == "mean":
            probs[:, ok] += p[:, ok]
            count[c_rows, c_cols][ok] += 1
        else:
            if job.composite == "max-confidence":
                conf, top = p.max(axis=0), best[c_rows, c_cols]
                take = ok & (conf > top)
                top[take] = conf[take]
            else:
                take = ok & ~filled if job.composite == "first" else ok
            probs[:, take] = p[:, take]
        filled |= ok
    np.divide(probs_core, count, out=probs_core, where=count > 0)
    index = np.argmax(probs_core, axis=0).astype(np.int16)
    index[~valid_core] = 0
    return valid_core, index, probs_core if probabilities else None, run, skipped


@dataclass
class Piece:
    """A block's weighted probability sums over part of another block's core."""

    target: tuple[int, int]  # the core's (row_off, col_off)
    area: Window  # in scene pixels
    sums: np.ndarray  # (classes, h, w) float32
    weights: np.ndarray  # (h, w) float32


@dataclass
class Accumulated:
    """What :func:`accumulate_block` hands on: its sums cut up by the cores they fall on."""

    pieces: dict[tuple[int, int], Piece]
    windows_run: int
    windows_skipped: int
    seconds: float


def accumulate_block(
    job: BlockJob,
    bundle_path: str,
    targets: list[Window],
    *,
    batch_size: int | None = None,
    blend: str = "gaussian",
    device: str = "auto",
    precision: str = "auto",
) -> Accumulated:
    """Run the windows this block owns (:meth:`WindowGrid.owned_windows`), sum their weighted
    probabilities, and cut the sums up by the ``targets`` (cores, this block's among them) they
    fall on (a Dask task). Every window of the scene runs in exactly one block."""
    t0 = time.perf_counter()
    dev, prec, bundle = _setup(device, precision, bundle_path)
    owned = job.grid.owned_windows(job.core)
    if not owned:
        return Accumulated({}, 0, 0, time.perf_counter() - t0)
    ext = job.grid.extent(owned)
    data, valid = _read_block(job, ext, bundle)
    x = normalize(data, valid, bundle)
    origin = (int(ext.row_off), int(ext.col_off))
    pred = predict_windows(
        bundle,
        x,
        valid,
        origin,
        owned,
        batch_size=batch_size or default_batch_size(dev, job.grid.window),
        blend=blend,
        device=dev,
        precision=prec,
        raw=True,
    )
    pieces = {}
    if pred.windows_run:
        assert pred.probabilities is not None and pred.weights is not None
        for t in targets:
            if not windows_intersect(t, ext):
                continue
            area = window_intersection(t, ext)
            rows, cols = _slices(area, ext)
            key = (int(t.row_off), int(t.col_off))
            pieces[key] = Piece(
                key,
                area,
                np.ascontiguousarray(pred.probabilities[:, rows, cols]),
                np.ascontiguousarray(pred.weights[rows, cols]),
            )
    run = pred.windows_run
    return Accumulated(pieces, run, len(owned) - run, time.perf_counter() - t0)


def _slices(area: Window, within: Window) -> tuple[slice, slice]:
    """Row and column slices of ``area`` in an array covering ``within`` (scene pixels)."""
    r0, c0 = int(area.row_off - within.row_off), int(area.col_off - within.col_off)
    return slice(r0, r0 + int(area.height)), slice(c0, c0 + int(area.width))


def take_piece(acc: Accumulated, target: tuple[int, int]) -> Piece | None:
    """The piece of ``acc`` for one core (a small task beside ``acc``'s, so only it moves)."""
    return acc.pieces.get(target)


def finish_block(
    job: BlockJob,
    bundle_path: str,
    *pieces: Piece | None,
    probabilities: bool = False,
    device: str = "auto",
) -> BlockResult:
    """Add up the pieces that neighbouring blocks computed for this core, normalise by the
    summed weights, and write the core's part files (a Dask task). It runs no model, but takes
    the bundle as this worker's model tasks hold it, so that it does not evict their copy."""
    t0 = time.perf_counter()
    bundle = cached_bundle(bundle_path, resolve_device("auto" if device == "cuda" else device))
    core = job.core
    h, w = int(core.height), int(core.width)
    sums = np.zeros((len(bundle.classes), h, w), dtype=np.float32)
    weights = np.zeros((h, w), dtype=np.float32)
    for p in pieces:
        if p is None:
            continue
        rows, cols = _slices(p.area, core)
        sums[:, rows, cols] += p.sums
        weights[rows, cols] += p.weights
    covered = weights > 0
    np.divide(sums, weights, out=sums, where=covered)
    index = np.argmax(sums, axis=0)
    _, valid = _read_block(job, core, bundle)
    path = _write_block(job, bundle, valid & covered, index, sums if probabilities else None)
    return BlockResult(core, path, 0, 0, time.perf_counter() - t0)


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
        nodata=NODATA,
        crs=crs,
        transform=transform,
    ) as dst:
        dst.write(data)
    os.replace(tmp, path)
