"""Scenes from catalogs: band files at mixed resolutions and CRSs, STAC Items, mosaics of
overlapping scenes, maps of an area, and the provenance beside every class map.

The band files are cut from the shipped NC scene: bands on its grid, bands at twice its pixel
size, a band in another CRS; the STAC Items are written over them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.enums import Resampling
from rasterio.vrt import WarpedVRT
from rasterio.warp import calculate_default_transform, reproject
from rasterio.windows import Window

from geoseg.catalog import expand_scenes, open_scene
from geoseg.errors import BandMismatchError
from geoseg.io import read_scene
from tests.conftest import SCENE

pytestmark = pytest.mark.filterwarnings("ignore:.*:UserWarning")


def _write(path: Path, data: np.ndarray, crs, transform) -> Path:
    with rasterio.open(
        path, "w", driver="GTiff", width=data.shape[1], height=data.shape[0], count=1,
        dtype=data.dtype, crs=crs, transform=transform, nodata=0, tiled=True,
    ) as dst:  # fmt: skip
        dst.write(data, 1)
    return path


@pytest.fixture(scope="module")
def bands(tmp_path_factory) -> dict[str, Path]:
    """The NC scene's six bands as files: b1-b3 on its grid, b4-b5 at twice its pixel size
    (averaged), b6 in UTM 17N; and b1-b6 all on its grid."""
    d = tmp_path_factory.mktemp("bands")
    out: dict[str, Path] = {}
    with rasterio.open(SCENE) as src:
        for i in range(1, 7):
            data = src.read(i)
            out[f"same{i}"] = _write(d / f"same_b{i}.tif", data, src.crs, src.transform)
            if i <= 3:
                out[f"b{i}"] = out[f"same{i}"]
            elif i <= 5:
                t = src.transform * src.transform.scale(2, 2)
                h, w = -(-src.height // 2), -(-src.width // 2)
                coarse = np.zeros((h, w), np.uint8)
                reproject(data, coarse, src_transform=src.transform, src_crs=src.crs,
                          dst_transform=t, dst_crs=src.crs, resampling=Resampling.average,
                          src_nodata=0, dst_nodata=0)  # fmt: skip
                out[f"b{i}"] = _write(d / f"coarse_b{i}.tif", coarse, src.crs, t)
            else:
                t, w, h = calculate_default_transform(
                    src.crs, "EPSG:32617", src.width, src.height, *src.bounds
                )
                other = np.zeros((h, w), np.uint8)
                reproject(data, other, src_transform=src.transform, src_crs=src.crs,
                          dst_transform=t, dst_crs="EPSG:32617", resampling=Resampling.bilinear,
                          src_nodata=0, dst_nodata=0)  # fmt: skip
                out[f"b{i}"] = _write(d / f"utm17_b{i}.tif", other, "EPSG:32617", t)
    return out


def _item(path: Path, assets: dict[str, dict], item_id: str = "nc-2000") -> Path:
    doc = {
        "type": "Feature",
        "stac_version": "1.0.0",
        "id": item_id,
        "geometry": None,
        "properties": {"datetime": "2000-05-24T00:00:00Z"},
        "links": [],
        "assets": assets,
    }
    path.write_text(json.dumps(doc))
    return path


def _read(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read(1)


def test_bands_on_other_grids_read_per_block_equal_warpedvrt(bands):
    """A band at twice the pixel size and one in another CRS, read window by window onto the
    scene's grid, give what rasterio's WarpedVRT of the band gives on that grid: the same
    values for the 2x band; for the reprojected band, those of the WarpedVRT read in geoseg's
    fixed 256 px tiles, so that every window sees a pixel with the same value (a windowed
    WarpedVRT read alone moves values by GDAL's approximate transformer, a few DN at some
    pixels, window by window)."""
    from geoseg.io import WARP_TILE

    scene = open_scene(tuple(str(bands[f"b{i}"]) for i in range(1, 7)))
    assert (scene.width, scene.height, scene.crs.to_epsg()) == (489, 443, 32119)
    with rasterio.open(SCENE) as src:
        stacked = src.read()
    for band in (4, 6):
        with rasterio.open(bands[f"b{band}"]) as src, WarpedVRT(
            src, crs=scene.crs, transform=scene.transform, width=scene.width,
            height=scene.height, resampling=Resampling.bilinear, src_nodata=0, nodata=0,
        ) as vrt:  # fmt: skip
            whole = vrt.read(1)
            tiled = np.zeros_like(whole)
            for r in range(0, scene.height, WARP_TILE):
                for c in range(0, scene.width, WARP_TILE):
                    w = Window(
                        c, r, min(WARP_TILE, scene.width - c), min(WARP_TILE, scene.height - r)
                    )
                    tiled[r : r + w.height, c : c + w.width] = vrt.read(1, window=w)
        if band == 4:
            assert np.array_equal(tiled, whole)
        else:
            both = (tiled > 0) & (whole > 0)
            # sub-pixel shifts of the approximate transformer: most pixels within 2 DN
            assert np.mean(np.abs(tiled[both].astype(int) - whole[both]) <= 2) > 0.98
        for win in (Window(0, 0, 128, 128), Window(300, 200, 189, 243), Window(-20, 400, 90, 80)):
            data, valid = read_scene(scene, win, [band])
            r0, c0 = max(0, win.row_off), max(0, win.col_off)
            expect = tiled[r0 : win.row_off + win.height, c0 : win.col_off + win.width]
            dr, dc = r0 - win.row_off, c0 - win.col_off
            got = data[0, dr : dr + expect.shape[0], dc : dc + expect.shape[1]]
            assert np.array_equal(got, expect.astype(np.float32)), (band, win)
            assert np.array_equal(
                valid[dr : dr + expect.shape[0], dc : dc + expect.shape[1]], expect > 0
            )
            # outside the scene nothing is valid
            assert not valid[:dr].any() and not valid[:, :dc].any()
            assert not valid[dr + expect.shape[0] :].any()
    # a band on the scene's grid is read as it is
    data, _ = read_scene(scene, Window(10, 20, 64, 64), [1, 2, 3])
    assert np.array_equal(data, stacked[:3, 20:84, 10:74].astype(np.float32))


def test_band_files_predict_as_the_stacked_scene(bands, random_bundle, tmp_path, dask_client):
    from geoseg.stages.predict import predict_scene

    files = ",".join(str(bands[f"same{i}"]) for i in range(1, 7))
    a = predict_scene(random_bundle, files, tmp_path / "a.tif", block=256, client=dask_client)
    b = predict_scene(random_bundle, SCENE, tmp_path / "b.tif", block=256, client=dask_client)
    assert np.array_equal(_read(a.path), _read(b.path))
    mixed = ",".join(str(bands[f"b{i}"]) for i in range(1, 7))
    c = predict_scene(random_bundle, mixed, tmp_path / "c.tif", block=256, client=dask_client)
    with rasterio.open(c.path) as m, rasterio.open(SCENE) as s:
        assert (m.crs, m.transform, m.shape) == (s.crs, s.transform, s.shape)
        mine = m.read(1)
    # resampled bands move some pixels' classes, not most
    assert 0.5 < np.mean(mine == _read(b.path)) < 1.0


def test_stac_item_assets_are_matched_by_key_band_name_and_common_name(bands, tmp_path):

    import os

    # by asset key; a relative href resolves against the item's folder
    by_key = {f"b{i}": {"href": str(bands[f"b{i}"]), "type": "image/tiff"} for i in range(1, 7)}
    by_key["b1"] = {"href": os.path.relpath(bands["b1"], tmp_path), "type": "image/tiff"}
    item = _item(tmp_path / "item.json", by_key)
    [ref] = expand_scenes([str(item)])
    names = [f"b{i}" for i in range(1, 7)]
    scene = open_scene(ref, bands=names)
    assert [s.path for s in scene.sources] == [str(bands[n]) for n in names]
    assert scene.id == "nc-2000" and scene.datetime == "2000-05-24T00:00:00Z"
    # by eo:bands name, then common name, under other keys
    named = {
        f"B0{i}": {"href": str(bands[f"b{i}"]), "eo:bands": [{"name": f"b{i}"}]}
        for i in range(1, 4)
    }
    named |= {
        f"X{i}": {"href": str(bands[f"b{i}"]), "eo:bands": [{"name": "?", "common_name": f"b{i}"}]}
        for i in range(4, 7)
    }
    scene = open_scene(expand_scenes([str(_item(tmp_path / "named.json", named))])[0], bands=names)
    assert [s.path for s in scene.sources] == [str(bands[n]) for n in names]
    # an asset map overrides; a missing band names what the item has and the fix
    other = {f"band{i}": {"href": str(bands[f"b{i}"])} for i in range(1, 7)}
    ref = expand_scenes([str(_item(tmp_path / "other.json", other))])[0]
    with pytest.raises(
        BandMismatchError, match=r"no asset for band\(s\) b1, b2.*band1.*asset_map='b1=ASSET"
    ):
        open_scene(ref, bands=names)
    amap = {f"b{i}": f"band{i}" for i in range(1, 7)}
    scene = open_scene(ref, bands=names, asset_map=amap)
    assert [s.path for s in scene.sources] == [str(bands[n]) for n in names]


def test_stac_scenes_predict_like_their_band_files(bands, random_bundle, tmp_path, dask_client):
    from geoseg.stages.predict import predict_scene, predict_scenes

    assets = {f"b{i}": {"href": str(bands[f"b{i}"]), "type": "image/tiff"} for i in range(1, 7)}
    item = _item(tmp_path / "item.json", assets)
    a = predict_scene(random_bundle, item, tmp_path / "a.tif", block=256, client=dask_client)
    mixed = ",".join(str(bands[f"b{i}"]) for i in range(1, 7))
    b = predict_scene(random_bundle, mixed, tmp_path / "b.tif", block=256, client=dask_client)
    assert np.array_equal(_read(a.path), _read(b.path))
    # an ItemCollection is a scene per item; a text file lists scenes
    coll = tmp_path / "items.json"
    docs = [json.loads(item.read_text()) | {"id": n} for n in ("one", "two")]
    coll.write_text(json.dumps({"type": "FeatureCollection", "features": docs}))
    listed = tmp_path / "scenes.txt"
    listed.write_text(f"# scenes\n{mixed}\n\n{SCENE}\n")
    runs = predict_scenes(
        random_bundle, [coll, listed], tmp_path / "maps", block=256, client=dask_client
    )
    names = [r.path.name for r in runs]
    assert names == ["one.tif", "two.tif", "same_b1.tif", "nc_landsat7_2000.tif"]
    assert np.array_equal(_read(runs[0].path), _read(a.path))


def _bad_inputs(bands: dict[str, Path], d: Path) -> dict[str, tuple[list, list[str]]]:
    """Each bad input the issue lists: (the command's arguments after the bundle, what its one
    line must say)."""
    d.mkdir()
    assets = {f"b{i}": {"href": str(bands[f"b{i}"])} for i in range(1, 7)}
    item = _item(d / "item.json", assets)
    (d / "empty.json").write_text(json.dumps({"type": "FeatureCollection", "features": []}))
    plain = {"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": None}]}
    (d / "plain.geojson").write_text(json.dumps(plain))
    (d / "config.json").write_text(json.dumps({"window": 64}))
    no_b6 = _item(d / "no_b6.json", {k: v for k, v in assets.items() if k != "b6"})
    broken = _item(d / "broken.json", dict(assets, b3={"href": str(d / "gone.tif")}))
    three = ",".join(str(bands[f"same{i}"]) for i in range(1, 4))
    no_crs = d / "no_crs.tif"
    with rasterio.open(SCENE) as src:
        prof = src.profile
        del prof["crs"]
        with rasterio.open(no_crs, "w", **prof) as dst:
            dst.write(src.read())
    return {
        "empty collection": ([d / "empty.json"], ["holds no items"]),
        "not STAC": ([d / "plain.geojson"], ["feature 0 is not a STAC Item"]),
        "JSON, not STAC": ([d / "config.json"], ["not a STAC Item or ItemCollection"]),
        "asset missing": ([no_b6], ["no asset for band(s) b6", "--asset-map b6=ASSET", "b1, b2"]),
        "asset map wrong": ([item, "--asset-map", "b1=B01"], ["maps b1=B01", "no such asset"]),
        "asset unreadable": ([broken], ["asset 'b3' of STAC item 'nc-2000'", "gone.tif"]),
        "a scene lacks bands": ([SCENE, three, "--mosaic"], ["has 3 bands, the bundle expects 6"]),
        "nothing in bounds": ([item, "--bounds", "0,0,10,10"], ["no scene touches the area"]),
        "mosaic into a folder": ([item, SCENE, "--mosaic", "-o", d], ["needs a .tif file name"]),
        "no CRS in a mosaic": (
            [no_crs, SCENE, "--mosaic", "--allow-no-crs"],
            ["cannot be placed in a mosaic"],
        ),
        "resolution zero": ([item, "--mosaic", "--resolution", "0"], ["--resolution 0: expected"]),
        "resolution negative": ([item, "--mosaic", "--resolution", "-30"], ["greater than 0"]),
        "mask asset missing": (
            [item, "--mask", "SCL", "--mask-values", "8"],
            ["no mask asset 'SCL'", "b1, b2"],
        ),
        "mask without values": ([item, "--mask", "b1"], ["needs --mask-values"]),
        "one band file": ([f"{bands['b1']},"], ["two or more files"]),
        "crs without mosaic": ([item, "--crs", "EPSG:4326"], ["add --mosaic"]),
        "within and bounds": (
            [item, "--within", d / "item.json", "--bounds", "0,0,1,1"],
            ["not both"],
        ),
    }


BAD = [
    "empty collection", "not STAC", "JSON, not STAC", "asset missing", "asset map wrong",
    "asset unreadable", "a scene lacks bands", "nothing in bounds", "mosaic into a folder",
    "no CRS in a mosaic", "resolution zero", "resolution negative", "mask asset missing",
    "mask without values", "one band file", "crs without mosaic", "within and bounds",
]  # fmt: skip


@pytest.mark.parametrize("case", BAD)
def test_bad_catalog_inputs_get_one_clear_line(case, bands, random_bundle, tmp_path, dask_client):
    """Each gets one line on stderr, exit 1, and leaves no file behind."""
    from tests.test_cli import assert_one_line_error, invoke

    args, needles = _bad_inputs(bands, tmp_path / "in")[case]
    out = tmp_path / "out"
    if "-o" not in args:
        args = [*args, "-o", out / "map.tif"]
    r = invoke("predict", random_bundle, *args, "--scheduler", dask_client.scheduler.address)
    assert_one_line_error(r, *needles)
    assert not out.exists()
    assert sorted(p.name for p in (tmp_path / "in").iterdir()) == sorted(
        ["item.json", "empty.json", "plain.geojson", "config.json", "no_b6.json", "broken.json",
         "no_crs.tif"]
    )  # fmt: skip


def _crops(tmp_path: Path) -> tuple[Path, Path]:
    """Two overlapping crops of the NC scene: columns 0-299 and 190-488."""
    out = []
    with rasterio.open(SCENE) as src:
        for name, c0, c1 in (("west", 0, 300), ("east", 190, src.width)):
            win = Window(c0, 0, c1 - c0, src.height)
            prof = src.profile | {"width": c1 - c0, "transform": src.window_transform(win)}
            path = tmp_path / f"{name}.tif"
            with rasterio.open(path, "w", **prof) as dst:
                dst.write(src.read(window=win))
            out.append(path)
    return out[0], out[1]


def test_a_mosaic_of_two_crops_is_the_whole_scene_away_from_their_edges(
    random_bundle, tmp_path, dask_client
):
    import pystac
    from pystac.extensions.projection import ProjectionExtension

    from geoseg.stages.predict import predict_scene, predict_scenes

    west, east = _crops(tmp_path)
    whole = _read(
        predict_scene(
            random_bundle, SCENE, tmp_path / "whole.tif", block=256, client=dask_client
        ).path
    )
    [m] = predict_scenes(
        random_bundle, [west, east], tmp_path / "m.tif", mosaic=True, block=256, client=dask_client
    )
    with rasterio.open(m.path) as src, rasterio.open(SCENE) as s:
        assert (src.crs, src.transform, src.shape) == (s.crs, s.transform, s.shape)
        mosaic = src.read(1)
        tags = src.tags()
    rf = 24
    away = np.ones(whole.shape, bool)
    away[:, 300 - rf : 300 + rf] = away[:, 190 - rf : 190 + rf] = False
    assert np.array_equal(mosaic[away], whole[away])
    alone = {}
    for name, path in (("west", west), ("east", east)):
        alone[name] = _read(
            predict_scene(
                random_bundle, path, tmp_path / f"{name}_c.tif", block=256, client=dask_client
            ).path
        )
    overlap = (slice(None), slice(190, 300))
    agree = np.mean(mosaic[overlap] == whole[overlap])
    assert agree >= np.mean(alone["west"][:, 190:300] == whole[overlap])
    assert agree >= np.mean(alone["east"][:, :110] == whole[overlap])
    # the same map for any block size and every composite rule keeps the single-scene parts
    [m2] = predict_scenes(
        random_bundle, [west, east], tmp_path / "m2.tif", mosaic=True, block=512, client=dask_client
    )
    assert np.array_equal(_read(m2.path), mosaic)
    [last] = predict_scenes(
        random_bundle,
        [west, east],
        tmp_path / "last.tif",
        mosaic=True,
        composite="last",
        block=256,
        client=dask_client,
    )
    assert np.array_equal(_read(last.path)[:, 190:], alone["east"])
    # weighted blending: each scene's windows run once, and the map is the same for any block
    # size, to the rounding of the sums
    gauss = [
        _read(
            predict_scenes(
                random_bundle, [west, east], tmp_path / f"g{block}.tif", mosaic=True,
                blend="gaussian", block=block, client=dask_client,
            )[0].path
        )
        for block in (128, 256)
    ]  # fmt: skip
    assert np.mean(gauss[0] == gauss[1]) > 0.999 and np.mean(gauss[0] == mosaic) > 0.9
    # provenance: tags and a STAC item beside the map
    assert tags["GEOSEG_COMPOSITE"] == "mean" and tags["GEOSEG_BLEND"] == "trim"
    assert json.loads(tags["GEOSEG_SCENES"]) == [str(west), str(east)]
    item = pystac.Item.from_file(str(tmp_path / "m.json"))
    assert ProjectionExtension.ext(item).epsg == 32119
    assert ProjectionExtension.ext(item).shape == [443, 489]
    assert [lk.target for lk in item.links if lk.rel == "derived_from"] == [
        west.as_uri(),
        east.as_uri(),
    ]
    assert [c["value"] for c in item.assets["classes"].extra_fields["classification:classes"]] == [
        1,
        5,
        9,
    ]
    assert item.to_dict()["properties"]["geoseg:settings"]["composite"] == "mean"


def test_masked_pixels_do_not_vote(bands, random_bundle, tmp_path, dask_client):
    """A second item of the NC scene has a 'cloud' painted into its bands (rows 100-199, cols
    150-299 bright) and a cloud mask asset at twice the pixel size marking it. Predicted
    alone with --mask, the cloud is nodata; in a mosaic with the clear item, the cloud's
    pixels take the clear item's classes, as if the cloudy item were not there."""
    from geoseg.stages.predict import predict_scene, predict_scenes

    cloud = (slice(100, 200), slice(150, 300))
    with rasterio.open(SCENE) as src:
        crs, t = src.crs, src.transform
        assets = {}
        for i in range(1, 7):
            data = src.read(i)
            data[cloud] = 250
            assets[f"b{i}"] = {"href": str(_write(tmp_path / f"cloudy_b{i}.tif", data, crs, t))}
        flags = np.ones((-(-src.height // 2), -(-src.width // 2)), np.uint8)  # 1: clear
    coarse = t * t.scale(2, 2)
    clear_assets = {f"b{i}": {"href": str(bands[f"same{i}"])} for i in range(1, 7)}
    clear_assets["cloud"] = {"href": str(_write(tmp_path / "none.tif", flags, crs, coarse))}
    clear = _item(tmp_path / "clear.json", clear_assets, "clear")
    flags[50:100, 75:150] = 2  # cloud, at twice the pixel size: the painted rows and cols
    assets["cloud"] = {"href": str(_write(tmp_path / "cloud.tif", flags, crs, coarse))}
    cloudy = _item(tmp_path / "cloudy.json", assets, "cloudy")

    def probs(path: Path | None) -> np.ndarray:
        assert path is not None
        with rasterio.open(path) as src:
            return src.read()

    alone = predict_scene(
        random_bundle, clear, tmp_path / "clear_map.tif", probabilities=True, block=256,
        client=dask_client,
    )  # fmt: skip
    whole, whole_p = _read(alone.path), probs(alone.probabilities)
    masked = _read(
        predict_scene(
            random_bundle, cloudy, tmp_path / "cloudy_map.tif", mask="cloud", mask_values=[2],
            block=256, client=dask_client,
        ).path
    )  # fmt: skip
    assert (masked[cloud] == 255).all()
    outside = masked != 255
    outside[90:210, 140:310] = False  # the model sees the cloud a few px beyond it
    assert outside.sum() > 100_000 and np.array_equal(masked[outside], whole[outside])
    # in a mosaic, the cloud's pixels are the clear scene's alone (probabilities and classes)
    [m] = predict_scenes(
        random_bundle, [cloudy, clear], tmp_path / "m.tif", mosaic=True, mask="cloud",
        mask_values=[2], probabilities=True, block=256, client=dask_client,
    )  # fmt: skip
    assert np.array_equal(probs(m.probabilities)[:, *cloud], whole_p[:, *cloud])
    assert np.array_equal(_read(m.path)[cloud], whole[cloud])
    # unmasked, the painted cloud votes: the mean there is not the clear scene's (the random
    # model is not very sensitive to it, but some probabilities move)
    [u] = predict_scenes(
        random_bundle, [cloudy, clear], tmp_path / "u.tif", mosaic=True, probabilities=True,
        block=256, client=dask_client,
    )  # fmt: skip
    diff = np.abs(probs(u.probabilities)[:, *cloud].astype(int) - whole_p[:, *cloud])
    assert (diff > 0).mean() > 0.01


def test_within_maps_only_the_area(random_bundle, tmp_path, dask_client):
    import geopandas as gpd
    import shapely

    from geoseg.stages.predict import predict_scene

    with rasterio.open(SCENE) as s:
        b = s.bounds
        crs = s.crs
    area = shapely.box(b.left, b.bottom, b.left + (b.right - b.left) * 0.3, b.top)
    gpd.GeoDataFrame(geometry=[area], crs=crs).to_file(tmp_path / "area.gpkg")
    whole = _read(
        predict_scene(
            random_bundle, SCENE, tmp_path / "whole.tif", block=128, client=dask_client
        ).path
    )
    r = predict_scene(
        random_bundle,
        SCENE,
        tmp_path / "w.tif",
        block=128,
        within=tmp_path / "area.gpkg",
        client=dask_client,
    )
    part = _read(r.path)
    cols = int(489 * 0.3)
    assert r.blocks < 16  # blocks east of the area do not run
    assert (part[:, cols + 1 :] == 255).all()
    # away from the area's edge (the model's receptive field), the map is the whole scene's
    assert np.array_equal(part[:, : cols - 24], whole[:, : cols - 24])


def test_mosaic_probabilities_are_the_mean_of_the_scenes(random_bundle, tmp_path, dask_client):
    """--probabilities on a mosaic writes the composited probabilities: the mean of the two
    crops' where both have data, each crop's own elsewhere (within the 1/254 rounding)."""
    from geoseg.stages.predict import predict_scene, predict_scenes

    west, east = _crops(tmp_path)
    [m] = predict_scenes(
        random_bundle, [west, east], tmp_path / "m.tif", mosaic=True, probabilities=True,
        block=256, client=dask_client,
    )  # fmt: skip
    with rasterio.open(m.probabilities) as src:
        mosaic = src.read().astype(int)
        assert src.tags()["GEOSEG_COMPOSITE"] == "mean"
    alone = {}
    for name, path in (("west", west), ("east", east)):
        r = predict_scene(
            random_bundle, path, tmp_path / f"{name}.c.tif", probabilities=True, block=256,
            client=dask_client,
        )  # fmt: skip
        with rasterio.open(r.probabilities) as src:
            alone[name] = src.read().astype(int)
    assert np.array_equal(mosaic[:, :, :190], alone["west"][:, :, :190])
    assert np.array_equal(mosaic[:, :, 300:], alone["east"][:, :, 110:])
    w, e = alone["west"][:, :, 190:300], alone["east"][:, :, :110]
    both = (w[0] != 255) & (e[0] != 255)
    assert both.mean() > 0.7  # the scene has nodata of its own
    # each input rounded to 1/254 (half a step each), and the mosaic runs each scene on its own
    # window grid, which for the east crop is shifted by 190 px: a step or two at some pixels
    diff = np.abs(mosaic[:, :, 190:300][:, both] - (w[:, both] + e[:, both]) / 2)
    assert diff.max() <= 2 and diff.mean() < 0.5
    # the class map is the argmax of those probabilities
    classes = _read(m.path)
    valid = classes != 255
    assert np.mean(np.array([1, 5, 9])[mosaic.argmax(0)][valid] == classes[valid]) > 0.99


def test_a_stopped_mosaic_resumes_with_only_its_unfinished_blocks(
    random_bundle, tmp_path, dask_client
):
    """Kill a real `geoseg predict --mosaic` (client and workers) while it predicts the
    scenes' blocks; the same call run again predicts only the scene blocks that were not done
    (fewer windows than a fresh run), and gives the map a fresh run gives."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from geoseg.stages.predict import predict_scenes

    west, east = _crops(tmp_path)
    out, parts = tmp_path / "m.tif", tmp_path / ".m.tif.parts"
    geoseg = str(Path(sys.executable).parent / "geoseg")
    cmd = [geoseg, "predict", str(random_bundle), str(west), str(east), "-o", str(out),
           "--mosaic", "--window", "64", "--block", "64", "--workers", "1", "-q"]  # fmt: skip
    proc = subprocess.Popen(cmd, start_new_session=True, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(parts.glob("scene_*/block_*.done"))) < 8:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(list(parts.glob("scene_*/block_*.done")))
    assert done_before >= 8 and not out.exists() and not out.with_suffix(".json").exists()
    [r] = predict_scenes(
        random_bundle, [west, east], out, mosaic=True, block=64, client=dask_client
    )
    assert not parts.exists()
    [fresh] = predict_scenes(
        random_bundle, [west, east], tmp_path / "f.tif", mosaic=True, window=64, block=64,
        client=dask_client,
    )  # fmt: skip
    assert 0 < r.windows_run < fresh.windows_run
    assert np.array_equal(_read(out), _read(fresh.path))


def test_the_command_line_predicts_a_mosaic_of_band_files_and_a_stac_item(
    bands, random_bundle, tmp_path, dask_client
):
    """`geoseg predict BUNDLE ITEM B1.tif,...,B6.tif --mosaic -o m.tif` writes one map, its
    probabilities and its STAC item, and says so in one line."""
    from tests.test_cli import invoke

    assets = {f"b{i}": {"href": str(bands[f"b{i}"])} for i in range(1, 7)}
    item = _item(tmp_path / "item.json", assets)
    files = ",".join(str(bands[f"same{i}"]) for i in range(1, 7))
    out = tmp_path / "m.tif"
    r = invoke(
        "predict", random_bundle, item, files, "--mosaic", "--composite", "max-confidence",
        "-o", out, "--probabilities", "--block", 256, "--scheduler", dask_client.scheduler.address,
        "-q",
    )  # fmt: skip
    assert r.exit_code == 0, r.stderr
    assert r.stdout.strip() == f"wrote {out} and {tmp_path / 'm_probabilities.tif'}"
    with rasterio.open(out) as src, rasterio.open(SCENE) as s:
        assert (src.crs, src.transform, src.shape) == (s.crs, s.transform, s.shape)
        assert src.tags()["GEOSEG_COMPOSITE"] == "max-confidence"
        assert json.loads(src.tags()["GEOSEG_SCENES"]) == ["nc-2000", files]
    item_out = json.loads((tmp_path / "m.json").read_text())
    assert "probabilities" in item_out["assets"]
    assert item_out["properties"]["datetime"] == "2000-05-24T00:00:00Z"


def test_training_on_a_stac_item_names_the_bands_by_asset(bands, tmp_path, dask_client):
    """A model trained on a STAC item (and on band files at mixed resolutions) records the
    item's asset keys as band names; another item whose assets carry those names as eo:bands
    names is then predicted; --band-names sets them, one per band."""
    from geoseg.bundle import load_bundle
    from geoseg.errors import ConfigError
    from geoseg.stages.predict import predict_scene
    from geoseg.stages.train import train
    from tests.conftest import LABELS

    small = {"arch_args": {"depth": 2, "base_width": 4}, "epochs": 1, "samples_per_epoch": 32}
    assets = {f"b{i}": {"href": str(bands[f"same{i}"]), "type": "image/tiff"} for i in range(1, 7)}
    item = _item(tmp_path / "item.json", assets)
    r = train(item, LABELS, tmp_path / "m.bundle", bands=[2, 3, 4], client=dask_client, **small)
    assert [(b.index, b.name) for b in load_bundle(r.path).bands] == [
        (2, "b2"),
        (3, "b3"),
        (4, "b4"),
    ]
    other = {
        f"SR_B{i}": {"href": str(bands[f"b{i}"]), "eo:bands": [{"name": f"b{i}"}]}
        for i in range(1, 7)
    }
    p = predict_scene(
        r.path, _item(tmp_path / "other.json", other), tmp_path / "c.tif", client=dask_client
    )
    assert p.valid_pixels > 0.7 * 443 * 489
    mixed = ",".join(str(bands[f"b{i}"]) for i in range(1, 7))
    r2 = train(
        mixed, LABELS, tmp_path / "n.bundle", bands=[4, 5, 6], band_names=["nir", "swir1", "swir2"],
        client=dask_client, **small,
    )  # fmt: skip
    assert [b.name for b in load_bundle(r2.path).bands] == ["nir", "swir1", "swir2"]
    with pytest.raises(ConfigError, match="band_names names 2 bands, the model reads 3"):
        train(mixed, LABELS, tmp_path / "x.bundle", bands=[4, 5, 6], band_names=["a", "b"],
              client=dask_client, **small)  # fmt: skip
    assert not (tmp_path / "x.bundle").exists()


@pytest.mark.parametrize("composite", ["mean", "max-confidence", "first", "last"])
def test_a_mosaic_block_composites_as_the_rule_says_pixel_by_pixel(tmp_path, composite):
    """composite_block against the rule written out pixel by pixel: three scenes' parts, each
    on its own offset, with nodata holes, random classes and probabilities."""
    from affine import Affine
    from rasterio.crs import CRS
    from rasterio.windows import Window

    from geoseg.classes import NODATA
    from geoseg.io import Grid
    from geoseg.tasks.predict import CompositeJob, SceneParts, _write_parts, composite_block

    rng = np.random.default_rng(3)
    ids, size = (2, 4, 7), 40
    target = Grid(CRS.from_epsg(32617), Affine(30, 0, 0, 0, -30, 0), 64, 64)
    scenes, sources = [], []
    for s, offset in enumerate([(0, 0), (10, 20), (24, 8)]):
        folder = tmp_path / f"scene{s}"
        folder.mkdir()
        probs = rng.dirichlet(np.ones(3) * 0.7, size=(size, size)).transpose(2, 0, 1)
        scaled = np.rint(probs * 254).astype(np.uint8)
        cls = np.asarray(ids, np.uint8)[probs.argmax(0)]
        hole = rng.random((size, size)) < 0.15
        cls[hole], scaled[:, hole] = NODATA, NODATA
        core = Window(0, 0, size, size)  # one part per scene, on its own grid
        _write_parts(folder, core, target, cls, scaled)
        scenes.append((offset, cls, scaled))
        sources.append(SceneParts(str(folder), offset, (core,)))
    out = tmp_path / "mosaic"
    out.mkdir()
    block = Window(4, 6, 50, 48)  # a mosaic block that cuts through every scene
    job = CompositeJob(block, tuple(sources), str(out), target, ids, composite, True)
    composite_block(job)
    with rasterio.open(out / "block_6_4.tif") as f:
        got = f.read(1)
    with rasterio.open(out / "block_6_4.prob.tif") as f:
        got_probs = f.read()

    for r in range(48):
        for c in range(50):
            row, col = r + 6, c + 4
            votes = []  # (class, probabilities) of each scene with data here, in order
            for (r0, c0), cls, scaled in scenes:
                i, j = row - r0, col - c0
                if 0 <= i < size and 0 <= j < size and cls[i, j] != NODATA:
                    votes.append((int(cls[i, j]), scaled[:, i, j].astype(int)))
            if not votes:
                assert got[r, c] == NODATA and (got_probs[:, r, c] == NODATA).all()
                continue
            if composite == "first":
                want, p = votes[0]
            elif composite == "last":
                want, p = votes[-1]
            elif composite == "max-confidence":
                want, p = max(votes, key=lambda v: v[1].max())  # the first of equal maxima
            else:
                want, p = votes[0] if len(votes) == 1 else (None, None)
                if len(votes) > 1:
                    mean = np.mean([v[1] for v in votes], axis=0)
                    want, p = ids[int(np.argmax(mean))], np.rint(mean)
            assert got[r, c] == want, (r, c, votes)
            np.testing.assert_array_equal(got_probs[:, r, c], p)
