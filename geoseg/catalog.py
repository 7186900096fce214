"""Scenes from what users point at: raster files, band files joined with commas, STAC Items,
ItemCollections and text lists of scenes.

A SCENE argument is expanded on the client into scenes (:func:`expand_scenes`), and each is
opened into a :class:`geoseg.io.SceneProfile` (:func:`open_scene`). A scene made of several
files lists its bands as :class:`geoseg.io.BandSource`; its grid is the finest band's, and every
band is read onto it block by block (:func:`geoseg.io.read_scene`). A STAC Item's assets are
matched to the bands a bundle reads by asset key, then by ``eo:bands`` name, then by
``eo:bands`` common name; an asset map (``red=B04``) overrides.
"""

from __future__ import annotations

import json
import os
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from geoseg.errors import (
    BandMismatchError,
    ConfigError,
    InputNotFoundError,
    NotARasterError,
    option,
)
from geoseg.io import BandSource, Grid, SceneProfile, is_url, read_profile, resolve_path

_STAC_SUFFIXES = (".json", ".geojson")
_LIST_SUFFIXES = (".txt", ".list")
# asset media types and roles that are not pixels to predict on
_NOT_DATA_ROLES = {"thumbnail", "overview", "metadata", "visual"}


@dataclass(frozen=True)
class StacItem:
    """A STAC Item as read: its JSON and where it came from (relative hrefs resolve there)."""

    doc: dict[str, Any] = field(hash=False, compare=False)
    href: str

    @property
    def id(self) -> str:
        return str(self.doc.get("id") or Path(self.href).stem)

    @property
    def datetime(self) -> str | None:
        props = self.doc.get("properties") or {}
        value = props.get("datetime") or props.get("start_datetime")
        return str(value) if value else None

    def asset_href(self, key: str) -> str:
        href = str(self.doc["assets"][key]["href"])
        if is_url(href) or os.path.isabs(href):
            return href
        if is_url(self.href):
            return urllib.parse.urljoin(self.href, href)
        return str((Path(self.href).parent / href).resolve())

    def asset_bands(self, key: str) -> list[dict[str, Any]]:
        """The band objects of an asset (``eo:bands``, or STAC 1.1's ``bands``)."""
        asset = self.doc["assets"][key]
        bands = asset.get("eo:bands") or asset.get("bands") or []
        return [b for b in bands if isinstance(b, dict)]

    def data_assets(self) -> list[str]:
        """The assets that hold pixels to learn from, in the item's order."""
        keys = []
        for key, asset in self.doc["assets"].items():
            roles = set(asset.get("roles") or [])
            kind = str(asset.get("type") or "image/tiff")
            if roles & _NOT_DATA_ROLES and "data" not in roles:
                continue
            if "cloud" in roles or "data-mask" in roles or not kind.startswith("image/"):
                continue
            keys.append(key)
        return keys


SceneRef = str | tuple[str, ...] | StacItem
"""One scene before it is opened: a raster path or GDAL URL, band files, or a STAC Item."""


def _read_json(href: str) -> Any:
    try:
        if href.startswith(("http://", "https://")):
            with urllib.request.urlopen(href, timeout=60) as r:
                return json.loads(r.read())
        return json.loads(Path(href).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputNotFoundError(
            f"scene {href!r} does not exist; check the path", filename=href
        ) from None
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"scene {href!r} could not be read as JSON ({exc}); expected a STAC Item or "
            "ItemCollection"
        ) from None


def _is_item(doc: Any) -> bool:
    return (
        isinstance(doc, dict)
        and doc.get("type") == "Feature"
        and "stac_version" in doc
        and isinstance(doc.get("assets"), dict)
    )


def expand_scenes(args: Sequence[str | os.PathLike[str]]) -> list[SceneRef]:
    """Every scene the arguments name, in order: a raster path or GDAL URL stays one scene;
    ``a.tif,b.tif`` is one scene of band files; a STAC Item (``.json``) is one scene; an
    ItemCollection or FeatureCollection of Items is one scene per Item; a text file
    (``.txt``) lists one SCENE per line (``#`` starts a comment; relative paths are relative
    to the file)."""
    out: list[SceneRef] = []
    for arg in args:
        out.extend(_expand(str(arg), depth=0))
    return out


