"""The model bundle: weights plus the whole preprocessing contract, in one file.

A bundle is a ``torch.save`` archive holding plain data only (loaded with ``weights_only=True``):
``{"format": "geoseg.bundle/1", "contract": {...}, "state_dict": {...}}``. The contract says which
bands the model reads and in what order, how to normalise them, the scene nodata, the classes (the
users' own codes, names and colours), the default window and overlap, the model's receptive field,
the training scene's CRS and pixel size, the geoseg version, and a content hash over all of it.
An ensemble (``geoseg ensemble``) is one bundle whose contract counts its ``members``: models of
one architecture whose mean class probabilities it predicts.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rasterio.crs import CRS
from rasterio.windows import Window
from torch import nn

from geoseg.classes import ClassInfo
from geoseg.derive import Derived, positions
from geoseg.errors import BandMismatchError, BundleError
from geoseg.io import (
    SceneProfile,
    atomic_output,
    check_input,
    crs_equivalent,
    read_scene,
    same_file,
)
from geoseg.models import Ensemble, create_model

FORMAT = "geoseg.bundle/1"


@dataclass(frozen=True)
class BandInfo:
    """A band the model reads: its 1-based index in the scene and its name."""

    index: int
    name: str


@dataclass
class Contract:
    """Everything predict needs besides the weights."""

    arch: str
    arch_args: dict[str, Any]
    bands: list[BandInfo]
    mean: list[float]
    std: list[float]
    classes: list[ClassInfo]
    window: int
    overlap: int
    receptive_field: int | None  # None: every output pixel sees the whole window
    crs: str | None
    pixel_size: tuple[float, float]
    nodata: float | None = None
    # the smallest overlap at which tiles differ from the whole on < 0.05 % of pixels, measured
    # at training (geoseg.tuning.effective_overlap); None: not found, or an older bundle
    effective_overlap: int | None = None
    # derived bands (geoseg.derive), computed from ``bands`` and fed to the model after them;
    # ``mean`` and ``std`` cover them too
    derived: list[dict[str, str]] = field(default_factory=list)
    geoseg_version: str = ""
    training: dict[str, Any] = field(default_factory=dict)
    # models of this architecture whose mean probabilities the bundle predicts (geoseg ensemble)
    members: int = 1

    @property
    def channels(self) -> int:
        """The model's input channels: the bands read, then the derived bands."""
        return len(self.bands) + len(self.derived)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        if d["members"] == 1:  # a single model's contract reads as it always has
            del d["members"]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Contract:
        d = dict(d)
        d["bands"] = [BandInfo(**b) for b in d["bands"]]
        d["classes"] = [ClassInfo(**c) for c in d["classes"]]
        d["pixel_size"] = tuple(d["pixel_size"])
        return cls(**d)


