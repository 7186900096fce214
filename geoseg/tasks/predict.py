"""Running the model on one block: the worker's side of prediction.

A block reads its core plus halo once, runs every grid window that touches its core in batches,
blends the windows' class probabilities with normalised weights, and keeps its core. The model is
loaded once per worker process (cached by the bundle's path and modification time) and never sent
through the graph.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import threading
import time
from collections.abc import Callable, Iterator
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
from geoseg.derive import add_derived
from geoseg.errors import ConfigError, check_choice, option
from geoseg.io import Grid, SceneProfile, read_scene, standardize
from geoseg.tasks import cuda_devices, torch_threads
from geoseg.tiling import WindowGrid, spans
from geoseg.tuning import (
    MEASURE_BUDGET_S,
    Rate,
    cache_path,
    cached_rates,
    load_cache,
    save_cache,
    stop_measuring,
)

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
COMPOSITES = ("mean", "max-confidence", "first", "last")
"""How scenes that overlap give one class per pixel: the mean of their class probabilities
(over the scenes with valid data there), the scene most confident there, the first or the last
scene (in the order given) with valid data there."""
TTAS = ("none", "flips", "d4")
"""Test-time augmentation: the model runs on each window as it is (``none``); also flipped
left-right, turned 180 degrees and flipped top-bottom (``flips``: 4 passes); or under all 8
flips and quarter turns of the square (``d4``). The class probabilities of the passes, turned
back, are averaged."""
_BUNDLES: dict[tuple[str, float, str], Bundle] = {}
_BUNDLES_LOCK = threading.Lock()


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
    return _kept(path, device, lambda: load_bundle(path, device=device))


def share_bundle(path: str, bundle: Bundle, device: str = "cpu") -> None:
    """Make ``bundle`` (loaded from ``path`` on ``device``) this process's cached one: the
    caller's own copy then serves the tasks a worker in its process runs (a small scene)."""
    _kept(path, device, lambda: bundle)


def _kept(path: str, device: str, load: Callable[[], Bundle]) -> Bundle:
    """The cached bundle of ``path`` on ``device``; without one, ``load()``'s becomes it."""
    key = (path, os.path.getmtime(path), device)
    with _BUNDLES_LOCK:  # the threads of an in-process worker load it once between them
        if key not in _BUNDLES:
            _BUNDLES.clear()  # one model per worker at a time: the old one goes first
            bundle = load()
            bundle.model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
            _BUNDLES[key] = bundle
        return _BUNDLES[key]


