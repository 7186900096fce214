"""Derived bands: normalised differences of two of a scene's bands (NDVI = (nir - red) /
(nir + red), NDWI, NBR, ...), computed per block on the worker after the bands are read, at
training and at prediction alike. The bundle records them by the names of the bands they come
from, so the contract travels with the weights: a scene needs only the raw bands.

A derived band is written ``NAME=A,B``: ``(A - B) / (A + B)``, where A and B are the bundle's band
names (``nir``, ``red``, a STAC item's asset keys) or 1-based band numbers of the scene.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from geoseg.errors import ConfigError, option


@dataclass(frozen=True)
class Derived:
    """A normalised difference ``(a - b) / (a + b)`` named ``name``; ``a`` and ``b`` are band
    names or numbers as the user wrote them."""

    name: str
    a: str
    b: str


def parse_derived(spec: str | Sequence[str] | None) -> list[Derived]:
    """``"ndvi=nir,red"`` (several separated by ``;``, or a list of such strings) to
    :class:`Derived`; a malformed one raises :class:`ConfigError`."""
    if not spec:
        return []
    items = spec.split(";") if isinstance(spec, str) else list(spec)
    out: list[Derived] = []
    for item in (i.strip() for i in items):
        name, eq, rest = item.partition("=")
        parts = [p.strip() for p in rest.split(",")]
        if not eq or not name.strip() or len(parts) != 2 or not all(parts):
            raise ConfigError(
                f"{option('--derive', None)} takes NAME=A,B (the normalised difference "
                f"(A - B) / (A + B) of two bands, by name or number), e.g. ndvi=nir,red; "
                f"got {item!r}"
            )
        if parts[0] == parts[1]:
            raise ConfigError(
                f"{option('--derive', None)} {item!r} takes two different bands; got "
                f"{parts[0]!r} twice"
            )
        out.append(Derived(name.strip(), parts[0], parts[1]))
    names = [d.name for d in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"{option('--derive', None)} names a band twice: {names}")
    return out


def positions(
    derived: Sequence[Derived], names: Sequence[str], indexes: Sequence[int]
) -> tuple[tuple[int, int], ...]:
    """For each derived band, the 0-based places of its two bands among the bands read, whose
    names are ``names`` and scene band numbers ``indexes``. Raises :class:`ConfigError` naming
    the bands there are."""

    def place(ref: str, d: Derived) -> int:
        if ref in names:
            return list(names).index(ref)
        if ref.isdigit() and int(ref) in indexes:
            return list(indexes).index(int(ref))
        there = ", ".join(f"{i} ({n})" for i, n in zip(indexes, names))
        raise ConfigError(
            f"derived band {d.name!r} needs band {ref!r}, and the bands read are {there}; "
            f"name one of them (or its number), or set the band names with "
            f"{option('--band-names', None)}"
        )

    return tuple((place(d.a, d), place(d.b, d)) for d in derived)


def add_derived(
    data: np.ndarray, valid: np.ndarray, pairs: Sequence[tuple[int, int]]
) -> np.ndarray:
    """``data`` (bands, h, w) with the normalised difference of each pair of bands appended,
    as float32; 0 where the pixel is invalid or both bands are 0."""
    if not pairs:
        return data
    out = np.empty((data.shape[0] + len(pairs), *data.shape[1:]), np.float32)
    out[: data.shape[0]] = data
    for k, (i, j) in enumerate(pairs):
        a, b = data[i].astype(np.float32), data[j].astype(np.float32)
        total = a + b
        nd = np.divide(a - b, total, out=np.zeros_like(a), where=(total != 0) & valid)
        out[data.shape[0] + k] = nd
    return out
