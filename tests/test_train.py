import warnings

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import torch
from shapely.affinity import translate

from geoseg import load_bundle
from geoseg.bundle import combine_bundles
from geoseg.classes import NODATA
from geoseg.errors import (
    BandMismatchError,
    ConfigError,
    GridMismatchError,
    LabelError,
    OutputExistsError,
)
from geoseg.io import read_profile
from geoseg.labels import LabelSpec
from geoseg.stages.train import train
from geoseg.tasks.sampling import (
    AnchorTable,
    SampleSpec,
    TrainingSampler,
    block_stats,
    pixel_bounds,
)

from .conftest import EAST, LABELS, SCENE, WEST, labels_on_a_wider_grid, shared


def test_bundle_carries_the_whole_contract(nc_run):
    b = load_bundle(nc_run["bundle"])
    c = b.contract
    assert [x.index for x in c.bands] == [1, 2, 3, 4, 5, 6]
    assert c.bands[0].name.startswith("lsat7_2000_10")
    assert [x.name for x in c.classes] == [
        "developed",
        "agriculture",
        "herbaceous",
        "shrubland",
        "forest",
        "water",
        "sediment",
    ]
    assert c.nodata == 0 and c.window == 256 and 0 < c.overlap < c.window
    assert c.receptive_field > 1 and c.crs and c.pixel_size == (28.5, 28.5)
    assert all(np.isfinite(c.mean)) and all(s > 0 for s in c.std)
    assert 40 < c.mean[0] < 120  # band 1 DN of this scene, nodata excluded
    assert len(c.training["history"]) == 2 and c.geoseg_version


def test_training_windows_never_leave_the_training_area():
    profile = read_profile(SCENE)
    bounds = pixel_bounds(profile, str(WEST))
    spec_labels = LabelSpec(str(LABELS))
    stats = block_stats(
        rasterio.windows.Window(0, 0, profile.width, profile.height),
        read_profile(SCENE),
        (1, 2, 3, 4, 5, 6),
        spec_labels,
        str(WEST),
    )
    split = round(0.6 * profile.width)
    assert stats.anchors[:, 1].max() < split
    spec = SampleSpec(
        read_profile(SCENE),
        (1, 2, 3, 4, 5, 6),
        spec_labels,
        tuple(range(1, 8)),
        (0.0,) * 6,
        (1.0,) * 6,
        64,
        str(WEST),
        bounds,
    )
    table = AnchorTable(
        np.column_stack([np.zeros(len(stats.anchors), int), stats.anchors]),
        stats.weights,
        np.column_stack([np.zeros(len(stats.cells), int), stats.cells]),
    )
    for mode in ("random", "balanced", "grid"):
        sampler = TrainingSampler([spec], table, mode, seed=1)
        for _ in range(300):
            _, w = sampler.draw_window()
            assert w.col_off + w.width <= split and w.col_off >= 0
        x, m, _ = sampler.sample()
        assert x.shape == (6, 64, 64) and m.shape == (64, 64) and (m != 255).any()
        sampler.close()


