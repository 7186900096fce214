"""The errors geoseg raises, and how a message names an option.

Every error derives from :class:`GeosegError` and also from the matching builtin, so callers may
catch either (``except FileNotFoundError`` works for a missing scene). Messages name the bad value,
what was expected, and how to fix it; the values travel as attributes too (``filename``,
``expected``, ``found``). A hint names an option the way the caller sets it: ``--overwrite`` on
the command line, ``overwrite=True`` in Python (:func:`option`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from typing import Any

_COMMAND_LINE: ContextVar[bool] = ContextVar("geoseg_command_line", default=False)


@contextlib.contextmanager
def command_line() -> Iterator[None]:
    """Within the block, hints name command-line options (the ``geoseg`` command sets it)."""
    token = _COMMAND_LINE.set(True)
    try:
        yield
    finally:
        _COMMAND_LINE.reset(token)


# command-line options whose Python keyword is not the flag's name
_KEYWORDS = {"--class-map": "code_map"}


def again() -> str:
    """How the caller runs the same work again: "the same command" or "the same call"."""
    return "the same command" if _COMMAND_LINE.get() else "the same call"


class AsCaller:
    """``fn`` as a Dask task that names options the way its caller does: the command-line
    setting is read when the task is made and set again where it runs, so a message raised on
    a worker says ``--lr`` to the ``geoseg`` command and ``lr=`` to a Python caller. Dask names
    the task after ``fn``."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        self.command_line = _COMMAND_LINE.get()
        self.__name__ = getattr(fn, "__name__", "task")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        token = _COMMAND_LINE.set(self.command_line)
        try:
            return self.fn(*args, **kwargs)
        finally:
            _COMMAND_LINE.reset(token)

    def __dask_tokenize__(self) -> tuple[str, str, bool]:
        return (getattr(self.fn, "__module__", ""), self.__name__, self.command_line)


def option(flag: str, value: Any = True) -> str:
    """The option ``flag`` (as on the command line, ``--allow-no-crs``) set to ``value``, the
    way the caller writes it: ``--allow-no-crs`` / ``--block 256`` / ``--ignore 1,2`` on the
    command line, ``allow_no_crs=True`` / ``block=256`` / ``ignore=[1, 2]`` in Python.
    ``value=None``: the name alone."""
    if _COMMAND_LINE.get():
        if isinstance(value, (list, tuple)):
            value = ",".join(map(str, value))
        return flag if value is True or value is None else f"{flag} {value}"
    name = _KEYWORDS.get(flag, flag.lstrip("-").replace("-", "_"))
    return name if value is None else f"{name}={value!r}"


class GeosegError(Exception):
    """Root of all geoseg errors. ``filename``: the file at fault, when one is; ``expected``
    and ``found``: what was expected and what was there, when the error is a mismatch."""

    filename: str | None = None
    expected: Any = None
    found: Any = None

    def __init__(
        self,
        message: str = "",
        *,
        filename: str | None = None,
        expected: Any = None,
        found: Any = None,
    ) -> None:
        super().__init__(message)
        if filename is not None:
            self.filename = str(filename)
        self.expected, self.found = expected, found


class InputNotFoundError(GeosegError, FileNotFoundError):
    """An input path does not exist."""


class NotARasterError(GeosegError, ValueError):
    """A file that should be a raster cannot be opened as one, or is not the raster expected
    (a scene where a class map is meant)."""


class NoCRSError(GeosegError, ValueError):
    """A raster without a coordinate reference system where one is needed."""


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


def check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    """Raise :class:`ConfigError` unless ``value`` is one of ``choices``; ``name`` is what the
    setting is (``blend``, ``composite``)."""
    if value not in choices:
        raise ConfigError(
            f"unknown {name} {value!r}; expected one of {', '.join(choices)}",
            expected=list(choices),
            found=value,
        )


def check_range(
    name: str, value: float | None, low: float | None = None, high: float | None = None
) -> None:
    """Raise :class:`ConfigError` unless ``value`` (when given) lies in ``[low, high]``; ``name``
    is the option as on the command line (``--block``; see :func:`option`)."""
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
        raise ConfigError(
            f"{option(name, None)} must be {bounds}, got {value}", expected=bounds, found=value
        )


class TrainingError(GeosegError, RuntimeError):
    """Training cannot go on (a non-finite loss, a lost worker)."""
