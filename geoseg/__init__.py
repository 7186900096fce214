"""geoseg: land-cover segmentation of satellite and aerial scenes of any size, on Dask.

The stage functions are imported on first use, so ``import geoseg`` (and ``geoseg --help``)
loads neither torch, rasterio nor distributed::

    import geoseg
    geoseg.train(scene, labels, "model.bundle")
    geoseg.predict_scene("model.bundle", scene, "classes.tif")
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from geoseg.errors import GeosegError

__version__ = "0.1.0"

_LAZY = {
    "train": "geoseg.stages.train",
    "predict_scene": "geoseg.stages.predict",
    "predict_scenes": "geoseg.stages.predict",
    "vectorize": "geoseg.stages.vectorize",
    "evaluate": "geoseg.stages.evaluate",
    "run_workflow": "geoseg.pipeline",
    "Bundle": "geoseg.bundle",
    "load_bundle": "geoseg.bundle",
}

if TYPE_CHECKING:
    from geoseg.bundle import Bundle, load_bundle
    from geoseg.pipeline import run_workflow
    from geoseg.stages.evaluate import evaluate
    from geoseg.stages.predict import predict_scene, predict_scenes
    from geoseg.stages.train import train
    from geoseg.stages.vectorize import vectorize


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'geoseg' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # once imported, an ordinary attribute
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    "Bundle",
    "GeosegError",
    "__version__",
    "evaluate",
    "load_bundle",
    "predict_scene",
    "predict_scenes",
    "run_workflow",
    "train",
    "vectorize",
]