def test_balanced_sampler_draws_rare_classes_as_often_as_common_ones():
    profile = read_profile(SCENE)
    stats = block_stats(
        rasterio.windows.Window(0, 0, profile.width, profile.height),
        read_profile(SCENE),
        (1, 2, 3, 4, 5, 6),
        LabelSpec(str(LABELS)),
        None,
    )
    table = AnchorTable(
        np.column_stack([np.zeros(len(stats.anchors), int), stats.anchors]),
        stats.weights,
        stats.cells,
    )
    spec = SampleSpec(
        read_profile(SCENE),
        (1,),
        LabelSpec(str(LABELS)),
        tuple(range(1, 8)),
        (0.0,),
        (1.0,),
        16,
        None,
        (0, 0, profile.height, profile.width),
        augment="none",
    )
    code_at = {(int(r), int(c)): int(k) for r, c, k in stats.anchors}
    drawn = {}
    for mode in ("random", "balanced"):
        sampler = TrainingSampler([spec], table, mode, seed=3)
        picks = [
            code_at[(int(a[1]), int(a[2]))]
            for a in table.anchors[
                [
                    min(
                        int(np.searchsorted(sampler.cdf, sampler.rng.random())),
                        len(sampler.cdf) - 1,
                    )
                    for _ in range(7000)
                ]
            ]
        ]
        drawn[mode] = np.bincount(picks, minlength=8)[1:] / len(picks)
    truth = np.array([stats.codes.get(c, 0) for c in range(1, 8)], dtype=float)
    truth /= truth.sum()
    # random: as often as the class covers the scene; balanced: every class about 1/7
    np.testing.assert_allclose(drawn["random"], truth, atol=0.02)
    np.testing.assert_allclose(drawn["balanced"], 1 / 7, atol=0.02)


def test_vector_labels_in_another_crs(tmp_path, dask_client):
    polygons = shared("nc-landsat7-landclass96/landsat96_polygons.shp")
    out = tmp_path / "v.bundle"
    with pytest.raises(LabelError, match=r"column 'label' holds str values.*integer columns: id"):
        train(SCENE, polygons, out, label_field="label", client=dask_client)
    # without --label-field the only integer column, 'id', is used
    result = train(
        SCENE,
        polygons,
        out,
        arch_args={"depth": 2, "base_width": 4},
        epochs=1,
        samples_per_epoch=32,
        client=dask_client,
    )
    assert out.exists()
    assert [c.id for c in result.classes] == sorted(gpd.read_file(polygons)["id"].unique())


def test_bad_training_inputs_get_clear_errors(tmp_path, make_raster, dask_client):
    out = tmp_path / "m.bundle"
    with pytest.raises(BandMismatchError, match=r"bands 1-6; the model reads bands \[1, 7\]"):
        train(SCENE, LABELS, out, bands=[1, 7], client=dask_client)
    with pytest.raises(ConfigError, match=r"list of \(scene, labels\) pairs, with labels=None"):
        train([SCENE, SCENE], [LABELS], out, client=dask_client)  # parallel lists: refused
    with pytest.raises(ConfigError, match="needs its labels"):
        train(SCENE, None, out, client=dask_client)
    with pytest.raises(ConfigError, match="give val_region or val_fraction, not both"):
        train(SCENE, LABELS, out, val_region=EAST, val_fraction=0.2, client=dask_client)
    other = make_raster("shifted.tif", np.ones((50, 60), "uint8"), nodata=0)
    with pytest.raises(GridMismatchError, match="labels"):
        train(SCENE, other, out, client=dask_client)
    empty = tmp_path / "empty.tif"
    with rasterio.open(LABELS) as src:
        prof = src.profile
    with rasterio.open(empty, "w", **prof) as dst:
        dst.write(np.zeros((prof["height"], prof["width"]), prof["dtype"]), 1)
    with pytest.raises(LabelError, match="no labelled training pixel"):
        train(SCENE, empty, out, ignore=[0], client=dask_client)
    with pytest.raises(ConfigError, match="larger than the training area"):
        train(SCENE, LABELS, out, within=WEST, window=512, client=dask_client)
    with pytest.raises(LabelError, match=r"codes \[6, 7\] that are not in the class list"):
        train(
            SCENE,
            LABELS,
            out,
            classes=[{"id": i} for i in range(1, 6)],
            epochs=1,
            client=dask_client,
        )
    far = gpd.read_file(WEST)
    far["geometry"] = far.geometry.apply(lambda g: translate(g, 1e6, 0))
    far["code"] = 1
    far.to_file(tmp_path / "far.gpkg")
    with pytest.raises(LabelError, match="do not overlap"):
        train(SCENE, tmp_path / "far.gpkg", out, client=dask_client)
    far[["name", "geometry"]].to_file(tmp_path / "names.gpkg")
    with pytest.raises(LabelError, match="integer columns: none; all columns: name"):
        train(SCENE, tmp_path / "names.gpkg", out, client=dask_client)
    assert not out.exists()


