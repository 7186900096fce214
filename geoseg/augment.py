"""Augmentation that moves image and mask together, for any band count and dtype.

Built on albumentations. Geometric transforms act on image and mask alike; the mask is always
resampled with nearest neighbour and filled with ``NODATA``, so class ids are never interpolated.
Radiometric transforms act per band and are scaled by each band's spread, so they mean the same
for uint8 DN, uint16 reflectance or normalised float32.

Presets: ``none``; ``light`` (flips and 90-degree rotations); ``strong`` (a random crop that keeps
labelled pixels, flips, rotations, shift-scale-rotate, per-band brightness and contrast, noise).
A custom pipeline is a YAML file::

    margin: 8            # px read beyond the window on each side, for RandomValidCrop
    transforms:
      - {name: RandomValidCrop}
      - {name: HorizontalFlip, p: 0.5}
      - {name: Affine, rotate: [-30, 30], p: 0.5}
      - {name: PerBandBrightnessContrast, brightness: 0.2, contrast: 0.2, p: 0.5}

where each name is a geoseg transform (below) or any albumentations transform.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import albumentations as A
import cv2
import numpy as np

from geoseg.classes import NODATA
from geoseg.errors import ConfigError

PRESETS = ("none", "light", "strong")


class PerBandBrightnessContrast(A.ImageOnlyTransform):
    """Per band: ``mean + (x - mean) * (1 + c) + b * std`` with ``c`` in ±contrast and ``b`` in
    ±brightness drawn for each band, ``mean`` and ``std`` the band's own."""

    def __init__(self, brightness: float = 0.2, contrast: float = 0.2, p: float = 0.5) -> None:
        super().__init__(p=p)
        self.brightness, self.contrast = brightness, contrast

    def get_params_dependent_on_data(
        self, params: dict[str, Any], data: dict[str, Any]
    ) -> dict[str, Any]:
        bands = data["image"].shape[-1]
        rng = self.random_generator
        return {
            "b": rng.uniform(-self.brightness, self.brightness, bands).astype(np.float32),
            "c": rng.uniform(-self.contrast, self.contrast, bands).astype(np.float32),
        }

    def apply(self, img: np.ndarray, b: np.ndarray, c: np.ndarray, **params: Any) -> np.ndarray:
        mean = img.mean(axis=(0, 1), keepdims=True)
        std = img.std(axis=(0, 1), keepdims=True) + 1e-6
        return (mean + (img - mean) * (1 + c) + b * std).astype(img.dtype)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("brightness", "contrast")


class PerBandNoise(A.ImageOnlyTransform):
    """Gaussian noise with a standard deviation of ``std`` times each band's own."""

    def __init__(self, std: float = 0.05, p: float = 0.5) -> None:
        super().__init__(p=p)
        self.std = std

    def get_params_dependent_on_data(
        self, params: dict[str, Any], data: dict[str, Any]
    ) -> dict[str, Any]:
        img = data["image"]
        sd = img.std(axis=(0, 1)) * self.std
        return {"noise": (self.random_generator.standard_normal(img.shape) * sd).astype(np.float32)}

    def apply(self, img: np.ndarray, noise: np.ndarray, **params: Any) -> np.ndarray:
        return (img + noise).astype(img.dtype)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("std",)