@dataclass
class Bundle:
    """A loaded bundle: ``model`` (a torch module in eval mode) and its contract."""

    model: nn.Module
    contract: Contract
    hash: str
    path: str | None = None

    @property
    def bands(self) -> list[BandInfo]:
        return self.contract.bands

    @property
    def shape_key(self) -> str:
        """What the model's speed depends on, unlike its weights: its architecture and their
        arguments, its input channels, classes and members. A model trained again in the same
        shape (another seed, more epochs, mended labels) runs at the same speed."""
        c = self.contract
        shape = [c.arch, c.arch_args, c.channels, len(c.classes), c.members]
        return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()

    @property
    def classes(self) -> list[ClassInfo]:
        return self.contract.classes

    @property
    def window(self) -> int:
        return self.contract.window

    @property
    def overlap(self) -> int:
        return self.contract.overlap

    @property
    def class_ids(self) -> np.ndarray:
        """Model output index -> the users' class code."""
        return np.array([c.id for c in self.classes], dtype=np.uint8)

    @property
    def band_names(self) -> list[str]:
        return [b.name for b in self.bands]

    @property
    def derived_pairs(self) -> tuple[tuple[int, int], ...]:
        """Where each derived band's two bands are among the bands read."""
        derived = [Derived(**d) for d in self.contract.derived]
        return positions(derived, self.band_names, [b.index for b in self.bands])

    def indexes_in(self, profile: SceneProfile) -> list[int]:
        """The 1-based bands of ``profile`` this model reads, in its order: the bundle's band
        indexes, or for a scene whose bands are found by name (a STAC item) the bands of those
        names."""
        if not profile.by_name:
            return [b.index for b in self.bands]
        names = list(profile.descriptions)
        return [names.index(b.name) + 1 for b in self.bands]

    def check_scene(self, profile: SceneProfile) -> None:
        """Raise :class:`BandMismatchError` unless ``profile`` has every band this model reads
        (the bundle's band indexes: a model trained on bands 2,3,4 reads those of a 6-band
        scene; by name for a STAC item)."""
        if profile.by_name:
            missing = [b.name for b in self.bands if b.name not in profile.descriptions]
            if missing:
                raise BandMismatchError(
                    f"scene {profile.name!r} has no band(s) {', '.join(missing)} that the bundle "
                    f"reads; it has {', '.join(str(d) for d in profile.descriptions)}",
                    filename=profile.path,
                    expected=self.band_names,
                    found=list(profile.descriptions),
                )
            return
        indexes = [b.index for b in self.bands]
        if max(indexes) > profile.count:
            expected = ",".join(b.name for b in self.bands)
            which = (
                f"{len(indexes)}"
                if indexes == list(range(1, len(indexes) + 1))
                else f"bands {','.join(map(str, indexes))}"
            )
            raise BandMismatchError(
                f"scene {profile.name!r} has {profile.count} bands, the bundle expects {which} "
                f"({expected}); use a scene with these bands or a bundle trained on this scene's "
                "bands",
                filename=profile.path,
                expected=indexes,
                found=profile.count,
            )


SCALE_Z = 4.0  # a band's sample mean this many training deviations away is another scale
SCALE_RATIO = 5.0  # or its deviation this many times larger or smaller
PIXEL_RATIO = 1.5  # a pixel this many times larger or smaller than in training
SAMPLE_AREA = 1 << 20  # px of scene per sampled window, beyond the first four


def compare_scene(bundle: Bundle, profile: SceneProfile, *, samples: int = 16) -> list[str]:
    """How ``profile``'s scene differs from the bundle's training scene, one line each: band
    values on another scale (from a sample of ``samples`` windows against the bundle's
    normalisation), another pixel size, another CRS. Empty when nothing stands out."""
    c = bundle.contract
    lines = []
    stats = _sample_stats(bundle, profile, samples)
    if stats is not None:
        off = []
        for band, (m, s), bm, bs in zip(bundle.bands, stats, c.mean, c.std):
            z = abs(m - bm) / bs if bs > 0 else 0.0
            ratio = s / bs if bs > 0 and s > 0 else 1.0
            if z > SCALE_Z or not 1 / SCALE_RATIO < ratio < SCALE_RATIO:
                off.append(
                    f"band {band.index} ({band.name}) mean {m:.4g}, std {s:.4g} against "
                    f"{bm:.4g}, {bs:.4g}"
                )
        if off:
            lines.append(
                f"scene {profile.path!r} has values on another scale than the training scene's "
                f"({'; '.join(off[:3])}{'; ...' if len(off) > 3 else ''}); the map is likely "
                "wrong: scale the scene to the training scene's units, or train on scenes like it"
            )
    if c.crs is None or profile.crs is None:
        return lines
    crs = CRS.from_user_input(c.crs)
    if not _same_crs(crs, profile):
        lines.append(
            f"scene {profile.path!r} is in {profile.crs.to_string()}, the bundle was trained in "
            f"{crs.to_string()}; the model sees the scene on its own grid, so reproject it "
            f"(gdalwarp -t_srs {crs.to_string()}) if the map looks wrong"
        )
    here = _pixel_metres(profile.crs, profile.res, profile)
    there = _pixel_metres(crs, c.pixel_size, profile)
    ratio = here / there if there > 0 else 1.0
    if not 1 / PIXEL_RATIO < ratio < PIXEL_RATIO:
        lines.append(
            f"scene {profile.path!r} has pixels of {here:.4g} m, the bundle was trained on "
            f"{there:.4g} m ({ratio:.3g}x); objects look {'smaller' if ratio > 1 else 'larger'}"
            " to the model than in training: resample the scene to the training pixel size "
            "(gdalwarp -tr) or train at this one"
        )
    return lines