def normalize(data: np.ndarray, valid: np.ndarray, bundle: Bundle) -> np.ndarray:
    """The bundle's derived bands added (:mod:`geoseg.derive`), then every band scaled with
    the bundle's statistics; invalid pixels become 0 (the mean). ``data`` is used up: a
    float32 block is scaled in place."""
    data = add_derived(data, valid, bundle.derived_pairs)
    return standardize(data, valid, bundle.contract.mean, bundle.contract.std, inplace=True)


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

    index: np.ndarray | None  # (H, W) int16; None for ``raw`` sums
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
    tta: str = "none",
) -> WindowsPrediction:
    """Run the model over ``windows`` (in scene pixels) of the array ``x``, whose top-left pixel
    is ``origin`` (row, col), and blend them. Windows with no valid pixel are skipped.

    With ``trim`` blending (needs ``grid``), each window gives only its plateau: the class is the
    argmax of its logits there, and probabilities are computed only if asked for. Otherwise the
    windows' softmax probabilities are summed with the blend's weights and normalised; with
    ``raw`` the weighted sums and the summed weights are returned as they are, for adding to
    other blocks' sums (no index then). ``tta``: see :data:`TTAS`.
    """
    k = len(bundle.classes)
    shape = x.shape[1:]
    trim = blend == "trim"
    if trim and grid is None:
        raise ConfigError("trim blending needs the window grid")
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
    with torch.inference_mode(), gpu_turn(device):
        # the block's results stay on the model's device until the last window: on a GPU no
        # window waits for its output to be copied back, so the next batch is stacked while the
        # GPU runs; made in the block's turn, so a GPU holds one block's at a time. A class per
        # pixel only for trim: a weighted blend's class comes from its sums at the end
        index = _full(shape, -1, torch.int16, device) if trim else None
        acc = None if trim and not probabilities else _full((k, *shape), 0, torch.float32, device)
        # a copy: the cached weights are read-only, which torch warns of when it shares them
        weights_t = None if fixed is None else torch.tensor(fixed, device=device)
        for batch in _batches(todo, batch_size):
            xb = _stack([x[:, r : r + size, c : c + size] for _, (r, c) in batch], device)
            logits = _forward(bundle, xb, device, precision, tta)
            for lg, (win, (r, c)) in zip(logits, batch):
                if trim:
                    (pr0, pr1), (pc0, pc1) = spans(grid.plateau(win))  # type: ignore[union-attr]
                    wr, wc = int(win.row_off), int(win.col_off)
                    part = lg[:, pr0 - wr : pr1 - wr, pc0 - wc : pc1 - wc]
                    rows = slice(pr0 - origin[0], pr1 - origin[0])
                    cols = slice(pc0 - origin[1], pc1 - origin[1])
                    assert index is not None
                    index[rows, cols] = part.argmax(0)
                    if acc is not None:
                        acc[:, rows, cols] = torch.softmax(part, 0)
                else:
                    assert acc is not None and wsum is not None and fixed is not None
                    assert weights_t is not None
                    # weighted and added in one pass, in place: 2 passes over the window's
                    # probabilities instead of 3, no temporary beside them
                    into = acc[:, r : r + size, c : c + size]
                    into.addcmul_(torch.softmax(lg, 0), weights_t)
                    w_into = wsum[r : r + size, c : c + size]
                    np.add(w_into, fixed, out=w_into)
        # the one copy back (none on a CPU); the device's copies go before the turn ends
        sums = None if acc is None else acc.cpu().numpy()
        classes = None if index is None else index.cpu().numpy()
        del acc, index, weights_t
    if raw:
        return WindowsPrediction(None, sums, len(todo), wsum)
    if wsum is not None and sums is not None:
        covered = wsum > 0
        # the class of the weighted mean is the class of the weighted sum
        return WindowsPrediction(
            np.where(covered, _argmax_first_axis(sums), -1).astype(np.int16),
            np.divide(sums, np.where(covered, wsum, 1), out=sums) if probabilities else None,
            len(todo),
        )
    return WindowsPrediction(classes, sums if probabilities else None, len(todo))


_GPU_TURN = threading.Lock()


def gpu_turn(device: str) -> contextlib.AbstractContextManager[Any]:
    """Held while a block's windows run on a GPU: the block tasks a GPU worker runs at once
    (:data:`geoseg.cluster.GPU_BLOCKS`) take turns with its model, one block's sums on it at a
    time, while the others read or write. On a CPU every worker thread runs its own model."""
    return _GPU_TURN if device == "cuda" else contextlib.nullcontext()


