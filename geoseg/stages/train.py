"""Training a segmentation model on Dask workers, data-parallel, into a bundle.

The client computes per-band statistics, label counts and the places to draw windows from with a
Dask reduction over blocks of every training scene, splits off validation pixels (a region, or a
share of blocks), then runs the epochs. Each epoch is one task per worker: the tasks join a
``torch.distributed`` process group (gloo on CPUs, NCCL on GPUs) through a rendezvous on a port
found free at run time, start from the previous epoch's weights and optimiser state, draw
different windows on every rank, average gradients, score the validation windows between them and
hand the new state back. The client writes a checkpoint and a log line after every epoch, so a
stopped run or a lost worker costs at most one epoch: ``--resume`` continues from the checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch
from rasterio.windows import Window

from geoseg import __version__
from geoseg.augment import PRESETS, build_augmenter
from geoseg.bundle import BandInfo, Contract, combine_bundles, save_bundle
from geoseg.catalog import expand_scenes, open_scene
from geoseg.classes import ClassInfo
from geoseg.cluster import run_tasks, scheduler_address, session, task_resources, workers_info
from geoseg.derive import add_derived, parse_derived, positions
from geoseg.errors import (
    AsCaller,
    BandMismatchError,
    ConfigError,
    GeosegError,
    Interrupted,
    LabelError,
    OutputExistsError,
    TrainingError,
    check_choice,
    check_range,
    option,
)
from geoseg.io import (
    SceneProfile,
    check_input,
    check_output,
    folders_for,
    read_scene,
    resolve_path,
    same_file,
    standardize,
)
from geoseg.labels import LabelSpec, check_labels, load_classes, resolve_classes
from geoseg.losses import make_loss
from geoseg.models import create_model, parameter_count, receptive_field
from geoseg.progress import Progress
from geoseg.scoring import scores
from geoseg.tasks.predict import resolve_device
from geoseg.tasks.sampling import (
    SAMPLERS,
    AnchorTable,
    BlockStats,
    SampleSpec,
    ValSplit,
    pixel_bounds,
)
from geoseg.tasks.train import (
    EpochConfig,
    EpochResult,
    free_port,
    fresh_model,
    stats_task,
    train_epoch,
)
from geoseg.tiling import MIN_WINDOW, block_windows
from geoseg.tuning import OverlapMeasure, effective_overlap

log = logging.getLogger("geoseg")


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train` wrote and how training went."""

    path: Path
    classes: list[ClassInfo]
    history: list[dict[str, Any]] = field(default_factory=list)
    bundle_hash: str = ""
    best_epoch: int = 0
    checkpoint: Path | None = None
    log: Path | None = None
    members: list[Path] = field(default_factory=list)
    """With ``members`` > 1: the members' own bundles, beside the ensemble."""


MEASURE_SIDE = 512
"""The crop the effective overlap is measured on, px (at most the scene)."""