@pytest.mark.parametrize("arch", ["fcn8s", "deeplabv3plus", "segformer"])
def test_train_and_predict_accept_every_architecture(arch, tmp_path, dask_client):
    from geoseg.stages.predict import predict_scene

    from .test_models import SMALL

    bundle = tmp_path / f"{arch}.bundle"
    train(
        SCENE,
        LABELS,
        bundle,
        arch=arch,
        arch_args=SMALL[arch],
        within=WEST,
        epochs=1,
        samples_per_epoch=16,
        loss="ce+lovasz",
        augment="strong",
        client=dask_client,
    )
    b = load_bundle(bundle)
    assert b.contract.arch == arch and b.contract.training["parameters"] > 0
    if arch == "fcn8s":
        assert b.contract.receptive_field == 344 and b.overlap == 128  # capped at window / 2
    else:  # attention or image pooling: the whole window
        assert b.contract.receptive_field is None and b.overlap == 64
    out = tmp_path / "classes.tif"
    predict_scene(bundle, SCENE, out, block=256, client=dask_client)
    with rasterio.open(out) as c:
        assert set(np.unique(c.read(1))) <= {1, 2, 3, 4, 5, 6, 7, 255}


def test_derived_bands_travel_in_the_bundle_and_are_computed_on_the_workers(tmp_path, dask_client):
    """train --derive ndvi=4,3: the bundle records NDVI by its bands' names, its statistics
    are NDVI's over the training pixels (computed here with numpy), the model reads 7 channels,
    and predicting needs only the scene's 6 bands."""
    from rasterio.features import rasterize

    from geoseg.stages.predict import predict_scene
    from geoseg.tasks.predict import normalize

    out = tmp_path / "ndvi.bundle"
    train(
        SCENE, LABELS, out, within=WEST, derive="ndvi=4,3", client=dask_client,
        arch_args={"depth": 2, "base_width": 4}, epochs=1, samples_per_epoch=32,
    )  # fmt: skip
    b = load_bundle(out)
    names = [x.name for x in b.bands]
    assert b.contract.derived == [{"name": "ndvi", "a": "4", "b": "3"}]
    assert b.derived_pairs == ((3, 2),) and len(b.contract.mean) == 7
    assert next(b.model.parameters()).shape[1] == 7  # the first convolution reads 7 channels
    with rasterio.open(SCENE) as src:
        data, profile = src.read().astype(np.float64), src.profile
    west = gpd.read_file(WEST).to_crs(profile["crs"]).geometry
    inside = rasterize(
        ((g, 1) for g in west), out_shape=data.shape[1:], transform=profile["transform"]
    )
    valid = np.all(data != 0, axis=0) & inside.astype(bool)
    nir, red = data[3][valid], data[2][valid]
    ndvi = (nir - red) / (nir + red)
    assert b.contract.mean[6] == pytest.approx(ndvi.mean(), rel=1e-6)
    assert b.contract.std[6] == pytest.approx(ndvi.std(), rel=1e-5)
    # the worker's input: NDVI as the 7th band, scaled with the bundle's statistics
    cut = (slice(None), slice(200, 220), slice(200, 220))
    block, ok = data[cut], np.all(data[cut] != 0, axis=0)
    assert ok.all()
    x = normalize(block.astype(np.float32), ok, b)
    nd = (block[3] - block[2]) / (block[3] + block[2])
    expected = (nd - b.contract.mean[6]) / b.contract.std[6]
    np.testing.assert_allclose(x[6], expected, rtol=1e-4, atol=1e-4)
    r = predict_scene(out, SCENE, tmp_path / "c.tif", window=64, client=dask_client)
    assert r.valid_pixels > 0
    # by name: a bundle whose bands are named finds them by name
    named = tmp_path / "named.bundle"
    train(
        SCENE, LABELS, named, within=WEST, band_names=list("bgrnms"), derive=["ndvi=n,r"],
        client=dask_client, arch_args={"depth": 2, "base_width": 4}, epochs=1,
        samples_per_epoch=32,
    )  # fmt: skip
    assert load_bundle(named).derived_pairs == ((3, 2),) and names[3] != "n"


