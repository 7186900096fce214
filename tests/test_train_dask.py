"""Training on Dask workers: the validation split, statistics, data-parallel ranks, resume,
lost workers and non-finite losses, on the NC scene."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import torch
from rasterio.features import rasterize

from geoseg import load_bundle
from geoseg.augment import build_augmenter
from geoseg.cluster import session
from geoseg.errors import TrainingError
from geoseg.io import read_profile
from geoseg.labels import LabelSpec
from geoseg.losses import make_loss
from geoseg.models import create_model
from geoseg.stages.train import TrainConfig, plan_training, train
from geoseg.tasks.sampling import TrainingSampler
from geoseg.tasks.train import train_epoch

from .conftest import EAST, LABELS, SCENE, WEST, external_cluster, shared

TINY = {"depth": 2, "base_width": 8}


# small, fast and without randomness beyond the seeds
SMALL_PLAN = {"window": 32, "batch_size": 8, "samples_per_epoch": 64, "epochs": 1,
              "augment": "none", "device": "cpu", "arch_args": TINY}  # fmt: skip


@pytest.fixture(scope="module")
def client():
    with session(1) as c:
        yield c


def plan(client: Any, scenes=(SCENE,), labels=(LABELS,), field=None, **over: Any):
    profiles = [read_profile(s) for s in scenes]
    specs = [LabelSpec(str(lb), field) for lb in labels]
    config = TrainConfig(**{**SMALL_PLAN, **over})
    return plan_training(client, profiles, specs, range(1, 7), config)


def scene_valid() -> np.ndarray:
    with rasterio.open(SCENE) as src:
        return np.all(src.read() != 0, axis=0)  # the scene's nodata is 0 in every band


def labelled() -> np.ndarray:
    with rasterio.open(LABELS) as src:
        m = src.read(1, masked=True)
    return ~np.ma.getmaskarray(m) & scene_valid()


@pytest.mark.parametrize("split", ["region", "fraction"])
def test_no_validation_pixel_is_seen_in_training(client, split):
    profile = read_profile(SCENE)
    if split == "region":
        p = plan(client, val_region=str(EAST))
        val = rasterize(
            ((g, 1) for g in gpd.read_file(EAST).to_crs(profile.crs).geometry),
            out_shape=(profile.height, profile.width),
            transform=profile.transform,
        ).astype(bool)
    else:
        p = plan(client, val_fraction=0.25)
        split_ = p.cfg.specs[0].val
        val = np.zeros((profile.height, profile.width), dtype=bool)
        for r, c in split_.cells:
            val[
                r * split_.cell : (r + 1) * split_.cell, c * split_.cell : (c + 1) * split_.cell
            ] = 1
        share = (val & labelled()).sum() / labelled().sum()
        # whole 256 px blocks (4 on this 443 x 489 scene) until a quarter of the labels is reached
        assert len(split_.cells) == 2 and 0.25 <= share < 0.75
    # the training pixels are what the windows drawn in a real epoch covered, margins included
    specs = tuple(dataclasses.replace(s, augment="light") for s in p.cfg.specs)
    cfg = dataclasses.replace(p.cfg, steps=40, specs=specs)
    result = train_epoch(None, cfg, 0)
    seen = np.zeros_like(val)
    size = cfg.specs[0].window + 2 * build_augmenter("light", cfg.specs[0].window).margin
    for _, r, c in result.where:
        seen[max(r, 0) : r + size, max(c, 0) : c + size] = True
    assert len(result.where) == 40 * 8
    assert seen.sum() > 0.2 * (~val).sum() / 4  # the epoch did cover the training side
    assert not (seen & val).any()  # pixel by pixel: no training window touched validation
    # every labelled validation pixel was scored, and nothing else
    assert result.confusion.sum() == (val & labelled()).sum()
    assert p.stats.val_codes and sum(p.stats.val_codes.values()) == (val & labelled()).sum()
    assert sum(p.stats.codes.values()) == (~val & labelled()).sum()


def test_normalisation_statistics_are_numpys_over_valid_pixels(client):
    p = plan(client, within=str(WEST))
    profile = read_profile(SCENE)
    inside = rasterize(
        ((g, 1) for g in gpd.read_file(WEST).to_crs(profile.crs).geometry),
        out_shape=(profile.height, profile.width),
        transform=profile.transform,
    ).astype(bool)
    with rasterio.open(SCENE) as src:
        data = src.read().astype(np.float64)
    keep = scene_valid() & inside
    np.testing.assert_allclose(p.cfg.specs[0].mean, data[:, keep].mean(axis=1), rtol=1e-10)
    np.testing.assert_allclose(p.cfg.specs[0].std, data[:, keep].std(axis=1), rtol=1e-8)


def reference_step(cfg: Any, world: int) -> dict[str, torch.Tensor]:
    """One optimiser step of a plain torch loop: each rank's batch drawn as the ranks draw it,
    gradients averaged by hand, batch-norm statistics from rank 0 (as DDP keeps them)."""
    torch.manual_seed(cfg.seed * 1000)
    model = create_model(cfg.arch, 6, cfg.num_classes, **cfg.arch_args)
    init = copy.deepcopy(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    loss_fn = make_loss(cfg.loss, cfg.class_weights, "cpu")
    grads, buffers = [], None
    for rank in range(world):
        m = create_model(cfg.arch, 6, cfg.num_classes, **cfg.arch_args)
        m.load_state_dict(init)
        m.train()
        sampler = TrainingSampler(cfg.specs, cfg.table, cfg.sampler, (cfg.seed, 0), rank, world)
        batch = [sampler.sample() for _ in range(cfg.batch_size)]
        x = torch.from_numpy(np.stack([b[0] for b in batch]))
        y = torch.from_numpy(np.stack([b[1] for b in batch]).astype(np.int64))
        loss_fn(m(x), y).backward()
        grads.append([q.grad for q in m.parameters()])
        if rank == 0:
            buffers = {k: v for k, v in m.state_dict().items() if "running" in k or "batches" in k}
    for q, *gs in zip(model.parameters(), *grads):
        q.grad = sum(gs) / world
    opt.step()
    model.load_state_dict({**model.state_dict(), **buffers})
    return model.state_dict()


@pytest.mark.parametrize("workers", [1, 2])
def test_data_parallel_ranks_average_gradients(client, tmp_path, workers):
    """geoseg train on 1 worker is the plain loop; on 2 workers (a gloo process group met on a
    free port) it is the plain loop on both ranks' windows with their gradients averaged."""
    out = tmp_path / "m.bundle"
    train(
        SCENE,
        LABELS,
        out,
        arch_args=TINY,
        window=32,
        batch_size=8,
        samples_per_epoch=8 * workers,  # one step on every rank
        epochs=1,
        augment="none",
        device="cpu",
        workers=workers,
    )
    cfg = dataclasses.replace(plan(client).cfg, steps=1)
    want = reference_step(cfg, workers)
    got = load_bundle(out).model.state_dict()
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)
    if workers == 2:  # and the ranks did draw different windows
        a = TrainingSampler(cfg.specs, cfg.table, cfg.sampler, (0, 0), 0, 2)
        b = TrainingSampler(cfg.specs, cfg.table, cfg.sampler, (0, 0), 1, 2)
        assert [a.sample()[2] for _ in range(4)] != [b.sample()[2] for _ in range(4)]


