"""The model bundle: weights plus the whole preprocessing contract, in one file.

A bundle is a ``torch.save`` archive holding plain data only (loaded with ``weights_only=True``):
``{"format": "geoseg.bundle/1", "contract": {...}, "state_dict": {...}}``. The contract says which
bands the model reads and in what order, how to normalise them, the scene nodata, the classes (the
users' own codes, names and colours), the default window and overlap, the model's receptive field,
the training scene's CRS and pixel size, the geoseg version, and a content hash over all of it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from geoseg.errors import BandMismatchError, BundleError
from geoseg.io import ClassInfo, SceneProfile, atomic_output, check_input
from geoseg.models import create_model

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
    geoseg_version: str = ""
    training: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

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

    def check_scene(self, profile: SceneProfile) -> None:
        """Raise :class:`BandMismatchError` unless ``profile`` has the bands this model reads."""
        expected = ",".join(b.name for b in self.bands)
        wanted = len(self.bands)
        if profile.count != wanted:
            raise BandMismatchError(
                f"scene {profile.path!r} has {profile.count} bands, the bundle expects {wanted} "
                f"({expected}); use a scene with these bands or a bundle trained on this scene's bands"
            )


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
    model = create_model(
        contract.arch, len(contract.bands), len(contract.classes), **contract.arch_args
    )
    try:
        model.load_state_dict(state)
    except RuntimeError:
        raise BundleError(
            f"bundle {p!r} ({contract.arch}, written by geoseg {contract.geoseg_version or '?'}) does "
            f"not fit this geoseg's {contract.arch}; train it again with this version"
        ) from None
    model.to(device).eval()
    return Bundle(model=model, contract=contract, hash=raw["hash"], path=str(Path(p).resolve()))