@pytest.mark.parametrize(
    "derive, message",
    [
        ("ndvi", "NAME=A,B"),
        ("ndvi=4", "NAME=A,B"),
        ("ndvi=4,4", "two different bands"),
        (["a=4,3", "a=5,3"], "names a band twice"),
        ("ndvi=nir,red", "needs band 'nir', and the bands read are 1 (lsat7"),
        ("ndvi=9,3", "needs band '9'"),
    ],
)
def test_bad_derived_bands_are_refused_before_any_work(tmp_path, derive, message, monkeypatch):
    import geoseg.stages.train as stage

    def no_cluster(*a, **k):
        raise AssertionError("a cluster was started")

    monkeypatch.setattr(stage, "session", no_cluster)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        train(SCENE, LABELS, tmp_path / "x.bundle", derive=derive)
    assert not list(tmp_path.iterdir())


def test_a_scene_smaller_than_the_default_window_trains_and_predicts(tmp_path, dask_client):
    """A 50 x 50 px crop in float reflectance (0-1) with 3 bands: the default window shrinks
    to what the scene holds (48 px, a multiple of 16), and the map covers every pixel."""
    from rasterio.windows import Window

    from geoseg.stages.predict import predict_scene

    paths = _float_crop(tmp_path, Window(200, 200, 50, 50), "")
    out = tmp_path / "m.bundle"
    train(paths["scene"], paths["labels"], out, epochs=1, samples_per_epoch=16, client=dask_client)
    b = load_bundle(out)
    assert b.contract.training["window"] == 48
    assert 0 < b.contract.mean[0] < 1  # reflectance, normalised on its own scale
    r = predict_scene(out, paths["scene"], tmp_path / "c.tif", client=dask_client)
    assert r.valid_pixels == 50 * 50
    with rasterio.open(tmp_path / "c.tif") as src:
        assert set(np.unique(src.read(1))) <= {c.id for c in b.classes}
    tiny = _float_crop(tmp_path, Window(200, 200, 7, 7), "tiny_")
    with pytest.raises(ConfigError, match="smaller than the smallest window"):
        train(tiny["scene"], tiny["labels"], tmp_path / "t.bundle", client=dask_client)


def _nc_crop(folder, crop, prefix: str, bands_as) -> dict:
    """The NC scene over ``crop``, its bands as ``bands_as(bands read)`` makes them (the bands,
    and what changes in the profile), and its labels over the same crop."""
    paths = {}
    for name, path in (("scene", SCENE), ("labels", LABELS)):
        with rasterio.open(path) as src:
            data = src.read(window=crop)
            prof = {
                **src.profile, "width": int(crop.width), "height": int(crop.height),
                "transform": src.window_transform(crop), "tiled": False,
            }  # fmt: skip
        prof.pop("blockxsize", None), prof.pop("blockysize", None)
        if name == "scene":
            data, changes = bands_as(data)
            prof.update(count=len(data), **changes)
        paths[name] = folder / f"{prefix}{name}.tif"
        with rasterio.open(paths[name], "w", **prof) as dst:
            dst.write(data)
    return paths


def _float_crop(folder, crop, prefix: str) -> dict:
    """The NC scene's bands 3-5 over ``crop`` as float reflectance (0-1), and its labels."""
    return _nc_crop(
        folder,
        crop,
        prefix,
        lambda d: (d[[2, 3, 4]].astype("float32") / 255, {"dtype": "float32", "nodata": None}),
    )


