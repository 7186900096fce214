"""Training throughput: geoseg train on 1 and 2 Dask workers against a plain single-process torch
loop over in-memory tensors of the same windows (the limit).

    python benchmarks/train.py [--window 64 --batch 16 --steps 64] [--device cpu|cuda]

The NC scene and labels, the demo's U-Net (depth 3, width 16), ``--loss`` (default: geoseg
train's, ``ce+lovasz``), no augmentation, no validation. The limit: the windows geoseg's sampler draws, read once into memory, then
forward, backward and an AdamW step per batch with all cores (on a GPU: the windows held there,
under the mixed precision geoseg trains with). The draws alone: the sampler drawing those
windows in one thread, as a training step draws its batch (on a GPU the next batch is drawn
while the GPU trains: where the draws are slower than the steps, they set the pace). geoseg: a
real ``train`` call, epochs of ``--steps`` batches (on 1 and 2 workers on a CPU; the local
cluster's worker per GPU on a GPU); the rate is taken from the epochs after the first (the log's
seconds per epoch, i.e. the epoch tasks' own time) and from the whole call's wall time. Prints a
table and appends it to benchmarks/results/train.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from _results import append_result, under_worker_malloc

from geoseg.cluster import session
from geoseg.io import read_profile
from geoseg.labels import LabelSpec
from geoseg.losses import make_loss
from geoseg.models import create_model
from geoseg.pipeline import demo_workflow
from geoseg.stages.train import TrainConfig, plan_training, train
from geoseg.tasks.sampling import TrainingSampler
from geoseg.tasks.train import _amp

SAMPLE = demo_workflow().parent
SCENE, LABELS = SAMPLE / "nc_landsat7_2000.tif", SAMPLE / "nc_landclass96.tif"
ARCH = {"depth": 3, "base_width": 16}


def limit(args: argparse.Namespace) -> tuple[float, float]:
    """Windows per second of the plain loop on in-memory tensors, and of the sampler drawing
    them in one thread."""
    with session(1) as client:
        plan = plan_training(
            client,
            [read_profile(SCENE)],
            [LabelSpec(str(LABELS))],
            range(1, 7),
            TrainConfig(
                window=args.window,
                batch_size=args.batch,
                samples_per_epoch=args.batch * args.steps,
                augment="none",
                device="cpu",
                arch_args=ARCH,
            ),
        )
    cfg = plan.cfg
    sampler = TrainingSampler(cfg.specs, cfg.table, cfg.sampler, seed=(0, 0))  # as geoseg draws
    batches = []
    t_draw = time.perf_counter()
    for _ in range(args.steps):
        pairs = [sampler.sample() for _ in range(args.batch)]
        batches.append(
            (
                torch.from_numpy(np.stack([p[0] for p in pairs])),
                torch.from_numpy(np.stack([p[1] for p in pairs]).astype(np.int64)),
            )
        )
    draws = args.steps * args.batch / (time.perf_counter() - t_draw)
    sampler.close()
    dev = args.device
    batches = [(x.to(dev), y.to(dev)) for x, y in batches]
    torch.manual_seed(0)
    model = create_model("unet", 6, cfg.num_classes, **ARCH).to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    loss_fn = make_loss(args.loss, cfg.class_weights, dev)
    amp_dtype, scaled = _amp(dev)  # as geoseg trains: none on a CPU
    scaler = torch.amp.GradScaler("cuda", enabled=scaled)

    def epoch() -> float:
        t = time.perf_counter()
        for x, y in batches:
            with torch.autocast(dev, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        if dev == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    epoch()  # warm-up
    return args.steps * args.batch / min(epoch() for _ in range(2)), draws


def geoseg_rate(args: argparse.Namespace, workers: int | None, tmp: Path) -> tuple[float, float]:
    """(windows/s over the epochs after the first, windows/s over the whole call)."""
    out = tmp / f"w{workers}.bundle"
    t = time.perf_counter()
    train(
        SCENE,
        LABELS,
        out,
        arch_args=ARCH,
        window=args.window,
        batch_size=args.batch,
        samples_per_epoch=args.batch * args.steps,  # the same windows per epoch on any workers
        epochs=args.epochs,
        augment="none",
        loss=args.loss,
        device=args.device,
        workers=workers,
        overwrite=True,
    )
    wall = time.perf_counter() - t
    rows = [json.loads(line) for line in out.with_name(out.name + ".log.jsonl").open()]
    later = rows[1:]
    steady = sum(r["windows"] for r in later) / sum(r["seconds"] for r in later)
    return steady, sum(r["windows"] for r in rows) / wall


def main() -> None:
    under_worker_malloc()
    logging.basicConfig(level=logging.WARNING)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=64, help="batches per epoch (of all workers)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--loss", default=TrainConfig.loss, help="default: geoseg train's")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no GPU: torch sees no CUDA device; nothing measured")
        return
    torch.set_num_threads(psutil.cpu_count())
    row: dict[str, float | int | str] = {
        "device": args.device, "window": args.window, "batch": args.batch, "steps": args.steps,
        "loss": args.loss,
    }  # fmt: skip
    rate, draws = limit(args)
    row["limit_windows_s"] = round(rate, 1)
    row["draws_alone_windows_s"] = round(draws, 1)
    with tempfile.TemporaryDirectory() as tmp:
        # on a GPU the local cluster's own: a worker per GPU
        for workers in (1, 2) if args.device == "cpu" else (None,):
            steady, overall = geoseg_rate(args, workers, Path(tmp))
            row[f"geoseg_{workers or 'gpu'}w_windows_s"] = round(steady, 1)
            row[f"geoseg_{workers or 'gpu'}w_ratio_to_limit"] = round(steady / rate, 3)
            row[f"geoseg_{workers or 'gpu'}w_windows_s_with_start"] = round(overall, 1)
    for k, v in row.items():
        print(f"{k:>36}: {v}")
    append_result("train", {"torch": torch.__version__, "row": row})


if __name__ == "__main__":
    main()