def sample_windows(profile: SceneProfile, samples: int) -> list[Window]:
    """Up to ``samples`` windows of 128 px spread over the scene, for the scale check. A small
    scene gets fewer: one window per :data:`SAMPLE_AREA` px, at least four. Each window
    decodes every internal tile it touches, of every band (12 ms for a 512² px tile of 6
    deflated bands), so 16 windows decoded all of a 2048² scene before its blocks read it
    again: 0.15 s of a 3 s call; 4 windows tell a band on another scale as well. In a tiled
    file each window lies inside one tile: centred on tile corners, as they fell in a 2048²
    scene of 512 px tiles, each decoded four."""
    side = 128
    samples = min(samples, max(4, profile.width * profile.height // SAMPLE_AREA))
    n = max(1, int(np.sqrt(samples)))
    tile = profile.tile

    def starts(length: int, block: int) -> np.ndarray:
        # centred in n equal strips: inside the scene, away from fill along its edges
        centre = (np.arange(n) + 0.5) / n * length
        start = centre - side / 2
        if side <= block < length:  # in the middle of the tile that holds the centre
            first = centre // block * block
            start = first + (np.minimum(block, length - first) - side) / 2
        return np.clip(start, 0, max(0, length - side)).astype(int)

    rows, cols = starts(profile.height, tile[0]), starts(profile.width, tile[1])
    return [
        Window(col, r, min(side, profile.width), min(side, profile.height))
        for r in sorted(set(rows.tolist()))
        for col in sorted(set(cols.tolist()))
    ]


def _sample_stats(
    bundle: Bundle, profile: SceneProfile, samples: int
) -> list[tuple[float, float]] | None:
    """Per band, the mean and deviation of the valid pixels of :func:`sample_windows` (None if
    none is valid)."""
    from concurrent.futures import ThreadPoolExecutor

    indexes = bundle.indexes_in(profile)
    windows = sample_windows(profile, samples)

    def values(win: Window) -> np.ndarray:
        data, valid = read_scene(profile, win, indexes, bundle.contract.nodata)
        return data[:, valid].astype(np.float64)

    # in threads (GDAL decodes outside the GIL): 0.14 s one after another for a 2048² scene
    with ThreadPoolExecutor(4) as pool:
        d = np.concatenate(list(pool.map(values, windows)), axis=1)
    if d.shape[1] == 0:
        return None
    return [(float(m), float(s)) for m, s in zip(d.mean(axis=1), d.std(axis=1))]


def _same_crs(crs: CRS, profile: SceneProfile) -> bool:
    return crs == profile.crs or crs_equivalent(profile, crs)


def _pixel_metres(crs: CRS, res: tuple[float, float], near: SceneProfile) -> float:
    """The side of a pixel of ``res`` in ``crs``, in metres (at the centre of ``near`` for a
    geographic CRS)."""
    size = float(np.sqrt(abs(res[0] * res[1])))
    if crs.is_geographic:
        from pyproj import Transformer

        x, y = near.transform * (near.width / 2, near.height / 2)
        _, lat = Transformer.from_crs(near.crs, "EPSG:4326", always_xy=True).transform(x, y)
        return size * 111_320 * float(np.sqrt(max(np.cos(np.radians(lat)), 1e-6)))
    try:
        return size * float(crs.linear_units_factor[1])
    except Exception:  # a CRS without linear units
        return size


def _content_hash(contract: dict[str, Any], state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(json.dumps(contract, sort_keys=True).encode())
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def save_bundle(
    path: str | os.PathLike[str], model: nn.Module, contract: Contract, *, overwrite: bool = False
) -> str:
    """Write ``model`` and ``contract`` to ``path`` atomically; return the content hash."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    cj = contract.to_json()
    digest = _content_hash(cj, state)
    with atomic_output(path, overwrite) as tmp:
        torch.save({"format": FORMAT, "contract": cj, "hash": digest, "state_dict": state}, tmp)
    return digest


def load_bundle(path: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> Bundle:
    """Load a bundle; the model comes back in eval mode on ``device``.

    Raises
    ------
    BundleError
        The file is not a geoseg bundle, or its content does not match its hash.
    """
    p = check_input(path, "bundle")
    try:
        raw = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BundleError(
            f"bundle {p!r} is not a geoseg bundle ({type(exc).__name__}); expected a file written "
            "by 'geoseg train'"
        ) from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise BundleError(f"bundle {p!r} is not a geoseg bundle (format {FORMAT!r} expected)")
    state, cj = raw["state_dict"], raw["contract"]
    if _content_hash(cj, state) != raw["hash"]:
        raise BundleError(f"bundle {p!r} is damaged: its content does not match its hash")
    contract = Contract.from_json(cj)
    model = _model_of(contract)
    try:
        model.load_state_dict(state)
    except RuntimeError:
        raise BundleError(
            f"bundle {p!r} ({contract.arch}, written by geoseg {contract.geoseg_version or '?'}) does "
            f"not fit this geoseg's {contract.arch}; train it again with this version"
        ) from None
    model.to(device).eval()
    return Bundle(model=model, contract=contract, hash=raw["hash"], path=str(Path(p).resolve()))


def _model_of(contract: Contract) -> nn.Module:
    """The untrained model a bundle's weights load into."""
    args = (contract.arch, contract.channels, len(contract.classes))
    if contract.members == 1:
        return create_model(*args, **contract.arch_args)
    return Ensemble([create_model(*args, **contract.arch_args) for _ in range(contract.members)])


# what may differ between an ensemble's members: how each was trained
_OWN = ("training", "effective_overlap", "geoseg_version", "members")


def combine_bundles(
    paths: list[str | os.PathLike[str]], output: str | os.PathLike[str], *, overwrite: bool = False
) -> Bundle:
    """Write one bundle that predicts the mean class probabilities of the bundles at ``paths``
    (trained with the same settings but ``seed``: the same bands, normalisation, classes,
    architecture and window). Averaging models trained apart narrows the spread of their scores
    (benchmarks/README.md, "The defaults now"), at one model pass per member."""
    if len(paths) < 2:
        raise BundleError(
            f"an ensemble needs at least two bundles, got {len(paths)}; train more with other "
            "--seed values"
        )
    for p in paths:
        if same_file(p, output):
            raise BundleError(
                f"the ensemble's output {str(output)!r} is one of its bundles; write it to a new "
                "file (-o)"
            )
    bundles = [load_bundle(p) for p in paths]
    first = bundles[0]
    for b in bundles:
        if b.contract.members > 1:
            raise BundleError(
                f"bundle {b.path!r} is already an ensemble of {b.contract.members}; combine the "
                "single bundles it was made of instead"
            )
    mine = {k: v for k, v in first.contract.to_json().items() if k not in _OWN}
    for b in bundles[1:]:
        theirs = {k: v for k, v in b.contract.to_json().items() if k not in _OWN}
        differ = sorted(k for k in mine if mine[k] != theirs.get(k))
        if differ:
            raise BundleError(
                f"bundles {first.path!r} and {b.path!r} differ in {', '.join(differ)}; an "
                "ensemble's members must be trained on the same bands and classes with the same "
                "architecture and window: train them with the same settings and another --seed"
            )
    splits = [b.contract.training.get("validation") for b in bundles]
    if any(v != splits[0] for v in splits[1:]):
        warnings.warn(
            "the bundles were validated on different pixels (another --val-region, "
            "--val-fraction or --val-seed), so each trained on pixels another holds out: the "
            "ensemble has no held-out validation; train them with one --val-seed, or "
            "with geoseg train --members",
            stacklevel=2,
        )
    effective = [b.contract.effective_overlap for b in bundles]
    contract = replace(
        first.contract,
        members=len(bundles),
        effective_overlap=None if None in effective else max(e or 0 for e in effective),
        # the first member's record (its data, such as the pixels per class, are the others'
        # too), and every member's
        training={
            **first.contract.training,
            "members": [{"hash": b.hash, **b.contract.training} for b in bundles],
        },
    )
    model = Ensemble([b.model for b in bundles])
    digest = save_bundle(output, model, contract, overwrite=overwrite)
    return Bundle(
        model=model.eval(), contract=contract, hash=digest, path=str(Path(output).resolve())
    )
