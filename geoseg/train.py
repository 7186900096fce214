"""Training a segmentation model on a Dask worker, epoch by epoch, into a bundle.

The client computes per-band statistics and label code counts with a Dask reduction over blocks,
then runs one task per epoch: the task rebuilds the model and optimiser from the previous epoch's
state, draws random windows from the labelled area, and returns the new state. The weights travel
between epochs (a few MB), so a lost worker costs one epoch, never the run.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from geoseg import __version__
from geoseg.augment import PRESETS, build_augmenter
from geoseg.bundle import BandInfo, Contract, save_bundle
from geoseg.cluster import run_tasks, session, torch_threads
from geoseg.data import (
    LabelSpec,
    SampleSpec,
    WindowSampler,
    block_stats,
    check_labels,
    load_classes,
    pixel_bounds,
    resolve_classes,
)
from geoseg.errors import BandMismatchError, ConfigError, GeosegError, LabelError
from geoseg.inference import resolve_device
from geoseg.io import ClassInfo, check_output, read_profile
from geoseg.losses import make_loss
from geoseg.models import create_model, parameter_count, receptive_field
from geoseg.progress import Progress
from geoseg.tiling import block_windows

log = logging.getLogger("geoseg")


class TrainingError(GeosegError, RuntimeError):
    """Training cannot go on (a non-finite loss, a lost worker)."""


@dataclass(frozen=True)
class EpochConfig:
    """Everything one epoch task needs; plain data, cheap to send."""

    sample: SampleSpec
    arch: str
    arch_args: dict[str, Any]
    num_classes: int
    batch_size: int
    steps: int
    epochs: int
    lr: float
    loss: str
    label_smoothing: float
    class_weights: tuple[float, ...] | None
    seed: int
    device: str


@dataclass
class EpochResult:
    epoch: int
    state: dict[str, Any]
    loss: float
    seconds: float
    pixels: int


def train_epoch(state: dict[str, Any] | None, cfg: EpochConfig, epoch: int) -> EpochResult:
    """Run one epoch (a Dask task). ``state`` holds the model and optimiser state, or None."""
    t0 = time.perf_counter()
    torch.set_num_threads(torch_threads())
    torch.manual_seed(cfg.seed * 1000 + epoch)
    device = resolve_device(cfg.device)
    model = create_model(cfg.arch, len(cfg.sample.bands), cfg.num_classes, **cfg.arch_args).to(
        device
    )
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
    for g in opt.param_groups:  # cosine decay over the whole run
        g["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * epoch / cfg.epochs))
    loss_fn = make_loss(cfg.loss, cfg.class_weights, device, label_smoothing=cfg.label_smoothing)
    sampler = WindowSampler(cfg.sample, seed=cfg.seed * 100003 + epoch)
    model.train()
    losses, pixels = [], 0
    try:
        for step in range(cfg.steps):
            pairs = [sampler.sample() for _ in range(cfg.batch_size)]
            x = torch.from_numpy(np.stack([p[0] for p in pairs])).to(device)
            y = torch.from_numpy(np.stack([p[1] for p in pairs]).astype(np.int64)).to(device)
            loss = loss_fn(model(x), y)
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"the loss became {loss.item()} at epoch {epoch + 1}, batch {step + 1} on "
                    f"{cfg.sample.scene!r}; lower --lr or check the scene for extreme values"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            pixels += int((y != 255).sum())
    finally:
        sampler.close()
    new_state = {
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": opt.state_dict(),
    }
    return EpochResult(epoch, new_state, float(np.mean(losses)), time.perf_counter() - t0, pixels)


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train` wrote and how training went."""

    path: Path
    classes: list[ClassInfo]
    history: list[dict[str, float]] = field(default_factory=list)
    bundle_hash: str = ""


def _class_weights(counts: dict[int, int], classes: Sequence[ClassInfo]) -> tuple[float, ...]:
    """Inverse square-root frequency, scaled to a median of 1 and clipped to [0.2, 5]."""
    freq = np.array([max(counts.get(c.id, 0), 1) for c in classes], dtype=np.float64)
    w = 1.0 / np.sqrt(freq)
    w = np.clip(w / np.median(w), 0.2, 5.0)
    return tuple(float(v) for v in w)