def test_a_13_band_16_bit_scene_of_100_px_trains_and_predicts_at_the_defaults(
    tmp_path, dask_client
):
    """Sentinel-2-like input: 13 bands of 16-bit digital numbers (0-10,000, 0 the fill value)
    over a 100 x 100 px crop of the NC scene, trained at the defaults but for a shorter run.
    The window stays 64 px, each band is normalised by its own mean in DN, and the map covers
    the crop and agrees with its labels better than the most common class alone does."""
    from rasterio.windows import Window

    from geoseg.stages.predict import predict_scene

    def thirteen(six: np.ndarray) -> tuple[np.ndarray, dict]:
        six = six.astype("float64")
        mixes = [six[i] for i in range(6)] + [
            0.5 * (six[i] + six[(i + 1) % 6]) for i in range(6)  # more bands, as mixtures
        ] + [six[3] - six[2] + 100]  # fmt: skip
        dn = np.stack([np.clip(m * 35 + 100 * i, 1, 10_000) for i, m in enumerate(mixes)])
        return dn.astype("uint16"), {"dtype": "uint16", "nodata": 0}

    paths = _nc_crop(tmp_path, Window(150, 150, 100, 100), "s2_", thirteen)
    scene, truth = paths["scene"], paths["labels"]
    with rasterio.open(scene) as src, rasterio.open(truth) as lab:
        bands, labels = src.read(), lab.read(1)
    out = tmp_path / "m.bundle"
    train(scene, truth, out, epochs=4, client=dask_client)
    b = load_bundle(out)
    assert b.contract.training["window"] == 64 and len(b.contract.bands) == 13
    own = bands.reshape(13, -1).mean(axis=1)
    np.testing.assert_allclose(b.contract.mean, own, rtol=0.01)  # each band's own, in DN
    r = predict_scene(out, scene, tmp_path / "c.tif", client=dask_client)
    assert r.valid_pixels == 100 * 100
    with rasterio.open(tmp_path / "c.tif") as src:
        mapped = src.read(1)
    labelled = labels != 0
    accuracy = (mapped[labelled] == labels[labelled]).mean()
    majority = np.bincount(labels[labelled]).max() / labelled.sum()
    assert accuracy > majority + 0.05, (accuracy, majority)


TINY_RUN = {"arch_args": {"depth": 2, "base_width": 8}, "window": 32, "epochs": 1,
            "samples_per_epoch": 32, "augment": "none", "within": str(WEST)}  # fmt: skip


def test_members_train_an_ensemble_and_a_stopped_one_resumes_its_member(tmp_path, dask_client):
    """``members=2``: two models with seeds 5 and 6, each kept beside the output, and the output
    an ensemble of exactly those weights. Resumed from the second member's checkpoint, the first
    member is taken as written and the ensemble made again is the same."""
    out = tmp_path / "m.bundle"
    r = train(SCENE, LABELS, out, members=2, seed=5, client=dask_client, **TINY_RUN)
    one, two = tmp_path / "m.member1.bundle", tmp_path / "m.member2.bundle"
    assert r.members == [one, two] and r.path == out
    both, a, b = load_bundle(out), load_bundle(one), load_bundle(two)
    assert both.contract.members == 2
    assert [m["hash"] for m in both.contract.training["members"]] == [a.hash, b.hash]
    weights = [m.state_dict() for m in both.model.members]
    for mine, theirs in zip(weights, (a.model.state_dict(), b.model.state_dict())):
        assert all(torch.equal(mine[k], v) for k, v in theirs.items())
    assert not torch.equal(weights[0]["head.weight"], weights[1]["head.weight"])  # other seeds
    # as if stopped while the second member was training: its bundle and the ensemble not yet made
    first = one.stat().st_mtime_ns
    ensemble_hash = both.hash
    two.unlink()
    out.unlink()
    ckpt = tmp_path / "m.member2.bundle.checkpoint"
    r = train(SCENE, LABELS, out, members=2, seed=5, resume=ckpt, client=dask_client, **TINY_RUN)
    assert one.stat().st_mtime_ns == first  # not trained again
    assert load_bundle(out).hash == ensemble_hash