def _expand(arg: str, depth: int) -> list[SceneRef]:
    if depth > 3:
        raise ConfigError(f"scene list {arg!r} lists itself; a list may not include itself")
    if "," in arg and not os.path.exists(arg):
        parts = tuple(resolve_path(p.strip()) for p in arg.split(",") if p.strip())
        if len(parts) < 2:
            raise ConfigError(f"band files {arg!r}: expected two or more files joined by commas")
        return [parts]
    lower = urllib.parse.urlparse(arg).path.lower() if is_url(arg) else arg.lower()
    if lower.endswith(_LIST_SUFFIXES):
        return _expand_list(arg, depth)
    if lower.endswith(_STAC_SUFFIXES):
        href = arg if is_url(arg) else resolve_path(arg)
        doc = _read_json(href)
        if _is_item(doc):
            return [StacItem(doc, href)]
        if isinstance(doc, dict) and doc.get("type") == "FeatureCollection":
            features = doc.get("features") or []
            if not features:
                raise ConfigError(f"ItemCollection {arg!r} holds no items; expected STAC Items")
            bad = [i for i, f in enumerate(features) if not _is_item(f)]
            if bad:
                raise ConfigError(
                    f"{arg!r} is a FeatureCollection but feature {bad[0]} is not a STAC Item "
                    "(it needs stac_version and assets); expected a STAC ItemCollection"
                )
            return [StacItem(f, href) for f in features]
        raise ConfigError(
            f"{arg!r} is JSON but not a STAC Item or ItemCollection (type "
            f"{doc.get('type') if isinstance(doc, dict) else type(doc).__name__!r}); expected a "
            "STAC Item, an ItemCollection, or a raster"
        )
    return [resolve_path(arg)]


def _expand_list(arg: str, depth: int) -> list[SceneRef]:
    path = Path(arg)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise InputNotFoundError(
            f"scene list {arg!r} does not exist; check the path", filename=arg
        ) from None
    out: list[SceneRef] = []
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        items = [p.strip() for p in line.split(",")]
        items = [p if is_url(p) or os.path.isabs(p) else str(path.parent / p) for p in items]
        out.extend(_expand(",".join(items), depth + 1))
    if not out:
        raise ConfigError(f"scene list {arg!r} lists no scene; expected one SCENE per line")
    return out


def parse_asset_map(text: str | Mapping[str, str] | None) -> dict[str, str]:
    """``red=B04,nir=B08`` (or a mapping) as ``{band name: asset key}``."""
    if text is None:
        return {}
    if isinstance(text, Mapping):
        return {str(k): str(v) for k, v in text.items()}
    out = {}
    for pair in str(text).split(","):
        if not pair.strip():
            continue
        if "=" not in pair:
            raise ConfigError(
                f"{option('--asset-map', None)} {text!r}: expected BAND=ASSET pairs joined by "
                "commas, such as red=B04,nir=B08"
            )
        k, v = pair.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def open_scene(
    ref: SceneRef,
    *,
    bands: Sequence[str] | None = None,
    asset_map: Mapping[str, str] | None = None,
    mask: str | None = None,
    mask_values: Sequence[float] = (),
) -> SceneProfile:
    """The profile of one scene, reading headers only. ``bands``: the band names a bundle
    reads, for matching a STAC Item's assets (without it an Item gives all its data assets).
    ``mask``: a band number of a raster or band-file scene, or an asset of an Item, whose
    ``mask_values`` mark pixels not to predict."""
    if isinstance(ref, StacItem):
        profile = _open_item(ref, bands, dict(asset_map or {}))
        if mask is not None:
            if mask not in ref.doc["assets"]:
                raise ConfigError(
                    f"STAC item {ref.id!r} has no mask asset {mask!r}; its assets are "
                    f"{', '.join(ref.doc['assets'])}; pass {option('--mask', None)} one of them"
                )
            return _with_mask(profile, _asset_source(ref, mask, 1, mask), mask_values)
        return profile
    profile = _open_band_files(ref) if isinstance(ref, tuple) else read_profile(ref)
    if mask is None:
        return profile
    try:
        number = int(mask)
    except ValueError:
        raise ConfigError(
            f"{option('--mask', None)} {mask!r}: for a raster scene give a band number "
            f"(1-{profile.count}); asset names are for STAC items"
        ) from None
    if not 1 <= number <= profile.count:
        raise ConfigError(
            f"scene {profile.name!r} has bands 1-{profile.count}, no mask band {number}"
        )
    if profile.sources:
        source = profile.sources[number - 1]
    else:
        source = BandSource(
            profile.path, number, str(number), profile.grid, profile.nodata, profile.dtype
        )
    return _with_mask(profile, source, mask_values)


def _with_mask(profile: SceneProfile, source: BandSource, values: Sequence[float]) -> SceneProfile:
    if not values:
        raise ConfigError(
            f"{option('--mask', None)} needs {option('--mask-values', None)}: the values of the "
            "mask that mark pixels not to predict, such as 8,9,10 (cloud, shadow)"
        )
    return replace(profile, mask=source, mask_values=tuple(float(v) for v in values))


def _band_sources(path: str) -> list[BandSource]:
    p = read_profile(path)
    return [
        BandSource(path, i, p.descriptions[i - 1] or Path(path).stem, p.grid, p.nodata, p.dtype)
        for i in range(1, p.count + 1)
    ]


def _finest(sources: Sequence[BandSource]) -> Grid:
    """The grid of the band with the smallest pixels (the first of those)."""
    return min(sources, key=lambda s: s.grid.res[0] * s.grid.res[1]).grid