def train(
    scene: str | os.PathLike[str],
    labels: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    label_field: str | None = None,
    classes: str | os.PathLike[str] | Sequence[Any] | None = None,
    ignore: Sequence[int] = (),
    bands: Sequence[int] | None = None,
    arch: str = "unet",
    arch_args: dict[str, Any] | None = None,
    window: int = 64,
    predict_window: int = 256,
    epochs: int = 20,
    batch_size: int = 16,
    samples_per_epoch: int | None = None,
    lr: float = 2e-3,
    loss: str = "ce",
    label_smoothing: float = 0.0,
    augment: str = "light",
    balance: bool = True,
    within: str | os.PathLike[str] | None = None,
    nodata: float | None = None,
    seed: int = 0,
    device: str = "auto",
    workers: int | None = None,
    scheduler: str | None = None,
    overwrite: bool = False,
) -> TrainResult:
    """Train ``arch`` on ``scene`` with ``labels`` and write a bundle to ``output``.

    Parameters
    ----------
    scene
        The training scene (path or GDAL URL).
    labels
        A class raster on the scene's grid, or a vector file whose ``label_field`` holds codes.
    output
        The bundle to write.
    classes
        A YAML class list file, or a list of ClassInfo or ``{id, name, color}`` mappings; default: the label raster's class metadata,
        else one class per code found.
    ignore
        Label codes that mean "unlabelled".
    bands
        1-based scene band indexes the model reads, in order; default all.
    window, predict_window
        Training window, and the default window stored for prediction.
    loss, label_smoothing
        Loss names joined by ``+`` with optional weights (``ce+0.5*dice``); cross-entropy label
        smoothing.
    augment
        ``none``, ``light``, ``strong``, or a YAML pipeline file (see :mod:`geoseg.augment`).
    within
        A polygon file: training windows lie wholly inside it, statistics are computed inside it.
    balance
        Weight the loss by inverse square-root class frequency.
    nodata
        The scene's fill value, where the scene does not declare one; stored in the bundle.

    Returns
    -------
    TrainResult
    """
    out = check_output(output, overwrite)
    profile = read_profile(scene)
    band_list = list(bands) if bands else list(range(1, profile.count + 1))
    bad = [b for b in band_list if not 1 <= b <= profile.count]
    if bad:
        raise BandMismatchError(
            f"scene {profile.path!r} has bands 1-{profile.count}; --bands asked for {bad}"
        )
    if window < 8 or epochs < 1 or batch_size < 1:
        raise ConfigError("--window must be at least 8, --epochs and --batch-size at least 1")
    make_loss(loss)  # validate the names before any work
    build_augmenter(augment, window)
    if augment not in PRESETS:  # a pipeline file: workers need its absolute path
        augment = str(Path(augment).resolve())
    spec = LabelSpec(str(labels), label_field, tuple(ignore))
    check_labels(spec, profile)
    class_list = load_classes(classes) if classes is not None else None
    area = str(within) if within is not None else None
    bounds = pixel_bounds(profile, area)
    if bounds[2] - bounds[0] < window or bounds[3] - bounds[1] < window:
        raise ConfigError(
            f"window {window} px is larger than the training area ({bounds[3] - bounds[1]} x "
            f"{bounds[2] - bounds[0]} px); pass a smaller --window"
        )
    arch_args = dict(arch_args or {})
    create_model(arch, len(band_list), 2, **arch_args)  # validate architecture arguments early

    with session(workers, scheduler) as client:
        blocks = block_windows(profile.height, profile.width, 1024)
        parts = run_tasks(
            client,
            block_stats,
            blocks,
            "statistics",
            str(scene),
            tuple(band_list),
            spec,
            area,
            nodata,
        )
        stats = parts[0]
        for p in parts[1:]:
            stats = stats + p
        if not stats.codes:
            raise LabelError(
                f"labels {spec.path!r} have no labelled pixel where scene {profile.path!r} is valid"
                + (f" inside {area!r}" if area else "")
            )
        class_list = resolve_classes(spec, stats.codes, class_list)
        mean, std = stats.mean_std()
        labelled = sum(stats.codes.values())
        rng = np.random.default_rng(seed)
        anchors = stats.anchors[rng.permutation(len(stats.anchors))[:100_000]]
        steps = max(
            1, math.ceil((samples_per_epoch or max(256, 2 * labelled / window**2)) / batch_size)
        )
        cfg = EpochConfig(
            sample=SampleSpec(
                scene=str(Path(scene).resolve()) if Path(str(scene)).exists() else str(scene),
                bands=tuple(band_list),
                labels=spec,
                class_ids=tuple(c.id for c in class_list),
                mean=tuple(mean),
                std=tuple(std),
                window=window,
                within=area,
                bounds=bounds,
                anchors=anchors,
                augment=augment,
                nodata=nodata,
            ),
            arch=arch,
            arch_args=arch_args,
            num_classes=len(class_list),
            batch_size=batch_size,
            steps=steps,
            epochs=epochs,
            lr=lr,
            loss=loss,
            label_smoothing=label_smoothing,
            class_weights=_class_weights(stats.codes, class_list) if balance else None,
            seed=seed,
            device=device,
        )
        log.info(
            "train %s on %s: %d classes, %d labelled px, %d epochs of %d batches of %d x %d px",
            arch,
            profile.path,
            len(class_list),
            labelled,
            epochs,
            steps,
            batch_size,
            window,
        )
        history, state = [], None
        # every epoch on the same worker while it lives: its imports and caches stay warm
        home = sorted(client.scheduler_info()["workers"])[:1]
        with Progress("train", epochs, "epochs") as progress:
            for epoch in range(epochs):
                fut = client.submit(
                    train_epoch,
                    state,
                    cfg,
                    epoch,
                    pure=False,
                    workers=home,
                    allow_other_workers=True,
                )
                result: EpochResult = fut.result()
                state = result.state
                history.append({"epoch": epoch + 1, "loss": result.loss, "seconds": result.seconds})
                progress.update(note=f"loss {result.loss:.4f}")

    assert state is not None
    model = create_model(arch, len(band_list), len(class_list), **arch_args)
    model.load_state_dict(state["model"])
    model.eval()
    rf = receptive_field(model, len(band_list))
    # enough overlap that every pixel is predicted with its whole receptive field in one window;
    # models that see the whole window (attention, image pooling) get a quarter of it
    overlap = predict_window // 4 if rf is None else min(rf + rf % 2, predict_window // 2)
    names = [
        d or f"band {i}"
        for i, d in zip(band_list, [profile.descriptions[i - 1] for i in band_list])
    ]
    contract = Contract(
        arch=arch,
        arch_args=arch_args,
        bands=[BandInfo(i, n) for i, n in zip(band_list, names)],
        mean=mean,
        std=std,
        classes=list(class_list),
        window=predict_window,
        overlap=overlap,
        receptive_field=rf,
        crs=profile.crs.to_string() if profile.crs else None,
        pixel_size=profile.res,
        nodata=nodata if nodata is not None else profile.nodata,
        geoseg_version=__version__,
        training={
            "scene": str(scene),
            "labels": str(labels),
            "within": area,
            "window": window,
            "epochs": epochs,
            "batch_size": batch_size,
            "steps_per_epoch": steps,
            "lr": lr,
            "loss": loss,
            "augment": augment,
            "class_weights": cfg.class_weights,
            "class_pixels": {str(k): v for k, v in sorted(stats.codes.items())},
            "parameters": parameter_count(model),
            "history": history,
        },
    )
    digest = save_bundle(out, model, contract, overwrite=overwrite)
    log.info(
        "wrote %s (%s, receptive field %s, default overlap %d px)",
        out,
        arch,
        "the whole window" if rf is None else f"{rf} px",
        overlap,
    )
    return TrainResult(out, list(class_list), history, digest)