def _full(shape: tuple[int, ...], value: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    """A tensor of ``value`` on ``device``; on a CPU a view of a NumPy array, whose zeros
    come from pages the system gives zeroed (touched only where written)."""
    if device == "cpu":
        kind = {torch.int16: np.int16, torch.float32: np.float32}[dtype]
        made = np.zeros(shape, kind) if value == 0 else np.full(shape, value, kind)
        return torch.from_numpy(made)
    return torch.full(shape, value, dtype=dtype, device=device)


def _stack(windows: list[np.ndarray], device: str) -> torch.Tensor:
    """The windows as one batch; for a GPU in page-locked memory, so that the copy to it does
    not wait for the GPU's previous batch and this thread goes on to stack the next one."""
    if device == "cpu":
        return torch.from_numpy(np.stack(windows))
    batch = torch.empty((len(windows), *windows[0].shape), pin_memory=True)
    np.stack(windows, out=batch.numpy())
    return batch


def _forward(
    bundle: Bundle, xb: torch.Tensor, device: str, precision: str, tta: str = "none"
) -> torch.Tensor:
    """The model's logits (float32) for a batch of normalised windows, channels-last, under
    autocast at ``precision``. With test-time augmentation (:data:`TTAS`), the log of the
    passes' mean class probabilities: their softmax is that mean, their argmax its class."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    t = xb.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
        if tta == "none":
            return bundle.model(t).float()
        mean = None
        turns = _tta_turns(tta)
        for quarter, flip in turns:
            v = torch.rot90(t.flip(-1) if flip else t, quarter, dims=(-2, -1))
            p = bundle.model(v.contiguous(memory_format=torch.channels_last)).float().softmax(1)
            p = torch.rot90(p, -quarter, dims=(-2, -1))
            p = p.flip(-1) if flip else p
            mean = p if mean is None else mean + p
    assert mean is not None
    return torch.log((mean / len(turns)).clamp_min(1e-30))


def _tta_turns(tta: str) -> list[tuple[int, bool]]:
    """The passes of a test-time augmentation: (quarter turns, flipped left-right first)."""
    check_choice("tta", tta, TTAS)
    if tta == "flips":  # as is, left-right, 180 degrees, top-bottom
        return [(0, False), (0, True), (2, False), (2, True)]
    return [(q, f) for q in range(4) for f in (False, True)] if tta == "d4" else [(0, False)]


def _device_name(device: str) -> str:
    if device == "cuda":
        return str(torch.cuda.get_device_name())
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _shape_part(bundle: Bundle) -> str:
    """The first part of a measurement's key in the cache: the model's shape."""
    return f"shape={bundle.shape_key}"


def speeds_kept(bundle: Bundle) -> bool:
    """Whether this machine's cache holds speeds of ``bundle``'s model shape (on any device)."""
    return any(k.split("|", 1)[0] == _shape_part(bundle) for k in load_cache(cache_path()))


def window_rates(
    bundle_path: str,
    windows: list[tuple[int, int]],
    *,
    device: str = "auto",
    precision: str = "auto",
    budget_s: float = MEASURE_BUDGET_S,
) -> list[Rate]:
    """The model's speed at ``windows`` (``(window, overlap)`` pairs) on this worker (a Dask
    task), from the measurement cache (:func:`geoseg.tuning.cache_path`: by the model's shape,
    not its weights, and the device) or measured now and cached: for each window, a few batch
    sizes (more on a GPU), each timed over forward passes of random windows, softmax and
    argmax included, after one pass to warm up. Windows are
    measured from the smallest up, and no further once larger ones stop paying
    (:func:`geoseg.tuning.stop_measuring`), one runs out of memory, or ``budget_s`` seconds
    have gone; those left out are recorded as tried (speed 0), so they are not tried again."""
    dev, prec, bundle = _setup(device, precision, bundle_path)
    key = "|".join(
        [_shape_part(bundle), dev, prec, _device_name(dev),
         f"threads={torch.get_num_threads()}",
         f"torch={torch.__version__}"]
    )  # fmt: skip
    path = cache_path()
    have = cached_rates(path, key)
    sizes = {w for w, _ in windows}
    todo = sorted((w, o) for w, o in windows if w not in {r.window for r in have})
    if not todo:
        return [r for r in have if r.window in sizes and r.px_per_s > 0]
    rng = np.random.default_rng(0)
    bands = bundle.contract.channels
    new: list[Rate] = []
    t_start = time.perf_counter()
    overlaps = dict(windows)
    with torch.inference_mode(), gpu_turn(dev):
        for w, _ in todo:
            seen = [r for r in [*have, *new] if r.px_per_s > 0 and r.window in overlaps]
            # two passes at the speed of the largest window so far: would they end past budget?
            top = max((r.window for r in seen), default=0)
            slowest = min((r.px_per_s for r in seen if r.window == top), default=0.0)
            guess = 2 * w * w / slowest if slowest else 0.0
            if (new and time.perf_counter() - t_start + guess > budget_s) or stop_measuring(
                seen, overlaps, w
            ):
                new.append(Rate(w, 1, 0.0))  # tried: not worth measuring
                continue
            batches = (
                (1, 2, 4, 8, 16)
                if dev == "cuda"
                else (1, 2, 4)
                if w <= 256
                else ((1, 2) if w <= 512 else (1,))
            )
            try:
                for b in batches:
                    xb = torch.from_numpy(rng.standard_normal((b, bands, w, w), dtype=np.float32))
                    xb = xb.pin_memory() if dev == "cuda" else xb  # as a block's batches are
                    _forward(bundle, xb, dev, prec).softmax(1).argmax(1).cpu()  # warm up
                    runs, t0 = 0, time.perf_counter()
                    while runs < 1 or time.perf_counter() - t0 < 0.3:
                        _forward(bundle, xb, dev, prec).softmax(1).argmax(1).cpu()
                        runs += 1
                    new.append(Rate(w, b, runs * b * w * w / (time.perf_counter() - t0)))
            except torch.OutOfMemoryError:
                if dev == "cuda":
                    torch.cuda.empty_cache()
                overlaps = {k: v for k, v in overlaps.items() if k < w}  # none larger fits
                new.append(Rate(w, 1, 0.0))
    save_cache(path, key, new, {"device": _device_name(dev), "precision": prec})
    return [r for r in [*have, *new] if r.window in sizes and r.px_per_s > 0]


@dataclass(frozen=True)
class BlockJob:
    """One block of an output grid: what a task needs besides the bundle and the settings.
    ``target``: the grid the window grid lies on (the scene's own, or a mosaic scene's share
    of the mosaic's grid); ``area``: WKB of the area in the target's CRS outside which the map
    is nodata."""

    core: Window
    scene: SceneProfile
    grid: WindowGrid
    parts: str  # the folder its part files go to
    target: Grid
    resampling: str = "bilinear"
    area: bytes | None = None


@dataclass(frozen=True)
class SceneParts:
    """A mosaic scene's predicted blocks that fall on one mosaic block: the folder of its part
    files, its grid's offset on the mosaic grid, and the blocks' cores (on its grid)."""

    folder: str
    offset: tuple[int, int]
    cores: tuple[Window, ...]


@dataclass(frozen=True)
class CompositeJob:
    """One block of a mosaic: its core on the mosaic grid and, in the order they composite,
    the parts of the scenes that touch it."""

    core: Window
    sources: tuple[SceneParts, ...]
    parts: str
    target: Grid
    class_ids: tuple[int, ...]
    composite: str = "mean"
    probabilities: bool = False  # write the composited probabilities too


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
    job: BlockJob, area: Window, bundle: Bundle, device: str
) -> tuple[np.ndarray, np.ndarray]:
    """The bundle's bands of ``area`` (on the job's target grid) with validity: the scene's
    own nodata, else the fill value the bundle was trained with; outside the job's area
    nothing is valid. For a GPU, GDAL decodes it in several threads (:func:`read_threads`):
    the GPU waits while its worker reads."""
    data, valid = read_scene(
        job.scene,
        area,
        bundle.indexes_in(job.scene),
        bundle.contract.nodata,
        onto=job.target,
        resampling=job.resampling,
        threads=read_threads(device),
    )
    inside = _area_mask(job, area)
    if inside is not None:
        valid &= inside
    return data, valid


def read_threads(device: str) -> int:
    """Threads that read a block: one on a CPU (the worker threads use the cores already); on
    a GPU its share of the cores, at most 8."""
    if device != "cuda":
        return 1
    return max(1, min(8, (os.cpu_count() or 1) // max(1, cuda_devices())))


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
    """Write the core's class map (and probabilities, scaled to 0-254) as the block's part
    files (:func:`_write_parts`)."""
    classes = bundle.class_ids[index]
    classes[~valid] = NODATA
    scaled = None
    if probs is not None:
        scaled = np.rint(probs * 254).astype(np.uint8)
        scaled[:, ~valid] = NODATA
    return _write_parts(Path(job.parts), job.core, job.target, classes, scaled)


def _write_parts(
    parts: Path, core: Window, target: Grid, classes: np.ndarray, scaled: np.ndarray | None
) -> str:
    """Write a block's class ids (and scaled probabilities) as its part files, then the
    record that marks the block done (:func:`part_done`)."""
    final = parts / part_name(core)
    transform = rasterio.windows.transform(core, target.transform)
    written = [final]
    if scaled is not None:
        written.append(final.with_suffix(".prob.tif"))
        _write_part(written[-1], scaled, target.crs, transform)
    _write_part(final, classes[None], target.crs, transform)
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
    tta: str = "none",
) -> BlockResult:
    """Predict the class map of one block's core and write it to ``job.parts`` (a Dask task);
    with ``probabilities``, also each class's probability scaled to 0-254 (255: nodata).

    The block runs every window that touches its core: with ``trim`` blending (blocks cut on
    plateau edges) no other block runs them. For weighted blends of one scene see
    :func:`accumulate_block` and :func:`finish_block`, which run each window once. A
    mosaic's scenes are predicted this way each on its share of the mosaic's grid, then
    composited by :func:`composite_block`.
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
        "tta": tta,
    }
    halo = grid.halo_window(core)
    rows, cols = _slices(core, halo)
    windows = grid.windows_for(core)
    pred, read_valid = _predicted(job, bundle, halo, windows, probabilities, settings)
    assert pred.index is not None  # not raw sums
    index = pred.index[rows, cols]
    valid = read_valid[rows, cols] & (index >= 0)
    probs = None if pred.probabilities is None else pred.probabilities[:, rows, cols]
    run, skipped = pred.windows_run, len(windows) - pred.windows_run
    path = _write_block(job, bundle, valid, index, probs)
    return BlockResult(core, path, run, skipped, time.perf_counter() - t0, prec)