def _virtual(
    path: str,
    sources: list[BandSource],
    *,
    by_name: bool = False,
    scene_id: str = "",
    datetime: str | None = None,
) -> SceneProfile:
    grid = _finest(sources)
    nodatas = {s.nodata for s in sources}
    return SceneProfile(
        path=path,
        crs=grid.crs,
        transform=grid.transform,
        width=grid.width,
        height=grid.height,
        count=len(sources),
        dtype=sources[0].dtype,
        nodata=nodatas.pop() if len(nodatas) == 1 else None,
        descriptions=tuple(s.name for s in sources),
        sources=tuple(sources),
        by_name=by_name,
        id=scene_id,
        datetime=datetime,
    )


def _open_band_files(files: tuple[str, ...]) -> SceneProfile:
    sources = [s for f in files for s in _band_sources(f)]
    if any(s.grid.crs is None for s in sources) and len({s.grid for s in sources}) > 1:
        raise ConfigError(
            f"band files {', '.join(files)} lie on different grids and some have no CRS, so "
            "they cannot be resampled onto one grid; assign a CRS (gdal_edit.py -a_srs)"
        )
    stems = [Path(f).stem for f in files]
    common = os.path.commonprefix(stems).rstrip("_-. ")  # noqa: RUF071 (names, not paths)
    return _virtual(",".join(files), sources, scene_id=common or stems[0])


def _names_of(item: StacItem, key: str) -> list[tuple[int, str | None, str | None]]:
    """(band number, name, common name) of each band of an asset."""
    return [
        (i, b.get("name"), b.get("common_name") or b.get("eo:common_name"))
        for i, b in enumerate(item.asset_bands(key), start=1)
    ]


def _match(item: StacItem, band: str, asset_map: Mapping[str, str]) -> tuple[str, int] | None:
    """The asset (and band number in it) that holds ``band``: by the asset map, then by asset
    key, then by ``eo:bands`` name, then by common name (each exact, then ignoring case)."""
    assets = item.doc["assets"]
    if band in asset_map:
        key = asset_map[band]
        return (key, 1) if key in assets else None
    for fold in (str, str.lower):
        for key in assets:
            if fold(key) == fold(band):
                return key, 1
        for slot in (1, 2):
            for key in assets:
                for n, *names in _names_of(item, key):
                    name = names[slot - 1]
                    if name is not None and fold(name) == fold(band):
                        return key, n
    return None


def _asset_source(item: StacItem, key: str, band: int, name: str) -> BandSource:
    href = item.asset_href(key)
    try:
        p = read_profile(href, f"asset {key!r} of STAC item {item.id!r}")
    except (InputNotFoundError, NotARasterError) as exc:
        raise NotARasterError(
            f"asset {key!r} of STAC item {item.id!r} ({href}) cannot be read: {exc}",
            filename=href,
        ) from None
    return BandSource(href, band, name, p.grid, p.nodata, p.dtype)


def _describe_assets(item: StacItem) -> str:
    out = []
    for key in item.doc["assets"]:
        names = [n for _, *ns in _names_of(item, key) for n in ns if n]
        out.append(f"{key} ({'/'.join(dict.fromkeys(names))})" if names else key)
    return ", ".join(out)


def _open_item(
    item: StacItem, bands: Sequence[str] | None, asset_map: dict[str, str]
) -> SceneProfile:
    unknown = [k for k, v in asset_map.items() if v not in item.doc["assets"]]
    if unknown:
        raise BandMismatchError(
            f"{option('--asset-map', None)} maps {', '.join(f'{k}={asset_map[k]}' for k in unknown)}"
            f" but STAC item {item.id!r} has no such asset; its assets are {_describe_assets(item)}",
            filename=item.href,
        )
    if bands is None:
        keys = [asset_map.get(k, k) for k in asset_map] or item.data_assets()
        if not keys:
            raise BandMismatchError(
                f"STAC item {item.id!r} has no data asset to read; its assets are "
                f"{_describe_assets(item)}",
                filename=item.href,
            )
        sources = []
        for key in keys:
            n = max(1, len(item.asset_bands(key)))
            sources += [_asset_source(item, key, i, key) for i in range(1, n + 1)]
        return _virtual(item.href, sources, by_name=True, scene_id=item.id, datetime=item.datetime)
    matched = {b: _match(item, b, asset_map) for b in bands}
    missing = [b for b, m in matched.items() if m is None]
    if missing:
        example = ",".join(f"{b}=ASSET" for b in missing)
        raise BandMismatchError(
            f"STAC item {item.id!r} has no asset for band(s) {', '.join(missing)} that the bundle "
            f"reads (it reads {', '.join(bands)}); the item's assets are {_describe_assets(item)}; "
            f"name the assets with {option('--asset-map', example)}",
            filename=item.href,
            expected=list(bands),
            found=list(item.doc["assets"]),
        )
    sources = []
    for b in bands:
        key, number = matched[b]  # type: ignore[misc]
        sources.append(_asset_source(item, key, number, b))
    return _virtual(item.href, sources, by_name=True, scene_id=item.id, datetime=item.datetime)


def scene_ids(profiles: Sequence[SceneProfile]) -> list[str]:
    """What names each scene in provenance: a STAC Item's id, else its path(s)."""
    return [p.id if p.by_name else p.path for p in profiles]
