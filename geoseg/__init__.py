"""geoseg: land-cover segmentation of satellite and aerial scenes of any size, on Dask."""

from __future__ import annotations

__version__ = "0.1.0"

from geoseg.bundle import Bundle, load_bundle
from geoseg.errors import GeosegError

__all__ = ["Bundle", "GeosegError", "__version__", "load_bundle"]