def test_two_scenes_raster_and_vector_labels(client, tmp_path):
    polygons = shared("nc-landsat7-landclass96/landsat96_polygons.shp")
    copy_ = tmp_path / "second.tif"
    shutil.copy(SCENE, copy_)
    p = plan(client, scenes=(SCENE, copy_), labels=(LABELS, polygons), field="id")
    result = train_epoch(None, dataclasses.replace(p.cfg, steps=16), 0)
    scenes = {s for s, _, _ in result.where}
    assert scenes == {0, 1}  # windows from both scenes
    assert np.isfinite(result.loss)
    # the second scene adds the pixels its polygons cover (sparse labels) to the raster's
    profile = read_profile(SCENE)
    gdf = gpd.read_file(polygons).to_crs(profile.crs)
    covered = rasterize(
        ((g, 1) for g in gdf.geometry),
        out_shape=(profile.height, profile.width),
        transform=profile.transform,
    ).astype(bool)
    extra = (covered & scene_valid()).sum()
    assert 0 < extra < 0.1 * labelled().sum()
    assert sum(p.stats.codes.values()) == labelled().sum() + extra


def cli(*args: Any) -> list[str]:
    return [str(Path(sys.executable).parent / "geoseg"), *map(str, args)]


@pytest.mark.slow
def test_resume_after_a_killed_run_gives_the_uninterrupted_result(tmp_path):
    common = [
        SCENE, LABELS, "--arch-arg", "depth=2", "--arch-arg", "base_width=8", "--window", 32,
        "--batch-size", 8, "--samples-per-epoch", 128, "--epochs", 4, "--val-fraction", 0.2,
        "--augment", "none", "--workers", 1, "-q",
    ]  # fmt: skip
    killed = tmp_path / "killed.bundle"
    log = killed.with_name(killed.name + ".log.jsonl")
    proc = subprocess.Popen(cli("train", *common, "-o", killed), start_new_session=True)
    deadline = time.time() + 240
    while not (log.exists() and log.read_text().count("\n") >= 1):
        assert proc.poll() is None and time.time() < deadline, "training ended before epoch 1"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not killed.exists()
    ckpt = killed.with_name(killed.name + ".checkpoint")
    done = torch.load(ckpt, weights_only=False)["epoch"]
    assert 1 <= done < 4
    r = subprocess.run(cli("train", *common, "-o", killed, "--resume", ckpt), capture_output=True)
    assert r.returncode == 0, r.stderr.decode()
    straight = tmp_path / "straight.bundle"
    r = subprocess.run(cli("train", *common, "-o", straight), capture_output=True)
    assert r.returncode == 0, r.stderr.decode()
    a, b = load_bundle(killed), load_bundle(straight)
    assert a.contract.training["best_epoch"] == b.contract.training["best_epoch"]
    for k, v in b.model.state_dict().items():
        torch.testing.assert_close(a.model.state_dict()[k], v, rtol=0, atol=1e-6, msg=k)
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert all(0 <= r["val_miou"] <= 1 and r["val_loss"] > 0 for r in rows)