def test_members_refusals_come_before_any_training(tmp_path, dask_client):
    out = tmp_path / "m.bundle"
    with pytest.raises(ConfigError, match="members must be at least 1"):
        train(SCENE, LABELS, out, members=0, client=dask_client, **TINY_RUN)
    with pytest.raises(ConfigError, match="val_seed draws the val_fraction split"):
        train(SCENE, LABELS, out, val_seed=3, client=dask_client, **TINY_RUN)
    # a member's file from an earlier run: refused before the first member trains
    (tmp_path / "m.member2.bundle.log.jsonl").write_text("")
    with pytest.raises(OutputExistsError, match=r"m\.member2\.bundle\.log\.jsonl.* exists"):
        train(SCENE, LABELS, out, members=2, client=dask_client, **TINY_RUN)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.member2.bundle.log.jsonl"]
    # the checkpoint of another run
    other = tmp_path / "other.bundle.checkpoint"
    train(SCENE, LABELS, tmp_path / "other.bundle", client=dask_client, **TINY_RUN)
    with pytest.raises(ConfigError, match="not one of this ensemble's members'"):
        train(SCENE, LABELS, out, members=2, resume=other, client=dask_client, **TINY_RUN)
    assert not list(tmp_path.glob("m.member1*")) and not out.exists()


def test_members_share_one_validation_split(tmp_path, dask_client):
    """With ``val_fraction`` every member holds out the same blocks, so no validation pixel was
    seen by any model of the ensemble; a member trained with its own seed's split would have
    trained on pixels another member validates on."""
    out = tmp_path / "m.bundle"
    run = {**TINY_RUN, "within": None}
    train(SCENE, LABELS, out, members=3, val_fraction=0.3, client=dask_client, **run)
    held = [
        load_bundle(tmp_path / f"m.member{k}.bundle").contract.training["validation_pixels"]
        for k in (1, 2, 3)
    ]
    assert held[0] and held[0] == held[1] == held[2]
    # bundles trained apart on other splits: combined, with a warning that nothing is held out
    apart = tmp_path / "apart.bundle"
    train(SCENE, LABELS, apart, seed=9, val_fraction=0.3, client=dask_client, **run)
    with pytest.warns(UserWarning, match="no held-out validation"):
        combine_bundles([tmp_path / "m.member1.bundle", apart], tmp_path / "e.bundle")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        combine_bundles([tmp_path / "m.member1.bundle", tmp_path / "m.member2.bundle"],
                        tmp_path / "f.bundle")  # fmt: skip


@pytest.mark.gpu
def test_training_on_a_gpu_learns_and_its_bundle_predicts_there(tmp_path):
    """``device="cuda"``: the local cluster's GPU worker trains under mixed precision (its loss
    finite and falling over a few epochs), and the bundle predicts on the GPU. No ``within``:
    the GPU checks carry no vector reader (``benchmarks/gpu_kit.sh``)."""
    from geoseg.stages.predict import predict_scene

    run = {k: v for k, v in TINY_RUN.items() if k not in ("within", "epochs")}
    out = tmp_path / "g.bundle"
    r = train(SCENE, LABELS, out, device="cuda", epochs=4, **run)
    losses = [h["loss"] for h in r.history]
    assert len(losses) == 4 and all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    classes = tmp_path / "c.tif"
    predict_scene(out, SCENE, classes, device="cuda")
    with rasterio.open(classes) as c:
        found = set(np.unique(c.read(1))) - {NODATA}
    assert found and found <= {k.id for k in load_bundle(out).classes}


