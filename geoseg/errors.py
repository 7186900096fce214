"""The errors geoseg raises.

Every error derives from :class:`GeosegError` and also from the matching builtin, so callers may
catch either (``except FileNotFoundError`` works for a missing scene). Messages name the bad value,
what was expected, and how to fix it.
"""

from __future__ import annotations


class GeosegError(Exception):
    """Root of all geoseg errors."""


class InputNotFoundError(GeosegError, FileNotFoundError):
    """An input path does not exist."""


class NotARasterError(GeosegError, ValueError):
    """A file that should be a raster cannot be opened as one."""


class NotAVectorError(GeosegError, ValueError):
    """A file that should be a vector layer cannot be opened as one."""


class OutputExistsError(GeosegError, FileExistsError):
    """The output path exists and overwriting was not asked for."""


class BandMismatchError(GeosegError, ValueError):
    """A scene's bands do not match what a bundle expects."""


class GridMismatchError(GeosegError, ValueError):
    """Two rasters that must share a grid do not."""


class LabelError(GeosegError, ValueError):
    """Labels that cannot be used: no overlap, unknown codes, no class field."""


class BundleError(GeosegError, ValueError):
    """A bundle file that is not a geoseg bundle, or is damaged."""


class ConfigError(GeosegError, ValueError):
    """A bad option or workflow setting."""


class ClusterError(GeosegError, RuntimeError):
    """The Dask cluster could not be reached or lost the work."""
