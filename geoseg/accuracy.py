"""Accuracy and area a map producer can publish: estimators for a sample of reference points,
with standard errors and 95 % confidence intervals, and the allocation of a stratified sample.

The estimators are those of the good-practice guidance: Olofsson et al. (2014), "Good practices
for estimating area and assessing accuracy of land change", Remote Sensing of Environment 148,
for strata that are the map classes, and Stehman (2014), "Estimating area and map accuracy for
stratified random sampling when the strata are different from the map classes", International
Journal of Remote Sensing 35, for any other strata. Both are one estimator: every quantity is a
stratified mean of an indicator per point (overall accuracy, the area share of a class, a cell
of the error matrix) or a ratio of two (user's and producer's accuracy), with the variance of
a stratified mean or of a ratio estimator. With the map classes as strata these reduce to
Olofsson's formulas (the tests hold both to 1e-9 and the paper's worked example to its digits).
A simple random or systematic sample is one stratum.

As in the guidance, no finite-population correction is applied: a point samples a continuous
area, not one of a finite list of pixels. Pure numpy; every matrix is rows map, columns
reference.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from geoseg.errors import ConfigError, option

Z95 = 1.959963984540054  # the standard normal's 97.5 % quantile
ALLOCATIONS = ("proportional", "equal", "neyman")
MIN_PER_CLASS = 50  # the guidance's "at least 50-100 per class"


@dataclass(frozen=True)
class Estimate:
    """An estimate with its standard error and 95 % confidence interval (``value +- 1.96 se``,
    not clipped, as the guidance reports it); ``se`` is ``None`` where a stratum that counts
    holds a single point, ``value`` is ``None`` where nothing estimates it (``note`` says why)."""

    value: float | None
    se: float | None = None
    note: str | None = None

    @property
    def half_width(self) -> float | None:
        return None if self.se is None else Z95 * self.se

    @property
    def low(self) -> float | None:
        hw = self.half_width
        return None if self.value is None or hw is None else self.value - hw

    @property
    def high(self) -> float | None:
        hw = self.half_width
        return None if self.value is None or hw is None else self.value + hw

    def scaled(self, factor: float) -> Estimate:
        return Estimate(
            None if self.value is None else self.value * factor,
            None if self.se is None else self.se * factor,
            self.note,
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "value": self.value,
            "se": self.se,
            "ci95_low": self.low,
            "ci95_high": self.high,
        }
        if self.note:
            out["note"] = self.note
        return out


@dataclass(frozen=True)
class ClassAccuracy:
    """One class: user's and producer's accuracy, its mapped area (exact) and its
    error-adjusted area (estimated; m² and share of the area), and its sample counts."""

    id: int
    name: str
    users: Estimate
    producers: Estimate
    mapped_area_m2: float
    area_m2: Estimate
    area_share: Estimate
    sample_mapped: int
    sample_reference: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "users_accuracy": self.users.to_dict(),
            "producers_accuracy": self.producers.to_dict(),
            "mapped_area_m2": self.mapped_area_m2,
            "mapped_area_ha": self.mapped_area_m2 / 1e4,
            "adjusted_area_m2": self.area_m2.to_dict(),
            "adjusted_area_ha": self.area_m2.scaled(1e-4).to_dict(),
            "area_share": self.area_share.to_dict(),
            "sample_mapped": self.sample_mapped,
            "sample_reference": self.sample_reference,
        }


@dataclass(frozen=True)
class Stratum:
    """A stratum of the sample: its code, its name, its area (m²) and pixel count in the
    population, and how many points of the sample lie in it."""

    code: int
    name: str
    area_m2: float
    pixels: int
    points: int


@dataclass(frozen=True)
class SampleAccuracy:
    """The estimates from one sample of reference points (:func:`estimate`)."""

    design: str
    points: int
    overall: Estimate
    per_class: tuple[ClassAccuracy, ...]
    error_matrix: tuple[tuple[float, ...], ...]  # area proportions, rows map, columns reference
    strata: tuple[Stratum, ...]
    total_area_m2: float
    covered_share: float  # of the area, in strata that hold a sample point
    notes: tuple[str, ...] = ()
    name: str | None = None  # the region's, for a region's estimates
    feature: int | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.name is not None:
            out["name"] = self.name
            out["feature"] = self.feature
        out.update(
            design=self.design,
            points=self.points,
            total_area_m2=self.total_area_m2,
            covered_share=self.covered_share,
            overall_accuracy=self.overall.to_dict(),
            per_class=[c.to_dict() for c in self.per_class],
            error_matrix_area_proportions=[list(r) for r in self.error_matrix],
            strata=[asdict(s) for s in self.strata],
            notes=list(self.notes),
        )
        return out


@dataclass
class _Design:
    """Points grouped by stratum, with the strata's weights (shares of the sampled area)."""

    stratum: np.ndarray  # (n,) index into weights
    weights: np.ndarray  # (H,) W_h over the strata that hold points, summing to 1
    counts: np.ndarray  # (H,) points per stratum
    single: np.ndarray  # (H,) n_h == 1 and W_h > 0: no variance known
    codes: Sequence[int]  # the stratum (map class) code of each index, for notes

    def _means(self, v: np.ndarray) -> np.ndarray:
        return np.bincount(self.stratum, v, minlength=len(self.weights)) / self.counts

    def _cov(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        ma, mb = self._means(a), self._means(b)
        dev = (a - ma[self.stratum]) * (b - mb[self.stratum])
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.bincount(self.stratum, dev, minlength=len(self.weights)) / (self.counts - 1)

    def _se(self, terms: np.ndarray, where: np.ndarray) -> tuple[float | None, str | None]:
        """sqrt(sum_h W_h² terms_h / n_h), or ``None`` and a note naming the strata if a
        stratum ``where`` the quantity is not zero everywhere holds a single point (its
        variance is unknown)."""
        single = self.single & where
        if np.any(single):
            names = [self.codes[int(i)] for i in np.flatnonzero(single)]
            return None, f"strata {names} hold a single point: no standard error"
        t = np.where(where, terms, 0.0)
        return math.sqrt(max(float(np.sum(self.weights**2 * t / self.counts)), 0.0)), None

    def mean(self, y: np.ndarray) -> Estimate:
        """The stratified mean of the indicator ``y``: sum_h W_h ybar_h."""
        y = y.astype(np.float64)
        value = float(np.sum(self.weights * self._means(y)))
        var = np.nan_to_num(self._cov(y, y))
        return Estimate(value, *self._se(var, self._touches(y)))

    def ratio(self, y: np.ndarray, x: np.ndarray, empty: str) -> Estimate:
        """The ratio estimator sum_h W_h ybar_h / sum_h W_h xbar_h, with its variance
        (1/X²) sum_h W_h² (s²_yh + R² s²_xh - 2 R s_xyh) / n_h; ``empty`` says why there is no
        estimate when no point has ``x``."""
        y, x = y.astype(np.float64), x.astype(np.float64)
        big_x = float(np.sum(self.weights * self._means(x)))
        if big_x <= 0:
            return Estimate(None, None, empty)
        r = float(np.sum(self.weights * self._means(y))) / big_x
        terms = np.nan_to_num(self._cov(y, y) + r * r * self._cov(x, x) - 2 * r * self._cov(x, y))
        se, note = self._se(terms, self._touches(y) | self._touches(x))
        return Estimate(r, None if se is None else se / big_x, note)

    def _touches(self, v: np.ndarray) -> np.ndarray:
        """Strata where ``v`` is not zero everywhere: the estimate depends on them."""
        return np.bincount(self.stratum, np.abs(v), minlength=len(self.weights)) > 0


def estimate(
    stratum: Sequence[int] | np.ndarray,
    mapped: Sequence[int] | np.ndarray,
    reference: Sequence[int] | np.ndarray,
    strata_area: dict[int, float],
    classes: Sequence[tuple[int, str]],
    mapped_area: dict[int, float],
    *,
    design: str = "stratified",
    strata_pixels: dict[int, int] | None = None,
    strata_names: dict[int, str] | None = None,
) -> SampleAccuracy:
    """Overall, user's and producer's accuracy, the error-adjusted area of each class and the
    error matrix in area proportions, each with its standard error, from a sample.

    Parameters
    ----------
    stratum, mapped, reference
        Per point: its stratum code, the map class under it and its reference class (class ids).
    strata_area
        Stratum code -> its area in the population (m²): the weights. A simple random sample is
        one stratum holding every point.
    classes
        ``(id, name)`` of the classes, in the order of the outputs.
    mapped_area
        Class id -> its mapped area (m²), exact, reported beside the estimate.

    Strata without a point are left out (the estimates then describe the area of the strata
    that hold points: ``covered_share`` says how much, and a note names them); points in a
    stratum of zero area weigh nothing, and a note says so.
    """
    s = np.asarray(stratum, dtype=np.int64)
    m = np.asarray(mapped, dtype=np.int64)
    r = np.asarray(reference, dtype=np.int64)
    n = len(s)
    codes = sorted(strata_area)
    notes: list[str] = []
    npoints = {c: int(np.sum(s == c)) for c in codes}
    outside = sorted(set(s.tolist()) - set(codes))
    if outside:
        raise ValueError(f"points in strata {outside} that have no area")
    zero = [c for c in codes if strata_area[c] <= 0 and npoints[c] > 0]
    if zero:
        notes.append(
            f"strata {zero} hold {sum(npoints[c] for c in zero)} points but no mapped area: "
            "those points weigh nothing"
        )
    unsampled = [c for c in codes if strata_area[c] > 0 and npoints[c] == 0]
    total = float(sum(max(a, 0.0) for a in strata_area.values()))
    used = [c for c in codes if strata_area[c] > 0 and npoints[c] > 0]
    covered = float(sum(strata_area[c] for c in used))
    if unsampled:
        notes.append(
            f"strata {unsampled} ({100 * (1 - covered / total):.2f} % of the area) hold no "
            "sample point: the estimates describe the rest of the area"
        )
    keep = np.isin(s, used)
    slot = {c: i for i, c in enumerate(used)}
    weights = np.array([strata_area[c] / covered for c in used]) if used else np.zeros(0)
    counts = np.array([npoints[c] for c in used], dtype=np.float64)
    d = _Design(
        stratum=np.array([slot[c] for c in s[keep].tolist()], dtype=np.int64),
        weights=weights,
        counts=counts,
        single=(counts == 1) & (weights > 0),
        codes=used,
    )
    if np.any(d.single):
        notes.append(
            f"strata {[c for c in used if npoints[c] == 1]} hold a single point: estimates "
            "that depend on them have no standard error"
        )
    m, r = m[keep], r[keep]
    names = dict(classes)
    per_class = []
    matrix: list[tuple[float, ...]] = []
    if not used:
        nothing = Estimate(None, None, "no point lies in a stratum with mapped area")
        overall = nothing
        for cid, name in classes:
            per_class.append(
                ClassAccuracy(
                    cid, name, nothing, nothing, mapped_area.get(cid, 0.0), nothing, nothing, 0, 0
                )
            )
        matrix = [tuple(0.0 for _ in classes) for _ in classes]
    else:
        overall = d.mean(m == r)
        for cid, _ in classes:
            on_map, in_ref = m == cid, r == cid
            share = d.mean(in_ref)
            if not in_ref.any():  # no point is of it: an area of 0 with no interval
                share = Estimate(0.0, None, "no sample point is of this class in the reference")
            per_class.append(
                ClassAccuracy(
                    id=cid,
                    name=names[cid],
                    users=d.ratio(on_map & in_ref, on_map, "no sample point is mapped as it"),
                    producers=d.ratio(
                        on_map & in_ref, in_ref, "no sample point is it in the reference"
                    ),
                    mapped_area_m2=float(mapped_area.get(cid, 0.0)),
                    area_m2=share.scaled(covered),
                    area_share=share,
                    sample_mapped=int(on_map.sum()),
                    sample_reference=int(in_ref.sum()),
                )
            )
        for ci, _ in classes:
            row = []
            for cj, _ in classes:
                v = d.mean((m == ci) & (r == cj)).value
                row.append(0.0 if v is None else v)
            matrix.append(tuple(row))
    px = strata_pixels or {}
    sn = strata_names or {}
    return SampleAccuracy(
        design=design,
        points=int(n),
        overall=overall,
        per_class=tuple(per_class),
        error_matrix=tuple(matrix),
        strata=tuple(
            Stratum(
                c, sn.get(c, names.get(c, str(c))), float(strata_area[c]), px.get(c, 0), npoints[c]
            )
            for c in codes
        ),
        total_area_m2=total,
        covered_share=covered / total if total > 0 else 0.0,
        notes=tuple(notes),
    )


def allocate(
    size: int,
    areas: Sequence[float],
    *,
    allocation: str = "proportional",
    min_per_class: int = MIN_PER_CLASS,
    expected_accuracy: Sequence[float] | None = None,
    pixels: Sequence[int] | None = None,
) -> list[int]:
    """Points per stratum for a sample of ``size``: ``proportional`` to the strata's areas,
    ``equal``, or ``neyman`` (proportional to area times sqrt(U (1 - U)), ``U`` the expected
    user's accuracy of each stratum, 0.8 by default); every stratum gets at least
    ``min_per_class`` points (or all its pixels, when it has fewer) and the rest follow the rule.
    Rounded by largest remainder, so the counts sum to ``size``."""
    if allocation not in ALLOCATIONS:
        raise ConfigError(
            f"unknown {option('--allocation', None)} {allocation!r}; expected one of "
            f"{', '.join(ALLOCATIONS)}"
        )
    a = np.asarray(areas, dtype=np.float64)
    h = len(a)
    cap = np.asarray(pixels if pixels is not None else [size] * h, dtype=np.int64)
    floor = np.minimum(cap, min_per_class)
    if int(floor.sum()) > size:
        raise ConfigError(
            f"a sample of {size} points cannot give {h} strata {min_per_class} points each "
            f"({h * min_per_class} at least); pass a larger {option('--size', None)} or a smaller "
            f"{option('--min-per-class', None)}"
        )
    if int(cap.sum()) < size:
        raise ConfigError(
            f"a sample of {size} points is larger than the {int(cap.sum())} pixels it is drawn "
            f"from; pass a {option('--size', None)} of at most {int(cap.sum())}"
        )
    if allocation == "equal":
        want = np.ones(h)
    elif allocation == "neyman":
        u = np.asarray(expected_accuracy if expected_accuracy is not None else [0.8] * h, float)
        want = a * np.sqrt(u * (1 - u))
    else:
        want = a.copy()
    counts = floor.astype(np.float64)
    free = np.ones(h, bool)
    # strata whose share falls under their floor, or above their pixels, are fixed there and the
    # others share what is left, until none moves
    while True:
        left = size - counts[~free].sum()
        share = np.where(free, want, 0.0)
        total = share.sum()
        target = np.where(free, left * share / total if total > 0 else left / max(free.sum(), 1), 0)
        low = free & (target < floor)
        high = free & (target > cap)
        if not low.any() and not high.any():
            counts[free] = target[free]
            break
        counts[low], counts[high] = floor[low], cap[high]
        free &= ~(low | high)
        if not free.any():
            break
    base = np.floor(counts).astype(np.int64)
    rest = size - int(base.sum())
    order = np.argsort(-(counts - base), kind="stable")
    for i in order:
        if rest <= 0:
            break
        if base[i] < cap[i]:
            base[i] += 1
            rest -= 1
    return [int(v) for v in base]
