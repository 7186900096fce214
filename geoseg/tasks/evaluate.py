"""Worker side of evaluation: one block's confusion matrices, overall and per region.

Each block counts ``(region, truth, prediction)`` pairs with one ``bincount``; the driver
(:mod:`geoseg.stages.evaluate`) adds the blocks up, so the scene is never whole in memory. Rows
are truth, columns prediction, in the order of the class list.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import rasterio
from rasterio.features import rasterize
from rasterio.windows import Window
from rasterio.windows import transform as window_transform

from geoseg.classes import NODATA
from geoseg.io import read_profile
from geoseg.labels import (
    LabelSpec,
    area_mask,
    truth_codes,
    vector_in_window,
)


@dataclass
class BlockCounts:
    """Confusion matrices of one block: ``(regions + 1, K, K)``, index 0 for the whole area;
    and truth codes found that are not in the class list."""

    confusion: np.ndarray
    unknown: set[int]

    def __add__(self, other: BlockCounts) -> BlockCounts:
        return BlockCounts(self.confusion + other.confusion, self.unknown | other.unknown)


def region_masks(
    path: str | None, window: Window, profile: Any, positions: tuple[int, ...]
) -> np.ndarray:
    """``(n, h, w)`` bool: pixels of ``window`` inside each region, the regions being the
    features of ``path`` at ``positions``. Regions may overlap; each is rasterized on its own."""
    h, w = int(window.height), int(window.width)
    masks = np.zeros((len(positions), h, w), dtype=bool)
    if path is None:
        return masks
    slot = {p: i for i, p in enumerate(positions)}
    gdf = vector_in_window(path, window, profile)
    t = window_transform(window, profile.transform)
    for geom, pos in zip(gdf.geometry, gdf.index):  # the index is the feature's position
        if int(pos) in slot:
            masks[slot[int(pos)]] |= rasterize(
                [(geom, 1)], out_shape=(h, w), transform=t, fill=0, dtype="uint8"
            ).astype(bool)
    return masks


def block_counts(
    window: Window,
    prediction: str,
    truth: LabelSpec,
    class_ids: tuple[int, ...],
    regions: str | None,
    positions: tuple[int, ...],
    within: str | None,
    resample: bool = False,
) -> BlockCounts:
    """Count one block (a Dask task); ``truth`` carries its ignored codes and class map."""
    profile = read_profile(prediction)
    with rasterio.open(prediction) as src:
        pred = src.read(1, window=window).astype(np.int64)
        nodata = src.nodata if src.nodata is not None else NODATA
    codes = truth_codes(truth, window, profile, resample)
    k = len(class_ids)
    lut = np.full(
        max(max(class_ids), int(codes.max(initial=0)), int(pred.max(initial=0))) + 1,
        -1,
        dtype=np.int64,
    )
    lut[list(class_ids)] = np.arange(k)
    labelled = (codes >= 0) & area_mask(within, window, profile)
    t = lut[np.where(codes >= 0, codes, 0)]
    p = lut[pred]
    unknown = set(np.unique(codes[labelled & (t < 0)]).tolist())
    valid = labelled & (pred != nodata) & (t >= 0) & (p >= 0)
    pair = t * k + p
    conf = np.zeros((len(positions) + 1, k, k), dtype=np.int64)
    conf[0] = np.bincount(pair[valid], minlength=k * k).reshape(k, k)
    for r, m in enumerate(region_masks(regions, window, profile, positions), start=1):
        conf[r] = np.bincount(pair[valid & m], minlength=k * k).reshape(k, k)
    return BlockCounts(conf, unknown)


def block_class_ids(window: Window, path: str) -> set[int]:
    with rasterio.open(path) as src:
        a = src.read(1, window=window)
        nd = src.nodata if src.nodata is not None else NODATA
    return set(np.unique(a[a != nd]).tolist())