@pytest.mark.slow
def test_a_lost_worker_stops_the_run_and_names_the_checkpoint(tmp_path):
    out = tmp_path / "m.bundle"
    log = out.with_name(out.name + ".log.jsonl")
    with external_cluster(2, "--no-nanny") as (address, workers):
        proc = subprocess.Popen(
            cli("train", SCENE, LABELS, "-o", out, "--arch-arg", "depth=2", "--window", 32,
                "--samples-per-epoch", 256, "--epochs", 50, "--scheduler", address, "-q"),
            stderr=subprocess.PIPE,
        )  # fmt: skip
        deadline = time.time() + 240
        while not log.exists() or not log.read_text():
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f"training ended before its first epoch: {proc.communicate()[1]!r}")
            time.sleep(0.05)
        workers[1].kill()
        _, err = proc.communicate(timeout=180)
    lines = err.decode().strip().splitlines()
    assert proc.returncode == 1
    ckpt = out.with_name(out.name + ".checkpoint")
    assert "was lost during epoch" in lines[-1] and f"--resume {ckpt}" in lines[-1]
    assert ckpt.exists() and not out.exists()


@pytest.mark.slow
def test_a_non_finite_loss_names_the_batch_and_its_windows(tmp_path):
    with pytest.raises(TrainingError, match=r"non-finite at epoch 1, batch \d+ on rank 0") as e:
        train(
            SCENE,
            LABELS,
            tmp_path / "m.bundle",
            arch_args=TINY,
            window=32,
            samples_per_epoch=256,
            epochs=1,
            lr=1e12,
            workers=1,  # one rank: the message names rank 0
        )
    assert "windows: nc_landsat7_2000.tif rows" in str(e.value)
    assert "lower lr or check" in str(e.value)  # raised on a worker, named for a Python caller
    assert not (tmp_path / "m.bundle").exists()
