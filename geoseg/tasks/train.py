"""Worker side of training: one rank's epoch (its process group, the windows it draws, the
optimiser steps, the validation pass) and the per-block statistics pass.

The driver (:mod:`geoseg.stages.train`) plans the run, sends one epoch task per worker and keeps
the best epoch; each task gets the weights and optimiser state and returns rank 0's new state.
"""

from __future__ import annotations

import contextlib
import gc
import math
import socket
import time
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from geoseg.classes import NODATA
from geoseg.errors import TrainingError, option
from geoseg.io import SceneProfile, describe_window
from geoseg.labels import LabelSpec
from geoseg.losses import make_loss
from geoseg.models import create_model
from geoseg.tasks import torch_threads
from geoseg.tasks.predict import resolve_device
from geoseg.tasks.sampling import (
    AnchorTable,
    BlockStats,
    SampleSpec,
    TrainingSampler,
    block_stats,
)

GROUP_TIMEOUT_S = 300  # how long a rank waits for the others in a collective


@dataclass(frozen=True)
class EpochConfig:
    """Everything an epoch task needs; plain data, cheap to send."""

    specs: tuple[SampleSpec, ...]
    table: AnchorTable
    sampler: str
    val_windows: tuple[tuple[int, Any], ...]  # (scene index, Window)
    arch: str
    arch_args: dict[str, Any]
    num_classes: int
    batch_size: int  # per rank
    steps: int  # per rank and epoch
    epochs: int
    lr: float
    loss: str
    label_smoothing: float
    class_weights: tuple[float, ...] | None
    seed: int
    device: str


@dataclass
class EpochResult:
    """What one rank reports for one epoch; only rank 0 carries the new state."""

    epoch: int
    rank: int
    state: dict[str, Any] | None
    loss: float  # mean training loss over all ranks
    val_loss: float | None
    confusion: np.ndarray | None  # validation, summed over ranks (rows truth)
    seconds: float
    windows: int  # training windows this rank drew
    pixels: int  # labelled training pixels this rank saw
    where: list[tuple[int, int, int]] = field(default_factory=list)  # (scene, row, col) drawn


@contextlib.contextmanager
def _process_group(rendezvous: str | None, rank: int, world: int, device: str) -> Iterator[None]:
    if world == 1:
        yield
        return
    import torch.distributed as dist

    dist.init_process_group(
        "nccl" if device == "cuda" else "gloo",
        init_method=rendezvous,
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=GROUP_TIMEOUT_S),
    )
    try:
        yield
        dist.barrier()  # every rank is done with the group before it goes
    finally:
        dist.destroy_process_group()


Drawn = tuple[list[tuple[np.ndarray, np.ndarray, Any]], torch.Tensor, torch.Tensor]


def _drawn(sampler: Any, steps: int, size: int, *, ahead: bool) -> Generator[Drawn, None, None]:
    """An epoch's ``steps`` batches of ``size`` windows from ``sampler``, in the order it draws
    them: each the samples, their images and their masks (class indexes, int64). ``ahead`` (for
    a GPU): the next batch is drawn in a second thread while the caller trains on this one, in
    page-locked memory, so the windows are read while the GPU runs; the draws, one at a time in
    the same order, are the same as without it."""
    pin = ahead and torch.cuda.is_available()

    def draw() -> Drawn:
        batch = [sampler.sample() for _ in range(size)]
        x = torch.from_numpy(np.stack([b[0] for b in batch]))
        y = torch.from_numpy(np.stack([b[1] for b in batch]).astype(np.int64))
        return (batch, x.pin_memory(), y.pin_memory()) if pin else (batch, x, y)

    if not ahead:
        for _ in range(steps):
            yield draw()
        return
    from concurrent.futures import ThreadPoolExecutor

    # one thread: the draws stay in order; leaving early waits for the one in flight
    with ThreadPoolExecutor(1, thread_name_prefix="geoseg-draw") as pool:
        coming = pool.submit(draw) if steps else None
        for step in range(steps):
            assert coming is not None
            got = coming.result()
            coming = pool.submit(draw) if step + 1 < steps else None
            yield got


def _describe(spec: SampleSpec, window: Any) -> str:
    scene = spec.scene  # a file by its name; band files or an item by the scene's
    label = scene.name if scene.sources else Path(scene.path).name
    return f"{label} {describe_window(window)}"


def _amp(device: str) -> tuple[torch.dtype | None, bool]:
    """Mixed precision for training: bf16 (or fp16 with loss scaling) on a GPU, none on a CPU."""
    if device != "cuda":
        return None, False
    if torch.cuda.is_bf16_supported():
        return torch.bfloat16, False
    return torch.float16, True