def test_batches_drawn_ahead_are_the_batches_drawn_in_turn():
    """On a GPU the next batch is drawn in a second thread while the model trains on this one:
    the same windows in the same order as drawn in turn, a failed draw raised at its batch, and
    a run that stops leaves no draw running on the sampler it closes next."""
    import threading
    import time

    from geoseg.errors import LabelError
    from geoseg.tasks.train import _drawn

    class Counting:
        def __init__(self, fail_at: int = 0) -> None:
            self.n, self.fail_at, self.threads = 0, fail_at, set()

        def sample(self):
            self.threads.add(threading.get_ident())
            time.sleep(0.002)
            self.n += 1
            if self.n == self.fail_at:
                raise LabelError(f"no labelled window at draw {self.n}")
            return np.full((2, 4, 4), self.n, np.float32), np.full((4, 4), self.n % 3), (0, None)

    def drawn(sampler, ahead):
        return [
            (x.numpy().copy(), y.numpy().copy()) for _, x, y in _drawn(sampler, 5, 3, ahead=ahead)
        ]

    turn, ahead = Counting(), Counting()
    a, b = drawn(turn, False), drawn(ahead, True)
    assert len(a) == len(b) == 5 and turn.n == ahead.n == 15
    assert all(np.array_equal(p[0], q[0]) and np.array_equal(p[1], q[1]) for p, q in zip(a, b))
    assert b[2][1].dtype == np.int64 and b[4][0][0, 0, 0, 0] == 13  # batch 5 starts at draw 13
    assert threading.get_ident() not in ahead.threads  # drawn in the second thread
    with pytest.raises(LabelError, match="at draw 8"):
        drawn(Counting(fail_at=8), True)
    stopped = Counting()
    batches = _drawn(stopped, 5, 3, ahead=True)
    next(batches), next(batches)
    batches.close()  # as a failed step leaves the loop
    n = stopped.n
    assert n <= 9  # the two batches taken and at most the one drawn ahead
    time.sleep(0.05)
    assert stopped.n == n  # nothing drew after the close


def test_a_label_raster_of_a_larger_extent_on_the_scene_grid_trains_as_the_scene_sized_one(
    tmp_path, dask_client
):
    """A land-cover map of a wider area on the scene's pixel grid (as cut from a national map)
    is read at the scene's pixels: the same model as with the labels cut to the scene, the
    code in its margin never read; off the grid by half a pixel, or beside the scene, it is
    refused with one line."""
    wide = labels_on_a_wider_grid(tmp_path, (7, 5, 3, 4))
    run = {k: v for k, v in TINY_RUN.items() if k != "within"}
    train(SCENE, LABELS, tmp_path / "cut.bundle", **run, client=dask_client)
    train(SCENE, wide, tmp_path / "wide.bundle", **run, client=dask_client)
    cut, got = load_bundle(tmp_path / "cut.bundle"), load_bundle(tmp_path / "wide.bundle")
    assert cut.contract.training["class_pixels"] == got.contract.training["class_pixels"]
    for k, v in cut.model.state_dict().items():
        assert torch.equal(v, got.model.state_dict()[k]), k
    half = labels_on_a_wider_grid(tmp_path, (7, 5, 3, 4), shift=(0.5, 0.0))
    with pytest.raises(GridMismatchError, match="is not on the scene's grid"):
        train(SCENE, half, tmp_path / "half.bundle", **run, client=dask_client)
    beside = labels_on_a_wider_grid(tmp_path, (0, 0, 0, 0), shift=(0.0, 600.0))
    with pytest.raises(GridMismatchError, match="do not overlap the scene"):
        train(SCENE, beside, tmp_path / "beside.bundle", **run, client=dask_client)
    assert not list(tmp_path.glob("half.bundle*")) and not list(tmp_path.glob("beside.bundle*"))