class RandomValidCrop(A.DualTransform):
    """Crop ``height`` x ``width`` at a random place that holds at least one labelled pixel
    (mask not ``NODATA``), so no crop is all nodata."""

    def __init__(self, height: int, width: int, tries: int = 20, p: float = 1.0) -> None:
        super().__init__(p=p)
        self.height, self.width, self.tries = height, width, tries

    def get_params_dependent_on_data(
        self, params: dict[str, Any], data: dict[str, Any]
    ) -> dict[str, Any]:
        mask = data["mask"]
        rows, cols = mask.shape[0] - self.height, mask.shape[1] - self.width
        if rows < 0 or cols < 0:
            raise ConfigError(
                f"RandomValidCrop of {self.height}x{self.width} px cannot cut a {mask.shape[0]}x"
                f"{mask.shape[1]} px sample; raise the pipeline's margin"
            )
        labelled = np.argwhere(mask != NODATA)
        r = c = 0
        for _ in range(self.tries):
            r, c = self.py_random.randint(0, rows), self.py_random.randint(0, cols)
            if (mask[r : r + self.height, c : c + self.width] != NODATA).any():
                break
        else:
            if len(labelled):  # place the crop over a labelled pixel
                lr, lc = labelled[self.py_random.randrange(len(labelled))]
                r = int(np.clip(lr - self.height // 2, 0, rows))
                c = int(np.clip(lc - self.width // 2, 0, cols))
        return {"r": r, "c": c}

    def apply(self, img: np.ndarray, r: int, c: int, **params: Any) -> np.ndarray:
        return img[r : r + self.height, c : c + self.width]

    def apply_to_mask(self, mask: np.ndarray, r: int, c: int, **params: Any) -> np.ndarray:
        return mask[r : r + self.height, c : c + self.width]

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("height", "width", "tries")


CUSTOM: dict[str, type[A.BasicTransform]] = {
    "PerBandBrightnessContrast": PerBandBrightnessContrast,
    "PerBandNoise": PerBandNoise,
    "RandomValidCrop": RandomValidCrop,
}


def _preset(name: str) -> tuple[int | None, list[dict[str, Any]]]:
    flips = [
        {"name": "HorizontalFlip", "p": 0.5},
        {"name": "VerticalFlip", "p": 0.5},
        {"name": "RandomRotate90", "p": 0.5},
    ]
    if name == "light":
        return 0, flips
    return None, [  # strong: margin chosen from the window
        {"name": "RandomValidCrop"},
        *flips,
        {
            "name": "Affine",
            "scale": [0.9, 1.1],
            "translate_percent": [-0.05, 0.05],
            "rotate": [-20, 20],
            "p": 0.5,
        },
        {"name": "PerBandBrightnessContrast", "brightness": 0.2, "contrast": 0.2, "p": 0.5},
        {"name": "PerBandNoise", "std": 0.05, "p": 0.3},
    ]


def _build(item: dict[str, Any], window: int) -> A.BasicTransform:
    if not isinstance(item, dict) or "name" not in item:
        raise ConfigError(f"each transform needs a 'name', got {item!r}")
    kwargs = {k: v for k, v in item.items() if k != "name"}
    name = item["name"]
    cls = CUSTOM.get(name) or getattr(A, name, None)
    if not (isinstance(cls, type) and issubclass(cls, A.BasicTransform)):
        raise ConfigError(
            f"unknown transform {name!r}; use one of {', '.join(CUSTOM)} or an albumentations transform"
        )
    params = inspect.signature(cls).parameters
    if cls is RandomValidCrop:
        kwargs.setdefault("height", window)
        kwargs.setdefault("width", window)
    # class ids are never interpolated, and what a geometric transform brings in is unlabelled
    if "mask_interpolation" in params:
        kwargs["mask_interpolation"] = cv2.INTER_NEAREST
    if "fill_mask" in params:
        kwargs["fill_mask"] = NODATA
    for key in ("scale", "translate_percent", "rotate", "shear"):
        if isinstance(kwargs.get(key), list):
            kwargs[key] = tuple(kwargs[key])
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"transform {name}: {exc}") from None


@dataclass
class Augmenter:
    """Applies a pipeline to ``(bands, h, w)`` images of any dtype and ``(h, w)`` masks.

    ``margin`` is how many pixels the sampler should read beyond the window on each side; the
    pipeline crops back to the window.
    """

    pipeline: A.Compose | None
    margin: int = 0

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.pipeline is None:
            return image, mask
        dtype = image.dtype
        out = self.pipeline(
            image=np.ascontiguousarray(image.transpose(1, 2, 0), dtype=np.float32), mask=mask
        )
        img = out["image"].transpose(2, 0, 1)
        if np.issubdtype(dtype, np.integer):  # back to the caller's dtype, rounded and clipped
            info = np.iinfo(dtype)
            img = np.clip(np.rint(img), info.min, info.max)
        return np.ascontiguousarray(img.astype(dtype)), np.ascontiguousarray(out["mask"])


def build_augmenter(
    spec: str | os.PathLike[str], window: int, seed: int | None = None
) -> Augmenter:
    """An :class:`Augmenter` from a preset name or a YAML file (see the module docstring)."""
    import yaml

    text = str(spec)
    if text == "none":
        return Augmenter(None, 0)
    if text in PRESETS:
        margin, items = _preset(text)
    elif Path(text).suffix.lower() in (".yaml", ".yml"):
        if not Path(text).exists():
            raise ConfigError(f"augmentation file {text!r} does not exist")
        raw = yaml.safe_load(Path(text).read_text()) or {}
        if not isinstance(raw, dict) or not isinstance(raw.get("transforms"), list):
            raise ConfigError(f"augmentation file {text!r} needs a 'transforms' list")
        margin, items = raw.get("margin"), raw["transforms"]
    else:
        raise ConfigError(
            f"unknown augmentation {text!r}; expected one of {', '.join(PRESETS)} or a YAML file"
        )
    has_crop = any(isinstance(i, dict) and i.get("name") == "RandomValidCrop" for i in items)
    if margin is None:
        margin = max(4, window // 8) if has_crop else 0
    if margin and not has_crop:
        raise ConfigError(
            "a margin needs a RandomValidCrop in the pipeline to cut back to the window"
        )
    pipeline = A.Compose([_build(i, window) for i in items], seed=seed)
    return Augmenter(pipeline, int(margin))
