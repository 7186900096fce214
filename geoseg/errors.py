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


class OutputError(GeosegError, ValueError):
    """An output that must not be written: an input, a folder, a file geoseg did not write,
    or a place that cannot be written."""


class OutputLockedError(GeosegError, RuntimeError):
    """Another geoseg run is writing the same output."""


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


class Interrupted(KeyboardInterrupt):
    """The user stopped a run (Ctrl-C); the message says what was kept and how to go on."""


def check_range(
    name: str, value: float | None, low: float | None = None, high: float | None = None
) -> None:
    """Raise :class:`ConfigError` unless ``value`` (when given) lies in ``[low, high]``; ``name``
    is the option as users type it (``--block``)."""
    if value is None:
        return
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = (
            f"between {low} and {high}"
            if low is not None and high is not None
            else f"at least {low}"
            if low is not None
            else f"at most {high}"
        )
        raise ConfigError(f"{name} must be {bounds}, got {value}")