def train_epoch(
    state: dict[str, Any] | None,
    cfg: EpochConfig,
    epoch: int,
    rank: int = 0,
    world: int = 1,
    rendezvous: str | None = None,
) -> EpochResult:
    """Run one epoch as rank ``rank`` of ``world`` (a Dask task). ``state`` holds the model and
    optimiser state from the previous epoch, or None to start."""
    t0 = time.perf_counter()
    torch.set_num_threads(torch_threads())
    device = resolve_device(cfg.device)
    amp_dtype, scaled = _amp(device)
    with _process_group(rendezvous, rank, world, device):
        model, opt = fresh_model(cfg, epoch, device)
        if state is not None:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
        for g in opt.param_groups:  # cosine decay over the whole run
            g["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * epoch / cfg.epochs))
        net: torch.nn.Module = model
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel

            net = DistributedDataParallel(model)
        torch.manual_seed(cfg.seed * 1000 + epoch + 7919 * rank)  # dropout differs by rank
        scaler = torch.amp.GradScaler("cuda", enabled=scaled)
        loss_fn = make_loss(
            cfg.loss, cfg.class_weights, device, label_smoothing=cfg.label_smoothing
        )
        sampler = TrainingSampler(
            cfg.specs, cfg.table, cfg.sampler, seed=(cfg.seed, epoch), rank=rank, world=world
        )
        losses, pixels, where = [], 0, []
        try:
            model.train()
            # closed before the sampler is, also when a step fails: no draw is left in flight
            drawn = contextlib.closing(
                _drawn(sampler, cfg.steps, cfg.batch_size, ahead=device == "cuda")
            )
            with drawn as batches:
                for step, (batch, xs, ys) in enumerate(batches):
                    x = xs.to(device, non_blocking=True)
                    y = ys.to(device, non_blocking=True)
                    with torch.autocast(device, dtype=amp_dtype, enabled=amp_dtype is not None):
                        loss = loss_fn(net(x), y)
                    mean_loss, bad_here = _mean_over_ranks(loss.detach().float(), world)
                    if bad_here or not math.isfinite(mean_loss):
                        places = "; ".join(_describe(cfg.specs[s], w) for _, _, (s, w) in batch)
                        raise TrainingError(
                            f"the loss became non-finite at epoch {epoch + 1}, batch {step + 1}"
                            + (
                                f" on rank {rank}, windows: {places}"
                                if bad_here
                                else " on another rank"
                            )
                            + f"; lower {option('--lr', None)} or check the scenes for "
                            "extreme values"
                        )
                    opt.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                    losses.append(mean_loss)
                    pixels += int((ys != NODATA).sum())  # on the host: no wait for the GPU
                    where += [(s, int(w.row_off), int(w.col_off)) for _, _, (s, w) in batch]
            confusion, val_loss = _validate(model, cfg, sampler, rank, world, device, amp_dtype)
        finally:
            sampler.close()
            # DDP's reducer holds the process group: it must go before the group is destroyed,
            # else gloo's destructor can wait for its threads forever
            del net
            gc.collect()
    new_state = None
    if rank == 0:
        new_state = {
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "optimizer": opt.state_dict(),
        }
    return EpochResult(
        epoch,
        rank,
        new_state,
        float(np.mean(losses)),
        val_loss,
        confusion,
        time.perf_counter() - t0,
        cfg.steps * cfg.batch_size,
        pixels,
        where,
    )


def fresh_model(
    cfg: EpochConfig, epoch: int, device: str = "cpu"
) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The model and optimiser an epoch starts from before any state is loaded: seeded by
    the epoch, so every rank (and the client, for encoder weights) builds the same weights."""
    torch.manual_seed(cfg.seed * 1000 + epoch)
    channels = len(cfg.specs[0].bands) + len(cfg.specs[0].derived)
    model = create_model(cfg.arch, channels, cfg.num_classes, **cfg.arch_args).to(device)
    return model, torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)


def _mean_over_ranks(loss: torch.Tensor, world: int) -> tuple[float, bool]:
    """The loss averaged over ranks, and whether this rank's own loss is non-finite."""
    bad = not bool(torch.isfinite(loss))
    if world == 1:
        return float(loss), bad
    import torch.distributed as dist

    t = torch.stack([torch.nan_to_num(loss, 0.0, 0.0, 0.0), torch.tensor(float(bad)).to(loss)])
    dist.all_reduce(t)
    mean = float(t[0]) / world if float(t[1]) == 0 else math.nan
    return mean, bad


def _validate(
    model: torch.nn.Module,
    cfg: EpochConfig,
    sampler: TrainingSampler,
    rank: int,
    world: int,
    device: str,
    amp_dtype: torch.dtype | None,
) -> tuple[np.ndarray | None, float | None]:
    """Confusion matrix and mean cross-entropy over the validation pixels, each rank scoring
    its share of the validation windows, summed over ranks."""
    if not cfg.val_windows:
        return None, None
    k = cfg.num_classes
    conf = torch.zeros(k * k, dtype=torch.int64, device=device)
    loss_px = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, pixels
    model.eval()
    with torch.inference_mode():
        for scene, window in cfg.val_windows[rank::world]:
            rd = sampler.reader(scene)
            x, mask = rd.read(window)
            mask[~rd.val_mask(window)] = NODATA
            if not (mask != NODATA).any():
                continue
            with torch.autocast(device, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = model(torch.from_numpy(x)[None].to(device))
            logits = logits.float()
            y = torch.from_numpy(mask.astype(np.int64))[None].to(device)
            keep = y != NODATA
            loss_px[0] += F.cross_entropy(logits, y, ignore_index=NODATA, reduction="sum").double()
            loss_px[1] += keep.sum()
            pair = y[keep] * k + logits.argmax(1)[keep]
            conf += torch.bincount(pair, minlength=k * k)
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(conf)
        dist.all_reduce(loss_px)
    n = float(loss_px[1])
    return conf.cpu().numpy().reshape(k, k), (float(loss_px[0]) / n if n else None)


def free_port() -> int:
    """A TCP port free on this host now (runs on the rank-0 worker, for the rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


def stats_task(
    item: tuple[int, Any],
    scenes: Sequence[SceneProfile],
    bands: tuple[int, ...],
    specs: Sequence[LabelSpec],
    within: str | None,
    nodata: float | None,
    val_region: str | None,
    window: int,
    derived: tuple[tuple[int, int], ...] = (),
) -> BlockStats:
    scene, block = item
    return block_stats(
        block, scenes[scene], bands, specs[scene], within, nodata, val_region, window, derived
    )