def _measure_overlap(
    model: torch.nn.Module,
    profiles: Sequence[SceneProfile],
    val_windows: Sequence[tuple[int, Window]],
    bands: Sequence[int],
    stats: tuple[Sequence[float], Sequence[float]],
    nodata: float | None,
    window: int,
    rf: int | None,
    derived: tuple[tuple[int, int], ...] = (),
) -> OverlapMeasure:
    """The trained model's effective overlap (:func:`geoseg.tuning.effective_overlap`) on a
    crop of :data:`MEASURE_SIDE` px around the first validation block (held-out pixels), or
    the middle of the first scene without validation; fp32, in this process."""
    scene, block = val_windows[0] if val_windows else (0, None)
    p = profiles[scene]
    side = min(MEASURE_SIDE, p.height, p.width)
    if block is None:
        mid_r, mid_c = p.height // 2, p.width // 2
    else:
        mid_r = int(block.row_off + block.height // 2)
        mid_c = int(block.col_off + block.width // 2)
    r0 = min(max(0, mid_r - side // 2), p.height - side)
    c0 = min(max(0, mid_c - side // 2), p.width - side)
    data, valid = read_scene(p, Window(c0, r0, side, side), bands, nodata)
    image = standardize(add_derived(data, valid, derived), valid, stats[0], stats[1])

    def classes_of(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
            return np.asarray(model(x).argmax(1).numpy())

    step = max(1, int(getattr(model, "stride", 1)))
    exact = window // 2 if rf is None else -(-(rf + rf % 2) // step) * step
    return effective_overlap(classes_of, image, window, step, exact)


AUTO_WINDOW = 64
"""The training window when none is given (``window="auto"``), unless a training area is
smaller."""


def _auto_window(bounds: Sequence[Window], profiles: Sequence[SceneProfile]) -> int:
    """:data:`AUTO_WINDOW`, or for a training area smaller than that (a 100 px scene), the
    largest multiple of 16 px that fits in every one, with a log line saying so."""
    small = min(zip(bounds, profiles), key=lambda bp: min(bp[0].height, bp[0].width))
    side = int(min(small[0].height, small[0].width))
    window = min(AUTO_WINDOW, side // 16 * 16)
    if window < MIN_WINDOW:
        raise ConfigError(
            f"the training area of {small[1].path!r} is {int(small[0].width)} x "
            f"{int(small[0].height)} px, smaller than the smallest window ({MIN_WINDOW} px); "
            "train on a larger scene or area"
        )
    if window < AUTO_WINDOW:
        log.info(
            "window %d px: the training area of %s is %d x %d px, smaller than the default %d",
            window, small[1].path, int(small[0].width), int(small[0].height), AUTO_WINDOW,
        )  # fmt: skip
    return window


def _encoder_weights(
    path: str, arch: str, channels: int, arch_args: dict[str, Any]
) -> dict[str, torch.Tensor]:
    """The backbone's weights after loading ``path`` into it (checked and adapted here, before
    any work; :func:`geoseg.models.resnet.load_encoder_weights`), with a log line naming the
    keys that did not load."""
    from geoseg.models.resnet import load_encoder_weights

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a pickle with code in it, or not a torch file at all
        raise ConfigError(
            f"encoder weights {path!r} could not be read as a plain state dict ({exc}); save "
            "them with torch.save(model.state_dict(), path)",
            filename=path,
        ) from None
    if not isinstance(state, dict):
        raise ConfigError(f"encoder weights {path!r} hold no state dict", filename=path)
    model = create_model(arch, channels, 2, **arch_args)
    missing, unexpected = load_encoder_weights(model, state, source=f"encoder weights {path!r}")
    log.info(
        "loaded encoder weights %s: %d backbone tensors%s%s",
        path,
        len(model.backbone.state_dict()) - len(missing),  # type: ignore[union-attr]
        f"; not in the weights (trained from scratch): {', '.join(missing)}" if missing else "",
        f"; in the weights but not the backbone (ignored): {', '.join(unexpected)}"
        if unexpected
        else "",
    )
    return dict(model.backbone.state_dict())  # type: ignore[union-attr]


def _initial_state(cfg: EpochConfig, encoder: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The first epoch's starting state: the model and optimiser every rank would build
    (:func:`geoseg.tasks.train.fresh_model`), with the encoder weights in its backbone."""
    model, opt = fresh_model(cfg, 0)
    model.backbone.load_state_dict(encoder)  # type: ignore[union-attr]
    return {"model": model.state_dict(), "optimizer": opt.state_dict()}


def _class_weights(counts: dict[int, int], classes: Sequence[ClassInfo]) -> tuple[float, ...]:
    """Inverse square-root frequency, scaled to a median of 1 and clipped to [0.2, 5]."""
    freq = np.array([max(counts.get(c.id, 0), 1) for c in classes], dtype=np.float64)
    w = 1.0 / np.sqrt(freq)
    w = np.clip(w / np.median(w), 0.2, 5.0)
    return tuple(float(v) for v in w)


def _scene_pairs(scenes: Any, labels: Any) -> list[tuple[str, str]]:
    """``(scene, labels)`` pairs from one scene and its labels, or from a list of pairs."""
    if isinstance(scenes, (str, os.PathLike)):
        if not isinstance(labels, (str, os.PathLike)):
            raise ConfigError(
                f"scene {str(scenes)!r} needs its labels: a class raster or a vector file, "
                f"got {labels!r}"
            )
        return [(str(scenes), str(labels))]
    pairs = list(scenes)
    if labels is not None or not pairs or not all(_is_pair(p) for p in pairs):
        raise ConfigError(
            "several scenes are given as a list of (scene, labels) pairs, with labels=None: "
            f"got scenes={scenes!r}, labels={labels!r}"
        )
    return [(str(s), str(lb)) for s, lb in pairs]


def _is_pair(item: Any) -> bool:
    return (
        isinstance(item, (tuple, list))
        and len(item) == 2
        and all(isinstance(x, (str, os.PathLike)) for x in item)
    )


def _training_scene(scene: Any) -> SceneProfile:
    """One training scene: a raster, band files joined by commas, or one STAC item (all its
    data assets, named by their keys)."""
    refs = expand_scenes([scene])
    if len(refs) != 1:
        raise ConfigError(
            f"training scene {str(scene)!r} holds {len(refs)} scenes; give each scene with its "
            "own labels"
        )
    return open_scene(refs[0])


def split_cell(window: int) -> int:
    """The side of the squares that statistics are gathered on and a validation fraction is
    split by: the smallest multiple of the training window that is at least 256 px."""
    return window * max(1, -(-256 // window))


def _split_fraction(
    parts: list[BlockStats], fraction: float, seed: int
) -> tuple[list[BlockStats], set[int]]:
    """Give whole blocks to validation, in a seeded random order, until they hold ``fraction``
    of the labelled pixels; return the blocks' statistics after the split and the indexes of
    the validation blocks."""
    labelled = np.array([sum(p.codes.values()) for p in parts], dtype=np.float64)
    total = labelled.sum()
    chosen: set[int] = set()
    got = 0.0
    for i in np.random.default_rng(seed).permutation(len(parts)):
        if got >= fraction * total:
            break
        if labelled[i] > 0:
            chosen.add(int(i))
            got += labelled[i]
    if got >= total:
        raise LabelError(
            f"{option('--val-fraction', fraction)} left no labelled block for training; lower it "
            f"or use {option('--val-region', None)}"
        )
    return [p.to_validation() if i in chosen else p for i, p in enumerate(parts)], chosen


def _checkpoint_meta(cfg: EpochConfig, classes: Sequence[ClassInfo]) -> dict[str, Any]:
    """What a checkpoint must share with the run that resumes it."""
    return {
        "arch": cfg.arch,
        "arch_args": cfg.arch_args,
        "bands": list(cfg.specs[0].bands),
        "classes": [c.id for c in classes],
        "window": cfg.specs[0].window,
        "scenes": [s.scene.path for s in cfg.specs],
        "epochs": cfg.epochs,
    }


def _read_checkpoint(path: str) -> dict[str, Any]:
    """A checkpoint, loaded as bundles are (plain data only: ``weights_only``), before any
    work is done."""
    ckpt_path = check_input(path, "checkpoint")
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if not isinstance(ckpt, dict) or not {"meta", "state", "epoch"} <= set(ckpt):
            raise ValueError("not a geoseg checkpoint")
    except Exception as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(
            f"checkpoint {str(path)!r} could not be read ({reason[:200]}); pass a file that "
            "geoseg train wrote beside its bundle (NAME.bundle.checkpoint)"
        ) from None
    return dict(ckpt)


def _check_checkpoint(ckpt: dict[str, Any], path: str, meta: dict[str, Any]) -> None:
    """Refuse to resume a checkpoint of a run with other settings, naming each that differs."""
    theirs = ckpt["meta"]
    differ = sorted(k for k in meta if theirs.get(k) != meta[k])
    if differ:
        raise ConfigError(
            f"checkpoint {path!r} was written by a run with other settings: "
            + "; ".join(f"{k} {theirs.get(k)!r} there, {meta[k]!r} now" for k in differ)
            + f"; resume with the same settings, or start again without {option('--resume', None)}"
        )


def _write_log(path: Path, history: list[dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in history))
    os.replace(tmp, path)


def _save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def _run_epoch(
    client: Any,
    workers: list[str],
    state: Any,
    cfg: EpochConfig,
    epoch: int,
    checkpoint: Path,
    done: int,
) -> list[EpochResult]:
    """One epoch, one task per worker; a lost worker or a failed rank stops the run with a
    message that names the checkpoint to resume from."""
    from distributed import wait

    world = len(workers)
    resume = (
        f"continue with {option('--resume', str(checkpoint))} (epoch {done} finished)"
        if done
        else "no epoch had finished, so start again"
    )

    def check_workers() -> None:
        lost = [w for w in workers if w not in workers_info(client)]
        if lost:
            raise TrainingError(f"worker {lost[0]} was lost during epoch {epoch + 1}; {resume}")

    check_workers()
    rendezvous = None
    if world > 1:
        host = urlparse(workers[0]).hostname
        try:
            port = client.run(free_port, workers=[workers[0]])[workers[0]]
        except Exception:  # a worker that cannot answer is lost
            check_workers()
            raise
        rendezvous = f"tcp://{host}:{port}"
    # each rank's task carries the weights and optimiser state (tens of MB for a U-Net): Dask
    # warns of a large graph, which is what this is. Scattering them first was tried and can hang
    # when a worker has died but the scheduler has not yet noticed (the lost-worker test).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sending large graph")
        futures = [
            client.submit(
                AsCaller(train_epoch),
                state,
                cfg,
                epoch,
                rank,
                world,
                rendezvous,
                workers=[w],
                allow_other_workers=False,
                resources=task_resources(client, cfg.device),
                pure=False,
                key=f"train-epoch-{epoch + 1}-rank-{rank}-{os.urandom(4).hex()}",
            )
            for rank, w in enumerate(workers)
        ]
    try:
        while True:
            try:
                wait(
                    [f for f in futures if f.status == "pending"],
                    timeout=1.0,
                    return_when="FIRST_COMPLETED",
                )
            except TimeoutError:
                pass
            except Exception as exc:  # futures cancelled: their data went with a lost worker
                time.sleep(2.0)
                check_workers()
                raise TrainingError(f"epoch {epoch + 1} failed: {exc}; {resume}") from None
            failed = [f for f in futures if f.status == "error"]
            if failed:  # a rank whose peer died fails first: give the
                time.sleep(2.0)  # scheduler a moment to notice the lost worker
            check_workers()
            if failed:
                errors = [f.exception() for f in failed]
                own = [e for e in errors if isinstance(e, GeosegError)]
                detailed = [e for e in own if "windows:" in str(e)]
                if detailed or own:
                    raise (detailed or own)[0]
                raise TrainingError(f"epoch {epoch + 1} failed: {errors[0]}; {resume}")
            if all(f.status == "finished" for f in futures):
                return [f.result() for f in futures]
    finally:
        for f in futures:
            f.cancel()


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """The settings of a training run, checked once when made (a bad value raises
    :class:`ConfigError`); :func:`train` documents each. Paths are as given; :func:`train`
    resolves them before the run."""

    label_field: str | None = None
    classes: str | os.PathLike[str] | Sequence[Any] | None = None
    ignore: Sequence[int] = ()
    bands: Sequence[int] | None = None
    band_names: Sequence[str] | None = None
    derive: str | Sequence[str] | None = None
    arch: str = "unet"
    arch_args: dict[str, Any] | None = None
    window: int | str = "auto"
    predict_window: int = 256
    epochs: int = 10  # measured: NC and SpaceNet (benchmarks/README)
    batch_size: int = 16
    samples_per_epoch: int | None = None
    lr: float = 2e-3
    loss: str = "ce+lovasz"  # measured: NC mIoU 0.304 over 5 seeds against 0.294 for ce
    label_smoothing: float = 0.0
    augment: str = "light"
    balance: bool = False  # measured: class weights cost NC 0.03 mIoU (benchmarks/README)
    sampler: str = "balanced"  # measured: finds SpaceNet's buildings, NC as before
    within: str | os.PathLike[str] | None = None
    val_region: str | os.PathLike[str] | None = None
    val_fraction: float | None = None
    val_seed: int | None = None
    nodata: float | None = None
    seed: int = 0
    device: str = "auto"
    init_weights: str | os.PathLike[str] | None = None
    members: int = 1

    def __post_init__(self) -> None:
        if self.window != "auto":
            if not isinstance(self.window, int):
                raise ConfigError(
                    f"{option('--window', None)} must be a number of pixels or auto, "
                    f"got {self.window!r}"
                )
            check_range("--window", self.window, MIN_WINDOW)
        check_range("--predict-window", self.predict_window, MIN_WINDOW)
        check_range("--epochs", self.epochs, 1)
        check_range("--batch-size", self.batch_size, 1)
        check_range("--samples-per-epoch", self.samples_per_epoch, 1)
        check_range("--label-smoothing", self.label_smoothing, 0, 0.99)
        check_range("--members", self.members, 1)
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(
                f"{option('--lr', None)} must be a positive number such as 0.002, got {self.lr}"
            )
        check_choice("sampler", self.sampler, SAMPLERS)
        if self.val_region is not None and self.val_fraction is not None:
            raise ConfigError(
                f"give {option('--val-region', None)} or {option('--val-fraction', None)}, not both"
            )
        if self.val_seed is not None and self.val_fraction is None:
            raise ConfigError(
                f"{option('--val-seed', None)} draws the {option('--val-fraction', None)} "
                f"split; give {option('--val-fraction', None)} too, or leave out "
                f"{option('--val-seed', None)}"
            )
        if self.val_fraction is not None and not 0 < self.val_fraction < 1:
            raise ConfigError(
                f"{option('--val-fraction', None)} must lie between 0 and 1, got {self.val_fraction}"
            )
        make_loss(self.loss)  # the names, before any work
        parse_derived(self.derive)

    @property
    def split_seed(self) -> int:
        """The seed the ``val_fraction`` blocks are drawn with."""
        return self.seed if self.val_seed is None else self.val_seed


_D = TrainConfig  # the defaults of train()'s keywords: one place


@dataclass
class TrainingPlan:
    """What the statistics pass decided: the epoch configuration, the classes, the summed
    statistics of the training scenes and the workers that will train."""

    cfg: EpochConfig
    classes: list[ClassInfo]
    stats: BlockStats
    workers: list[str]


def plan_training(
    client: Any,
    profiles: Sequence[SceneProfile],
    label_specs: Sequence[LabelSpec],
    band_list: Sequence[int],
    config: TrainConfig,
    classes: Sequence[ClassInfo] | None = None,
    derived: tuple[tuple[int, int], ...] = (),
) -> TrainingPlan:
    """Gather statistics over every block of every scene on the cluster, split off the
    validation pixels and describe the epochs (``config``'s paths resolved; ``classes``: the
    class list, default from the labels; ``derived``: where each derived band's two bands are
    among ``band_list``, :func:`geoseg.derive.positions`)."""
    c = config
    area = None if c.within is None else str(c.within)
    region = None if c.val_region is None else str(c.val_region)
    window, val_fraction, nodata = c.window, c.val_fraction, c.nodata
    if not isinstance(window, int):
        raise ConfigError("plan_training needs the window resolved (train() resolves 'auto')")
    arch_args = dict(c.arch_args or {})
    cell = split_cell(window)
    bounds = [pixel_bounds(p, area) for p in profiles]
    class_list = list(classes) if classes is not None else None
    items = [
        (i, blk) for i, p in enumerate(profiles) for blk in block_windows(p.height, p.width, cell)
    ]
    parts = run_tasks(
        client,
        stats_task,
        items,
        "statistics",
        list(profiles),
        tuple(band_list),
        label_specs,
        area,
        nodata,
        region,
        window,
        derived,
    )
    val_cells: list[set[tuple[int, int]]] = [set() for _ in profiles]
    if val_fraction is not None:
        parts, chosen = _split_fraction(parts, val_fraction, c.split_seed)
        for i in chosen:
            scene, blk = items[i]
            val_cells[scene].add((int(blk.row_off) // cell, int(blk.col_off) // cell))
    total = parts[0]
    for p in parts[1:]:
        total = total + p
    codes = {**total.val_codes}
    for k, v in total.codes.items():
        codes[k] = codes.get(k, 0) + v
    if not total.codes:
        raise LabelError(
            f"labels {', '.join(repr(s.path) for s in label_specs)} have no labelled training "
            "pixel where the scenes are valid"
            + (f" inside {area!r}" if area else "")
            + (" outside the validation pixels" if region or val_fraction else "")
        )
    class_list = resolve_classes(label_specs[0], codes, class_list)
    mean, std = total.mean_std()
    labelled = sum(total.codes.values())
    table = AnchorTable(
        anchors=np.concatenate(
            [
                np.column_stack([np.full(len(p.anchors), s), p.anchors])
                for (s, _), p in zip(items, parts)
            ]
        ).astype(np.int32),
        weights=np.concatenate([p.weights for p in parts]),
        cells=np.unique(
            np.concatenate(
                [
                    np.column_stack([np.full(len(p.cells), s), p.cells])
                    for (s, _), p in zip(items, parts)
                ]
            ).astype(np.int32),
            axis=0,
        ),
    )
    val_windows = tuple((s, blk) for (s, blk), p in zip(items, parts) if p.val_codes)
    if (region or val_fraction) and not val_windows:
        raise LabelError("the validation split holds no labelled pixel; choose another region")
    splits = [
        ValSplit(region=region, cell=cell)
        if region
        else ValSplit(cell=cell, cells=frozenset(cs))
        if val_fraction is not None
        else None
        for cs in val_cells
    ]
    worker_list = sorted(workers_info(client))
    world = len(worker_list)
    per_epoch = c.samples_per_epoch or max(256, round(2 * labelled / window**2))
    cfg = EpochConfig(
        specs=tuple(
            SampleSpec(
                scene=profile,
                bands=tuple(band_list),
                derived=derived,
                labels=spec,
                class_ids=tuple(c.id for c in class_list),
                mean=tuple(mean),
                std=tuple(std),
                window=window,
                within=area,
                bounds=b,
                augment=c.augment,
                nodata=nodata,
                val=split,
            )
            for profile, spec, b, split in zip(profiles, label_specs, bounds, splits)
        ),
        table=table,
        sampler=c.sampler,
        val_windows=val_windows,
        arch=c.arch,
        arch_args=arch_args,
        num_classes=len(class_list),
        batch_size=c.batch_size,
        steps=max(1, math.ceil(per_epoch / (c.batch_size * world))),
        epochs=c.epochs,
        lr=c.lr,
        loss=c.loss,
        label_smoothing=c.label_smoothing,
        class_weights=_class_weights(total.codes, class_list) if c.balance else None,
        seed=c.seed,
        device=c.device,
    )
    return TrainingPlan(cfg, class_list, total, worker_list)


def beside(bundle: Path) -> tuple[Path, Path]:
    """The files training writes beside ``bundle``: its checkpoint and its log."""
    return (
        bundle.with_name(bundle.name + ".checkpoint"),
        bundle.with_name(bundle.name + ".log.jsonl"),
    )


def member_path(output: Path, k: int) -> Path:
    """Where member ``k`` (from 1) of the ensemble ``output`` is written: ``NAME.memberK.bundle``."""
    return output.with_name(f"{output.stem}.member{k}{output.suffix}")


def _train_members(
    given: dict[str, Any], config: TrainConfig, out: Path, inputs: list[Any], resume: str | None
) -> TrainResult:
    """:func:`train` with ``members`` > 1 (``given``: its arguments, ``config`` their checked
    settings, ``out`` its checked output, ``inputs`` the files it reads, ``resume`` the resolved
    checkpoint): each member trained in turn on one cluster, then combined into ``out``."""
    n, seed, overwrite = config.members, config.seed, given["overwrite"]
    paths = [member_path(out, k) for k in range(1, n + 1)]
    side = [beside(p) for p in paths]
    first = 0
    if resume is not None:
        first = next((i for i, (c, _) in enumerate(side) if same_file(c, resume)), -1)
        if first < 0:
            raise ConfigError(
                f"checkpoint {str(resume)!r} is not one of this ensemble's members'; with "
                f"{option('--members', n)} and -o {out.name} they are "
                f"{side[0][0].name} to {side[-1][0].name}: resume the member that stopped"
            )
        missing = [str(p) for p in paths[:first] if not p.exists()]
        if missing:
            raise ConfigError(
                f"member bundle {missing[0]!r}, trained before the member being resumed, is "
                f"missing; train the ensemble again with {option('--overwrite')}"
            )
    # every file the members will write, checked before the first is trained
    for i in range(first, n):
        resuming = i == first and resume is not None
        check_output(paths[i], overwrite, inputs=inputs, what="member bundle")
        for p, what in zip(side[i], ("checkpoint", "training log")):
            check_output(p, overwrite or resuming, inputs=inputs, what=f"member {what}")
    args = {k: v for k, v in given.items() if k not in ("client", "workers", "scheduler")}
    results = []
    with session(
        given["workers"], given["scheduler"], client=given["client"], gpu=config.device != "cpu"
    ) as client:
        for i in range(first, n):
            log.info("member %d of %d (seed %d)", i + 1, n, seed + i)
            resumed = resume if i == first else None
            one = {**args, "output": paths[i], "seed": seed + i, "members": 1, "resume": resumed}
            if config.val_fraction is not None:  # one split for every member
                one["val_seed"] = config.split_seed
            results.append(train(**one, client=client))
    made = combine_bundles(list(paths), out, overwrite=overwrite)
    log.info("%s: an ensemble of %d members (%s)", out, n, ", ".join(p.name for p in paths))
    last = results[-1]
    return TrainResult(
        out, last.classes, last.history, made.hash, last.best_epoch, last.checkpoint,
        last.log, members=paths,
    )  # fmt: skip


def train(
    scenes: str
    | os.PathLike[str]
    | Sequence[tuple[str | os.PathLike[str], str | os.PathLike[str]]],
    labels: str | os.PathLike[str] | None,
    output: str | os.PathLike[str],
    *,
    label_field: str | None = _D.label_field,
    classes: str | os.PathLike[str] | Sequence[Any] | None = _D.classes,
    ignore: Sequence[int] = _D.ignore,
    bands: Sequence[int] | None = _D.bands,
    band_names: Sequence[str] | None = _D.band_names,
    derive: str | Sequence[str] | None = _D.derive,
    arch: str = _D.arch,
    arch_args: dict[str, Any] | None = _D.arch_args,
    window: int | str = _D.window,
    predict_window: int = _D.predict_window,
    epochs: int = _D.epochs,
    batch_size: int = _D.batch_size,
    samples_per_epoch: int | None = _D.samples_per_epoch,
    lr: float = _D.lr,
    loss: str = _D.loss,
    label_smoothing: float = _D.label_smoothing,
    augment: str = _D.augment,
    balance: bool = _D.balance,
    sampler: str = _D.sampler,
    within: str | os.PathLike[str] | None = _D.within,
    val_region: str | os.PathLike[str] | None = _D.val_region,
    val_fraction: float | None = _D.val_fraction,
    val_seed: int | None = _D.val_seed,
    nodata: float | None = _D.nodata,
    seed: int = _D.seed,
    device: str = _D.device,
    init_weights: str | os.PathLike[str] | None = _D.init_weights,
    members: int = _D.members,
    resume: str | os.PathLike[str] | None = None,
    client: Any = None,
    workers: int | None = None,
    scheduler: str | None = None,
    overwrite: bool = False,
) -> TrainResult:
    """Train ``arch`` on ``scenes`` with their ``labels`` and write a bundle to ``output``.

    Parameters
    ----------
    scenes, labels
        One training scene (a path or GDAL URL) and its labels: a class raster on the scene's
        grid, or a vector file whose ``label_field`` holds codes. For several scenes, ``scenes``
        is a list of ``(scene, labels)`` pairs and ``labels`` is ``None``.
    output
        The bundle to write. Beside it: ``NAME.checkpoint`` (after every epoch) and
        ``NAME.log.jsonl`` (a line per epoch).
    classes
        A YAML class list file, or a list of ClassInfo or ``{id, name, color}`` mappings;
        default: the label raster's class metadata, else one class per code found.
    ignore
        Label codes that mean "unlabelled".
    bands
        1-based scene band indexes the model reads, in order; default all.
    band_names
        The names the bundle records for those bands, by which a STAC item's assets are found
        when predicting; default: the scene's band descriptions, a STAC item's asset keys, else
        ``band N``.
    derive
        Derived bands the model reads after ``bands``: normalised differences ``NAME=A,B``,
        ``(A - B) / (A + B)`` of two bands by name or number (``ndvi=nir,red``; several as a
        list or joined by ``;``). Recorded in the bundle and computed on the workers, in
        training and in prediction (:mod:`geoseg.derive`).
    window, predict_window
        Training window (``"auto"``: :data:`AUTO_WINDOW` px, or the largest multiple of 16 px
        that fits the smallest training area when that is smaller), and the default window
        stored for prediction.
    batch_size
        Windows per step on each worker (the step's batch is this times the workers).
    epochs
        Passes of the sampler, each of ``samples_per_epoch`` windows, under one cosine decay of
        the learning rate. 10 by default: on the NC scene's held-out east, three seeds each,
        10 epochs gave mIoU 0.290-0.297 (mean 0.294) in 73 s, 20 epochs 0.261-0.297 (mean
        0.283) in 140 s, 6 epochs mean 0.287; on SpaceNet 20 epochs scored higher (0.619-0.632
        against 0.589-0.590), both beating a random forest's 0.483.
    loss, label_smoothing
        Loss names joined by ``+`` with optional weights (``ce+0.5*dice``); cross-entropy label
        smoothing. ``ce+lovasz`` by default (cross-entropy plus the Lovasz-softmax surrogate of
        IoU): on NC's held-out east at 10 epochs, five seeds each, mIoU 0.290-0.316 (mean
        0.304) against 0.288-0.301 (mean 0.294) for ``ce`` alone, accuracy 0.721-0.728 against
        0.734-0.740; on SpaceNet 0.605-0.621 against 0.589-0.590.
    augment
        ``none``, ``light``, ``strong``, or a YAML pipeline file (see :mod:`geoseg.augment`).
    balance
        Weight the loss by inverse square-root class frequency. Off by default: on the NC
        scene's held-out east, three seeds each, the weighted loss gave mIoU 0.242-0.266 and
        accuracy 0.672-0.708, the plain loss 0.270-0.295 and 0.732-0.738 (the rare classes'
        false alarms cost more than they win).
    sampler
        ``balanced`` (the default: windows around labelled pixels, each class equally likely),
        ``random`` (each labelled pixel equally likely) or ``grid`` (every labelled cell of a
        window-size grid, shuffled). Balanced by default: on SpaceNet's Atlanta tile (buildings
        4 % of the pixels) the random sampler's U-Net found no building (mIoU 0.483, a tie
        with a random forest), the balanced one 0.632 and 0.619 over two seeds (accuracy 0.973
        against the forest's 0.967); on NC's held-out east, three seeds each, 0.261-0.297
        (mean 0.283) against 0.270-0.295 (mean 0.285).
    within
        A polygon file: windows lie wholly inside it, statistics are computed inside it.
    val_region, val_fraction, val_seed
        Validation pixels: those inside the polygons of ``val_region``, or whole blocks of
        :func:`split_cell` px holding ``val_fraction`` of the labelled pixels, drawn with
        ``val_seed`` (default: ``seed``; runs of several seeds compare on one split with one
        ``val_seed``, and the members of an ensemble share their first seed's). No training
        window touches a validation pixel. With validation, the bundle holds the epoch with the
        best validation mIoU; without, the last epoch.
    nodata
        The scenes' fill value, where they do not declare one; stored in the bundle.
    init_weights
        A ResNet state dict in the torchvision/timm layout (ImageNet, SSL4EO-S12 and other
        published ResNets) loaded into DeepLabV3+'s backbone before the first epoch (with
        ``arch_args={"backbone": "resnet50"}`` or the ResNet the weights are); the first
        convolution is adapted to the band count, and the keys that did not load are logged.
    members
        Train this many models, with seeds ``seed``, ``seed + 1``, ..., each written beside
        ``output`` as ``NAME.memberK.bundle`` (with its checkpoint and log), and write to
        ``output`` the bundle that predicts their mean class probabilities
        (:func:`geoseg.bundle.combine_bundles`). Every window then runs every member. On NC's
        held-out east every pair of the default seeds 0-4 scored mIoU 0.308-0.324 and every
        triple 0.317-0.330, but seeds 7 and 8 together 0.289 and 7-9 0.292; one model scored
        0.274-0.316 over ten seeds (benchmarks/README.md).
    resume
        A checkpoint of an earlier run with the same settings: training continues after its
        last finished epoch. With ``members``, a member's checkpoint: the members before it
        are taken as written, the ones after it are trained.
    client, workers, scheduler
        Where to train (see :func:`geoseg.cluster.session`): a ``distributed.Client``, a local
        cluster of ``workers`` processes or a running scheduler's address; by default the
        current client, else a local cluster made for the call. Every worker of the cluster is
        one rank.

    Returns
    -------
    TrainResult
    """
    given = dict(locals())
    config = TrainConfig(**{f.name: given[f.name] for f in fields(TrainConfig)})  # checks them
    # every path is resolved here: workers may run in other folders, or on other machines
    pairs = _scene_pairs(scenes, labels)
    # scenes may be band files or STAC items: each is opened (headers only) here
    profiles = [_training_scene(s) for s, _ in pairs]
    scene_list = [p.path for p in profiles]
    label_list = [resolve_path(lb) for _, lb in pairs]
    if device != "cuda" or (client is None and not scheduler_address(scheduler, workers)):
        resolve_device(device)  # a local cluster: no GPU for --device cuda fails here
    area = resolve_path(within) if within is not None else None
    region = resolve_path(val_region) if val_region is not None else None
    ckpt_in = resolve_path(resume) if resume is not None else None
    classes_file = resolve_path(classes) if isinstance(classes, (str, os.PathLike)) else None
    augment_file = None if augment in PRESETS else resolve_path(augment)
    files = [f for p in profiles for f in p.files]
    weights_in = resolve_path(init_weights) if init_weights is not None else None
    inputs = [*files, *label_list, area, region, classes_file, augment_file, weights_in]
    ckpt = _read_checkpoint(ckpt_in) if ckpt_in is not None else None
    out = check_output(output, overwrite, inputs=[*inputs, ckpt_in], what="bundle")
    if members > 1:
        return _train_members(given, config, out, inputs, ckpt_in)
    ckpt_path, log_path = beside(out)
    # resuming rewrites the checkpoint it resumes and the log beside it; nothing else
    resuming = ckpt_in is not None and same_file(ckpt_path, ckpt_in)
    try:
        check_output(ckpt_path, overwrite or resuming, inputs=inputs, what="checkpoint")
    except OutputExistsError:
        raise OutputExistsError(
            f"checkpoint {str(ckpt_path)!r} of an earlier run exists; continue that run with "
            f"{option('--resume', str(ckpt_path))}, or pass {option('--overwrite')} to start again",
            filename=str(ckpt_path),
        ) from None
    check_output(log_path, overwrite or resuming, inputs=inputs, what="training log")
    for path in (area, region):
        if path is not None:
            check_input(path, "area" if path == area else "validation region")
    band_list = list(bands) if bands else list(range(1, profiles[0].count + 1))
    if band_names is not None and len(band_names) != len(band_list):
        raise ConfigError(
            f"{option('--band-names', None)} names {len(band_names)} bands, the model reads "
            f"{len(band_list)} ({band_list}); give one name per band"
        )
    for profile in profiles:
        bad = [b for b in band_list if not 1 <= b <= profile.count]
        if bad:
            raise BandMismatchError(
                f"scene {profile.path!r} has bands 1-{profile.count}; the model reads bands "
                f"{band_list}; pass {option('--bands', None)} with bands every scene has",
                filename=profile.path,
                expected=band_list,
                found=profile.count,
            )
    if augment_file is not None:  # a pipeline file: workers need its absolute path
        augment = augment_file
    label_specs = [
        check_labels(LabelSpec(lb, label_field, tuple(ignore)), profile)
        for lb, profile in zip(label_list, profiles)
    ]
    class_list = load_classes(classes) if classes is not None else None
    bounds = [pixel_bounds(p, area) for p in profiles]
    if window == "auto":
        window = _auto_window(bounds, profiles)
        config = replace(config, window=window)
    assert isinstance(window, int)
    build_augmenter(augment, window)
    for b, p in zip(bounds, profiles):
        if b.height < window or b.width < window:
            raise ConfigError(
                f"window {window} px is larger than the training area of {p.path!r} "
                f"({b.width} x {b.height} px); pass a smaller {option('--window', None)}"
            )
    descriptions = profiles[0].descriptions
    names = list(band_names or [descriptions[i - 1] or f"band {i}" for i in band_list])
    derived = parse_derived(derive)
    derived_at = positions(derived, names, band_list)
    channels = len(band_list) + len(derived)
    arch_args = dict(arch_args or {})
    create_model(arch, channels, 2, **arch_args)  # validate architecture arguments early
    encoder = None
    if weights_in is not None:
        check_input(weights_in, "encoder weights")
        encoder = _encoder_weights(weights_in, arch, channels, arch_args)
    with folders_for(out):
        with session(workers, scheduler, client=client, gpu=device != "cpu") as client:
            resolved = replace(
                config, within=area, val_region=region, augment=augment, arch_args=arch_args
            )
            plan = plan_training(
                client, profiles, label_specs, band_list, resolved, class_list, derived=derived_at
            )
            cfg, class_list, total, worker_list = plan.cfg, plan.classes, plan.stats, plan.workers
            world = len(worker_list)
            labelled = sum(total.codes.values())
            val_windows = cfg.val_windows
            mean, std = list(cfg.specs[0].mean), list(cfg.specs[0].std)
            meta = _checkpoint_meta(cfg, class_list)
            history: list[dict[str, Any]] = []
            state: dict[str, Any] | None = None
            best: dict[str, Any] | None = None  # epoch, miou, model weights
            start = 0
            if encoder is not None and ckpt is None:
                state = _initial_state(cfg, encoder)
            if ckpt is not None:
                _check_checkpoint(ckpt, str(resume), meta)
                state, history, best = ckpt["state"], ckpt["history"], ckpt["best"]
                start = int(ckpt["epoch"])
                log.info("resuming from %s after epoch %d", resume, start)
            log.info(
                "train %s on %d scene(s): %d classes, %d labelled training px%s, %d workers, "
                "%d epochs of %d steps x %d windows x %d px on each worker, sampler %s",
                arch,
                len(cfg.specs),
                len(class_list),
                labelled,
                f", {sum(total.val_codes.values())} validation px" if val_windows else "",
                world,
                epochs,
                cfg.steps,
                batch_size,
                window,
                sampler,
            )
            finished = start
            try:
                with Progress("train", epochs - start, "epochs") as progress:
                    for epoch in range(start, epochs):
                        results = _run_epoch(
                            client, worker_list, state, cfg, epoch, ckpt_path, epoch
                        )
                        first = results[0]
                        state = first.state
                        assert state is not None
                        row: dict[str, Any] = {
                            "epoch": epoch + 1,
                            "loss": round(first.loss, 6),
                            "seconds": round(max(r.seconds for r in results), 3),
                            "windows": sum(r.windows for r in results),
                            "lr": cfg.lr * 0.5 * (1 + math.cos(math.pi * epoch / epochs)),
                        }
                        note = f"loss {first.loss:.4f}"
                        if first.confusion is not None:
                            sc = scores(first.confusion, class_list)
                            row.update(
                                val_loss=round(first.val_loss or 0.0, 6),
                                val_miou=sc.miou,
                                val_accuracy=sc.overall_accuracy,
                                val_iou=sc.iou_by_name(),
                            )
                            note += f" val loss {first.val_loss:.4f} mIoU {sc.miou or 0.0:.3f}"
                            better = best is None or (sc.miou or 0.0) > best["miou"]
                        else:
                            better = True  # no validation: the last epoch is the one kept
                        if better:
                            best = {
                                "epoch": epoch + 1,
                                "miou": row.get("val_miou") or 0.0,
                                "model": state["model"],
                            }
                        history.append(row)
                        _save_checkpoint(
                            ckpt_path,
                            {
                                "epoch": epoch + 1,
                                "state": state,
                                "history": history,
                                "best": best,
                                "meta": meta,
                            },
                        )
                        # the log holds the checkpoint's history, then a line per epoch, and is written
                        # only once an epoch is done (a run that fails first leaves none)
                        _write_log(log_path, history)
                        finished = epoch + 1
                        progress.update(note=note)

            except KeyboardInterrupt:
                raise Interrupted(
                    f"epoch {finished} of {epochs} finished; continue with the same command and "
                    f"--resume {ckpt_path}"
                    if finished
                    else "no epoch had finished, so nothing was kept"
                ) from None

        assert best is not None
        model = create_model(arch, channels, len(class_list), **arch_args)
        model.load_state_dict(best["model"])
        model.eval()
        rf = receptive_field(model, channels)
        # enough overlap that every pixel is predicted with its whole receptive field in one window;
        # models that see the whole window (attention, image pooling) get a quarter of it
        overlap = predict_window // 4 if rf is None else min(rf + rf % 2, predict_window // 2)
        measured = _measure_overlap(
            model,
            profiles,
            val_windows,
            band_list,
            (mean, std),
            nodata,
            predict_window,
            rf,
            derived_at,
        )
        best_row = next(h for h in history if h["epoch"] == best["epoch"])
        contract = Contract(
            arch=arch,
            arch_args=arch_args,
            bands=[BandInfo(i, n) for i, n in zip(band_list, names)],
            derived=[asdict(d) for d in derived],
            mean=mean,
            std=std,
            classes=list(class_list),
            window=predict_window,
            overlap=overlap,
            receptive_field=rf,
            effective_overlap=measured.overlap,
            crs=profiles[0].crs.to_string() if profiles[0].crs else None,
            pixel_size=profiles[0].res,
            nodata=nodata if nodata is not None else profiles[0].nodata,
            geoseg_version=__version__,
            training={
                "scenes": scene_list,
                "labels": label_list,
                "within": area,
                "validation": {
                    "region": region,
                    "fraction": val_fraction,
                    "seed": config.split_seed if val_fraction else None,
                    "cell": split_cell(window),
                }
                if val_windows
                else None,
                "sampler": sampler,
                "window": window,
                "epochs": epochs,
                "best_epoch": best["epoch"],
                "best": {k: v for k, v in best_row.items() if k.startswith("val_")},
                "workers": world,
                "batch_size": batch_size,
                "steps_per_epoch": cfg.steps,
                "lr": lr,
                "loss": loss,
                "augment": augment,
                "class_weights": cfg.class_weights,
                "class_pixels": {str(k): v for k, v in sorted(total.codes.items())},
                "validation_pixels": {str(k): v for k, v in sorted(total.val_codes.items())},
                "parameters": parameter_count(model),
                "history": history,
                "effective_overlap": {
                    "window": measured.window,
                    "crop": list(measured.crop),
                    "held_out": bool(val_windows),
                    "differing_share": {str(k): v for k, v in sorted(measured.shares.items())},
                },
            },
        )
        digest = save_bundle(out, model, contract, overwrite=overwrite)
        log.info(
            "%s: kept epoch %d of %d; receptive field %s, default overlap %d px, effective "
            "overlap %s",
            arch,
            best["epoch"],
            epochs,
            "the whole window" if rf is None else f"{rf} px",
            overlap,
            f"{measured.overlap} px (--overlap effective)"
            if measured.overlap is not None
            else "not found (no overlap below half the window was enough)"
            if measured.shares
            else f"not measured (its {measured.crop[1]} x {measured.crop[0]} px crop of the scene "
            "holds no window edge away from its own edges)",
        )
    return TrainResult(out, list(class_list), history, digest, best["epoch"], ckpt_path, log_path)