def _predicted(
    job: BlockJob,
    bundle: Bundle,
    area: Window,
    windows: list[Window],
    probabilities: bool,
    settings: dict[str, Any],
) -> tuple[WindowsPrediction, np.ndarray]:
    """The scene read over ``area`` (on the job's target grid) and predicted in ``windows``:
    the prediction and the validity."""
    data, valid = _read_block(job, area, bundle, settings["device"])
    x = normalize(data, valid, bundle)
    origin = (int(area.row_off), int(area.col_off))
    pred = predict_windows(
        bundle, x, valid, origin, windows, probabilities=probabilities, **settings
    )
    return pred, valid


def composite_block(job: CompositeJob) -> BlockResult:
    """One block of a mosaic from its scenes' predicted parts (a Dask task, no model): where
    one scene has valid data, its class; where several do, the class of their composited
    probabilities (``job.composite``): the mean (to the parts' 1/254 steps), the most
    confident scene's, the first's or the last's. Pixels no scene covers are nodata."""
    t0 = time.perf_counter()
    core = job.core
    shape = (int(core.height), int(core.width))
    n = len(job.class_ids)
    classes = np.full(shape, NODATA, np.uint8)
    # the probabilities of the chosen scene, where they are written
    chosen = np.full((n, *shape), NODATA, np.uint8) if job.probabilities else None
    # the mean's sums of the parts' 0-254 steps, in integers (no rounding on the way)
    wide = np.uint16 if len(job.sources) <= 257 else np.uint32
    sums = np.zeros((n, *shape), wide) if job.composite == "mean" else None
    count = np.zeros(shape, np.uint16)  # the scenes that voted
    best = np.full(shape, -1, np.int16)  # max-confidence: the winner's confidence
    have_probs = True
    # class-by-pixel arrays are masked by multiplying (a part's probabilities times 0 or 1):
    # boolean indexing and ``where=`` were 10-20x slower, and made compositing a third of a
    # mosaic's extra time over one scene
    for src in job.sources:
        cls, prob = _scene_parts(src, core, n)
        have_probs &= prob is not None
        ok = cls != NODATA
        if job.composite == "max-confidence":
            assert prob is not None
            conf = prob.max(axis=0).astype(np.int16)
            take = ok & (conf > best)
            np.copyto(best, conf, where=take)
        elif job.composite == "first":
            take = ok & (count == 0)
        else:
            take = ok
        np.copyto(classes, cls, where=take)
        if chosen is not None and prob is not None:
            chosen *= ~take
            chosen += prob * take
        if sums is not None and prob is not None:
            sums += prob * ok
        count += ok
    probs = chosen if have_probs and job.sources else None
    if sums is not None and job.sources:
        several = count > 1
        if several.any():
            # the class of the mean is the class of the sum: the count is the same for each
            ids = np.asarray(job.class_ids, np.uint8)
            np.copyto(classes, ids[_argmax_first_axis(sums)], where=several)
            if probs is not None:
                mean = np.true_divide(sums, np.maximum(count, 1), dtype=np.float32)
                np.copyto(probs, np.rint(mean, out=mean).astype(np.uint8), where=several[None])
    path = _write_parts(Path(job.parts), core, job.target, classes, probs)
    return BlockResult(core, path, 0, 0, time.perf_counter() - t0)


