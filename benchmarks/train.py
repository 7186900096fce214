"""Training throughput: geoseg train on 1 and 2 Dask workers against a plain single-process torch
loop over in-memory tensors of the same windows (the limit).

    python benchmarks/train.py [--window 64 --batch 16 --steps 64]

The NC scene and labels, the demo's U-Net (depth 3, width 16), cross-entropy, no augmentation,
no validation. The limit: the windows geoseg's sampler draws, read once into memory, then
forward, backward and an AdamW step per batch with all cores. geoseg: a real ``train`` call,
epochs of ``--steps`` batches; the rate is taken from the epochs after the first (the log's
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

SAMPLE = demo_workflow().parent
SCENE, LABELS = SAMPLE / "nc_landsat7_2000.tif", SAMPLE / "nc_landclass96.tif"
ARCH = {"depth": 3, "base_width": 16}


def limit(args: argparse.Namespace) -> float:
    """Windows per second of the plain loop on in-memory tensors."""
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
    sampler = TrainingSampler(cfg.specs, cfg.table, "random", seed=(0, 0))
    batches = []
    for _ in range(args.steps):
        pairs = [sampler.sample() for _ in range(args.batch)]
        batches.append(
            (
                torch.from_numpy(np.stack([p[0] for p in pairs])),
                torch.from_numpy(np.stack([p[1] for p in pairs]).astype(np.int64)),
            )
        )
    sampler.close()
    torch.manual_seed(0)
    model = create_model("unet", 6, cfg.num_classes, **ARCH).train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    loss_fn = make_loss("ce", cfg.class_weights, "cpu")

    def epoch() -> float:
        t = time.perf_counter()
        for x, y in batches:
            loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return time.perf_counter() - t

    epoch()  # warm-up
    return args.steps * args.batch / min(epoch() for _ in range(2))


def geoseg_rate(args: argparse.Namespace, workers: int, tmp: Path) -> tuple[float, float]:
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
        device="cpu",
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
    args = ap.parse_args()
    torch.set_num_threads(psutil.cpu_count())
    row: dict[str, float | int] = {"window": args.window, "batch": args.batch, "steps": args.steps}
    row["limit_windows_s"] = round(limit(args), 1)
    with tempfile.TemporaryDirectory() as tmp:
        for workers in (1, 2):
            steady, overall = geoseg_rate(args, workers, Path(tmp))
            row[f"geoseg_{workers}w_windows_s"] = round(steady, 1)
            row[f"geoseg_{workers}w_ratio_to_limit"] = round(steady / row["limit_windows_s"], 3)
            row[f"geoseg_{workers}w_windows_s_with_start"] = round(overall, 1)
    for k, v in row.items():
        print(f"{k:>36}: {v}")
    append_result("train", {"torch": torch.__version__, "row": row})


if __name__ == "__main__":
    main()