def _argmax_first_axis(a: np.ndarray) -> np.ndarray:
    """``np.argmax(a, axis=0)`` (the first of equal maxima), one band at a time: 2.3x faster
    than numpy's strided argmax for 7 classes of a 2048 px block."""
    top = a[0].copy()
    index = np.zeros(a.shape[1:], np.intp)
    for k in range(1, a.shape[0]):
        higher = a[k] > top
        index[higher] = k
        np.maximum(top, a[k], out=top)
    return index


def _scene_parts(
    src: SceneParts, core: Window, classes: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """One scene's class ids and (where its parts have them) probabilities over a mosaic
    block's ``core``, from its part files; NODATA where it has none."""
    shape = (int(core.height), int(core.width))
    cls = np.full(shape, NODATA, np.uint8)
    prob: np.ndarray | None = np.full((classes, *shape), NODATA, np.uint8)
    r0, c0 = src.offset
    for part in src.cores:
        on_mosaic = Window(part.col_off + c0, part.row_off + r0, part.width, part.height)
        both = window_intersection(core, on_mosaic)
        into = _slices(both, core)
        read = Window(
            both.col_off - on_mosaic.col_off, both.row_off - on_mosaic.row_off,
            both.width, both.height,
        )  # fmt: skip
        final = Path(src.folder) / part_name(part)
        with rasterio.open(final) as f:
            cls[into] = f.read(1, window=read)
        probs_file = final.with_suffix(".prob.tif")
        if prob is not None and probs_file.exists():
            with rasterio.open(probs_file) as f:
                prob[(slice(None), *into)] = f.read(window=read)
        else:
            prob = None
    return cls, prob


@dataclass
class Piece:
    """A block's weighted probability sums over part of another block's core."""

    target: tuple[int, int]  # the core's (row_off, col_off)
    area: Window  # in scene pixels
    sums: np.ndarray  # (classes, h, w) float32
    weights: np.ndarray  # (h, w) float32
    valid: np.ndarray  # (h, w) bool: the scene's validity there, as read for the windows


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
    tta: str = "none",
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
    data, valid = _read_block(job, ext, bundle, dev)
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
        tta=tta,
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
                np.ascontiguousarray(valid[rows, cols]),
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
    valid = np.zeros((h, w), dtype=bool)  # the pieces carry it: the block is not read again
    for p in pieces:
        if p is None:
            continue
        rows, cols = _slices(p.area, core)
        sums[:, rows, cols] += p.sums
        weights[rows, cols] += p.weights
        valid[rows, cols] |= p.valid
    covered = weights > 0
    index = _argmax_first_axis(sums)  # the class of the weighted mean: of the weighted sum
    if probabilities:
        np.divide(sums, np.where(covered, weights, 1), out=sums)
    path = _write_block(job, bundle, valid & covered, index, sums if probabilities else None)
    return BlockResult(core, path, 0, 0, time.perf_counter() - t0)


def _write_part(path: Path, data: np.ndarray, crs: Any, transform: Any) -> None:
    """A part file, band by band as the array lies (GeoTIFF's default for several bands
    interleaves them by pixel: a 7-band part took 1.7x as long to write, 1.8x to read)."""
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
        interleave="band",
    ) as dst:
        dst.write(data)
    os.replace(tmp, path)
