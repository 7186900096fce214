"""Writing evaluation reports: JSON for machines, CSV for spreadsheets, Markdown and one
self-contained HTML page for people.

The JSON schema (``report.json``):

- ``prediction``, ``truth``, ``truth_field``, ``regions_file``, ``region_field``, ``within``,
  ``class_map`` (truth code -> class id), ``ignore``: what was scored;
- ``classes``: the class list, ``[{id, name, colour}]``, in the order of every matrix;
- ``miou_definition``: how mIoU is averaged;
- ``overall`` and each of ``regions`` (with ``name``): ``pixels``, ``miou``, ``fw_iou``,
  ``overall_accuracy``, ``kappa``, ``confusion_matrix`` (rows truth, columns prediction) and
  ``per_class``: ``[{id, name, present, iou, precision, recall, f1, truth_pixels,
  predicted_pixels}]``; a class absent from truth and prediction has ``present: false`` and
  ``null`` scores.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import itertools
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from geoseg.accuracy import Estimate, SampleAccuracy
from geoseg.classes import ClassInfo
from geoseg.errors import ConfigError
from geoseg.io import atomic_output, check_output
from geoseg.scoring import BlockIntervals, Interval, Intervals, Scores

REPORT_FORMATS = (".json", ".csv", ".md", ".html")

MIOU_DEFINITION = "mean IoU over classes present in truth or prediction"


@dataclass(frozen=True, kw_only=True)
class RegionScores(Scores):
    """A region's scores, with its name and its feature's position in the regions file."""

    name: str
    feature: int

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "feature": self.feature, **super().to_dict()}


@dataclass(frozen=True)
class Baseline:
    """The scores of a trivial map: one class everywhere, on the report's pixels."""

    class_id: int
    miou: float | None
    overall_accuracy: float | None


@dataclass(frozen=True, kw_only=True)
class EvaluationReport:
    """What :func:`geoseg.stages.evaluate.evaluate` measured and on what; :meth:`to_dict` is
    the JSON schema above (``code_map`` is written as ``class_map``, the CLI's name)."""

    prediction: str
    truth: str
    truth_field: str | None = None
    regions_file: str | None = None
    region_field: str | None = None
    within: str | None = None
    code_map: dict[int, int] = field(default_factory=dict)
    ignore: tuple[int, ...] = ()
    resample: str | None = None
    classes: tuple[ClassInfo, ...]
    overall: Scores
    regions: tuple[RegionScores, ...] = ()
    baseline_majority_class: Baseline | None = None
    miou_definition: str = MIOU_DEFINITION
    sample: SampleAccuracy | None = None  # estimates from reference points
    sample_regions: tuple[SampleAccuracy, ...] = ()
    sample_points: str | None = None  # how the points were used
    intervals: Intervals | None = None  # bootstrap over blocks, for dense truth

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "prediction": self.prediction,
            "truth": self.truth,
            "truth_field": self.truth_field,
            "regions_file": self.regions_file,
            "region_field": self.region_field,
            "within": self.within,
            "class_map": {str(k): v for k, v in self.code_map.items()},
            "ignore": list(self.ignore),
            "resample": self.resample,
            "classes": [vars(c) for c in self.classes],
            "miou_definition": self.miou_definition,
            "overall": self.overall.to_dict(),
            "regions": [r.to_dict() for r in self.regions],
        }
        if self.baseline_majority_class is not None:
            out["baseline_majority_class"] = vars(self.baseline_majority_class)
        if self.sample is not None:
            out["sample"] = {
                "points": self.sample_points,
                **self.sample.to_dict(),
                "regions": [r.to_dict() for r in self.sample_regions],
            }
        if self.intervals is not None:
            out["intervals"] = self.intervals.to_dict()
        return out


def check_report_path(
    path: str | os.PathLike[str],
    overwrite: bool,
    *,
    inputs: Sequence[str | os.PathLike[str] | None] = (),
) -> Path:
    """Refuse a report path of an unknown format, or one that may not be written
    (:func:`geoseg.io.check_output`)."""
    ext = Path(path).suffix.lower()
    if ext not in REPORT_FORMATS:
        raise ConfigError(
            f"unknown report format {ext or '(none)'!r} for {str(path)!r}; expected one of "
            f"{', '.join(REPORT_FORMATS)}"
        )
    return check_output(path, overwrite, inputs=inputs, what="report")


def write_report(
    report: EvaluationReport,
    path: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    look: QuickLook | None = None,
) -> Path:
    """Write ``report`` (from :func:`geoseg.stages.evaluate.evaluate`) by its extension: ``.json``,
    ``.csv`` (a row per region and class), ``.md`` or ``.html`` (one self-contained page, with
    ``look``'s pictures); under a temporary name, renamed when complete. Reads no file."""
    out = check_report_path(path, overwrite)
    ext = out.suffix.lower()
    writers = {
        ".json": lambda r: json.dumps(r.to_dict(), indent=1),
        ".csv": to_csv,
        ".md": markdown,
    }
    text = writers[ext](report) if ext in writers else to_html(report, look)
    with atomic_output(out, overwrite) as tmp:
        tmp.write_text(text + "\n", encoding="utf-8")
    return out


CSV_COLUMNS = (
    "region",
    "class_id",
    "class_name",
    "present",
    "iou",
    "precision",
    "recall",
    "f1",
    "truth_pixels",
    "predicted_pixels",
    "region_pixels",
    "region_miou",
    "region_overall_accuracy",
    "region_kappa",
)


def to_csv(report: EvaluationReport) -> str:
    """One row per region and class; the whole area is the region ``(all)``. From reference
    points: the estimates (:data:`SAMPLE_CSV_COLUMNS`); with bootstrap intervals, each IoU's
    and each region's mIoU bounds as the last columns."""
    if report.sample is not None:
        return _sample_csv(report)
    iv = report.intervals
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    bounds = ("iou_ci95_low", "iou_ci95_high", "region_miou_ci95_low", "region_miou_ci95_high")
    w.writerow(CSV_COLUMNS + (bounds if iv else ()))
    areas = [("(all)", report.overall)] + [(r.name, r) for r in report.regions]
    for a, (name, s) in enumerate(areas):
        bi = None if iv is None else (iv.overall if a == 0 else iv.regions[a - 1])
        for i, c in enumerate(s.per_class):
            extra = (
                []
                if bi is None
                else [
                    "" if x is None else x
                    for x in (bi.iou[i].low, bi.iou[i].high, bi.miou.low, bi.miou.high)
                ]
            )
            w.writerow(
                [name, c.id, c.name, c.present]
                + [
                    "" if getattr(c, k) is None else getattr(c, k)
                    for k in ("iou", "precision", "recall", "f1")
                ]
                + [c.truth_pixels, c.predicted_pixels, s.pixels]
                + [
                    "" if getattr(s, k) is None else getattr(s, k)
                    for k in ("miou", "overall_accuracy", "kappa")
                ]
                + extra
            )
    return buf.getvalue().rstrip("\n")


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def score_table(report: EvaluationReport, max_regions: int = 6) -> str:
    """IoU per class for the whole area and the first ``max_regions`` regions, as plain text."""
    overall = report.overall
    regions = report.regions
    cols = [("all", overall)] + [(r.name, r) for r in regions[:max_regions]]
    width = max(12, *(len(c.name) for c in report.classes))
    head = f"{'class':<{width}}" + "".join(f"{n[:12]:>13}" for n, _ in cols)
    lines = [head, "-" * len(head)]
    for i, c in enumerate(report.classes):
        lines.append(
            f"{c.name:<{width}}" + "".join(f"{_fmt(s.per_class[i].iou):>13}" for _, s in cols)
        )
    lines.append("-" * len(head))
    for key, label in (("miou", "mIoU"), ("overall_accuracy", "accuracy"), ("pixels", "pixels")):
        vals = [s.pixels if key == "pixels" else _fmt(getattr(s, key)) for _, s in cols]
        lines.append(f"{label:<{width}}" + "".join(f"{v!s:>13}" for v in vals))
    if len(regions) > max_regions:
        lines.append(f"({len(regions) - max_regions} more regions in the report)")
    iv = report.intervals
    if iv is not None:
        lines.append(
            f"95 % intervals ({iv.resamples} bootstrap resamples of {iv.overall.blocks} blocks): "
            f"mIoU {_ci(iv.overall.miou)}, accuracy {_ci(iv.overall.overall_accuracy)}"
        )
    return "\n".join(lines)


def markdown(report: EvaluationReport) -> str:
    names = [c.name for c in report.classes]
    o = report.overall
    out = [
        "# geoseg evaluation",
        "",
        f"- class map: `{report.prediction}`",
        f"- truth: `{report.truth}`",
        f"- scored area: `{report.within or 'the whole class map'}`",
        f"- pixels scored: {o.pixels}; mIoU {_fmt(o.miou)} ({report.miou_definition}); "
        f"overall accuracy {_fmt(o.overall_accuracy)}; kappa {_fmt(o.kappa)}; "
        f"frequency-weighted IoU {_fmt(o.fw_iou)}",
        "",
        "## Per class",
        "",
        "| class | IoU | precision | recall | F1 | truth px | predicted px |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for c in o.per_class:
        out.append(
            f"| {c.id} {c.name} | {_fmt(c.iou)} | {_fmt(c.precision)} | "
            f"{_fmt(c.recall)} | {_fmt(c.f1)} | {c.truth_pixels} | {c.predicted_pixels} |"
        )
    if report.regions:
        out += [
            "",
            "## Per region",
            "",
            "| region | pixels | mIoU | accuracy | " + " | ".join(names) + " |",
            "| --- | ---: | ---: | ---: |" + " ---: |" * len(names),
        ]
        for r in report.regions:
            ious = " | ".join(_fmt(c.iou) for c in r.per_class)
            out.append(
                f"| {r.name} | {r.pixels} | {_fmt(r.miou)} | {_fmt(r.overall_accuracy)} | {ious} |"
            )
    out += _md_matrix(
        "## Confusion matrix (rows: truth, columns: prediction)",
        "truth \\ prediction",
        names,
        [[str(v) for v in row] for row in o.confusion_matrix],
    )
    if report.sample is not None:
        out += _sample_markdown(report)
    out += _intervals_lines(report)
    return "\n".join(out)


# -- the HTML page ----------------------------------------------------------------------------

QUICKLOOK_PX = 480  # the longer side of the quick-look images, px

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.6em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:.5em 0}td,th{padding:3px 8px;border:1px solid #ddd}
td.n{text-align:right;font-variant-numeric:tabular-nums}th{background:#f4f4f4}
.cm td{text-align:right;min-width:4em}.figs{display:flex;gap:1em;flex-wrap:wrap}
figure{margin:0}figcaption{text-align:center;color:#555}
img.ql{image-rendering:pixelated;border:1px solid #ccc;background:#fff}
.legend span{display:inline-block;padding:0 .5em;margin:0 .3em .3em 0;border:1px solid #999}
"""


def _num(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _esc(v: Any) -> str:
    return html.escape(str(v))


def _miou_colour(v: float | None) -> str:
    """A red-yellow-green ramp over mIoU 0-1; grey for none."""
    if v is None:
        return "#bbbbbb"
    stops = [(0.0, (215, 48, 39)), (0.5, (254, 224, 139)), (1.0, (26, 152, 80))]
    v = min(max(v, 0.0), 1.0)
    for (a, ca), (b, cb) in itertools.pairwise(stops):
        if v <= b:
            t = (v - a) / (b - a)
            r, g, bl = (round(x + (y - x) * t) for x, y in zip(ca, cb))
            return f"#{r:02x}{g:02x}{bl:02x}"
    return "#1a9850"


def _png(rgba: np.ndarray) -> str:
    """``(4, h, w)`` uint8 as a base64 PNG data URL."""
    import warnings

    from rasterio.errors import NotGeoreferencedWarning
    from rasterio.io import MemoryFile

    with warnings.catch_warnings(), MemoryFile() as mem:
        warnings.simplefilter("ignore", NotGeoreferencedWarning)  # a picture, not a map
        with mem.open(
            driver="PNG", count=4, height=rgba.shape[1], width=rgba.shape[2], dtype="uint8"
        ) as dst:
            dst.write(rgba)
        data = mem.read()
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _colourise(codes: np.ndarray, report: EvaluationReport) -> np.ndarray:
    """Class ids (``-1`` for none) as RGBA with the classes' colours."""
    rgba = np.zeros((4, *codes.shape), dtype=np.uint8)
    for c in report.classes:
        hexcol = str(c.color or "#808080").lstrip("#")
        hit = codes == c.id
        for band in range(3):
            rgba[band][hit] = int(hexcol[2 * band : 2 * band + 2], 16)
        rgba[3][hit] = 255
    return rgba


@dataclass(frozen=True)
class QuickLook:
    """What the HTML page pictures, read from the files by the evaluate driver
    (:func:`geoseg.stages.evaluate.quick_look`): the class map and the truth as small arrays of
    class ids (-1: none) on one grid, and each scored region's outline on that grid (pixel
    coordinates), by its feature position."""

    prediction: np.ndarray
    truth: np.ndarray
    regions: dict[int, Any] = field(default_factory=dict)


def _region_svg(report: EvaluationReport, look: QuickLook, background: str) -> str:
    """The regions over a faint class map, each filled by its mIoU."""
    import shapely

    h, w = look.prediction.shape
    paths = []
    for r in report.regions:
        px = look.regions.get(r.feature)
        if px is None or px.is_empty:
            continue
        rings = []
        for part in shapely.get_parts(px):
            if part.geom_type != "Polygon":
                continue
            for ring in [part.exterior, *part.interiors]:
                pts = " ".join(f"{x:.1f},{y:.1f}" for x, y in ring.coords)
                rings.append(f"M{pts}Z")
        if rings:
            paths.append(
                f'<path d="{" ".join(rings)}" fill="{_miou_colour(r.miou)}" fill-opacity="0.75" '
                f'stroke="#333" stroke-width="1" fill-rule="evenodd"><title>{_esc(r.name)}: '
                f"mIoU {_num(r.miou)}, {r.pixels} px</title></path>"
            )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
        f'role="img" aria-label="regions coloured by mIoU">'
        f'<rect width="{w}" height="{h}" fill="#fafafa" stroke="#ccc"/>'
        f'<image href="{background}" width="{w}" height="{h}" opacity="0.35" '
        f'style="image-rendering:pixelated"/>{"".join(paths)}</svg>'
    )


def _class_table(s: Scores, iv: BlockIntervals | None = None) -> str:
    """The per-class scores; with bootstrap intervals ``iv``, each IoU's beside it."""
    bounds = [_ci(i) for i in iv.iou] if iv is not None else [""] * len(s.per_class)
    extra = "<th>IoU 95 %</th>" if iv is not None else ""
    rows = "".join(
        f"<tr><td>{c.id}</td><td>{_esc(c.name)}</td><td class=n>{_num(c.iou)}</td>"
        + (f"<td class=n>{b}</td>" if iv is not None else "")
        + f"<td class=n>{_num(c.precision)}</td><td class=n>{_num(c.recall)}</td>"
        f"<td class=n>{_num(c.f1)}</td><td class=n>{c.truth_pixels}</td>"
        f"<td class=n>{c.predicted_pixels}</td>"
        f"<td>{'' if c.present else 'absent from truth and prediction'}</td></tr>"
        for c, b in zip(s.per_class, bounds)
    )
    return (
        f"<table><tr><th>id</th><th>class</th><th>IoU</th>{extra}<th>precision</th><th>recall</th>"
        f"<th>F1</th><th>truth px</th><th>predicted px</th><th></th></tr>{rows}</table>"
    )


def _heatmap(s: Scores, names: list[str]) -> str:
    """The confusion matrix, each cell shaded by its share of its truth row."""
    cm = np.asarray(s.confusion_matrix, dtype=np.float64)
    share = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    head = "".join(f"<th>{_esc(n)}</th>" for n in names)
    body = ""
    for name, row, frac in zip(names, cm.astype(np.int64), share):
        cells = "".join(
            f'<td style="background:rgba(33,102,172,{f:.3f});color:{"#fff" if f > 0.5 else "#222"}"'
            f' title="{f:.1%} of truth {_esc(name)}">{v}</td>'
            for v, f in zip(row, frac)
        )
        body += f"<tr><th>{_esc(name)}</th>{cells}</tr>"
    return (
        f"<table class=cm><tr><th>truth \\ prediction</th>{head}</tr>{body}</table>"
        "<p>Rows: truth; columns: prediction; shade: share of the row.</p>"
    )


def to_html(report: EvaluationReport, look: QuickLook | None = None) -> str:
    """One self-contained page: summary, per-class table, confusion heatmap, per-region table,
    and with ``look`` the regions' map and quick looks of the class map and the truth (images
    inline, no scripts)."""
    names = [c.name for c in report.classes]
    o = report.overall
    pictures = (
        {k: _png(_colourise(getattr(look, k), report)) for k in ("prediction", "truth")}
        if look is not None
        else None
    )
    legend = "".join(
        f'<span style="background:{_esc(c.color or "#808080")}33">'
        f'<b style="color:{_esc(c.color or "#808080")}">&#9632;</b> {_esc(c.name)}</span>'
        for c in report.classes
    )
    parts = [
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>",
        f"<title>geoseg evaluation: {_esc(Path(report.prediction).name)}</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>geoseg evaluation</h1>",
        f"<p>Class map <code>{_esc(report.prediction)}</code> against truth "
        f"<code>{_esc(report.truth)}</code>"
        + (f", inside <code>{_esc(report.within)}</code>" if report.within else "")
        + ".</p>",
        f"<p><b>mIoU {_num(o.miou)}</b> ({_esc(report.miou_definition)}); overall accuracy "
        f"{_num(o.overall_accuracy)}; kappa {_num(o.kappa)}; frequency-weighted IoU "
        f"{_num(o.fw_iou)}; {o.pixels} pixels scored.</p>",
    ]
    base = report.baseline_majority_class
    if base:
        parts.append(
            f"<p>Majority-class baseline (class {base.class_id} everywhere, same pixels): "
            f"mIoU {_num(base.miou)}, accuracy {_num(base.overall_accuracy)}.</p>"
        )
    if report.sample is not None:
        parts += _sample_html(report)
        parts.append("<h2>The sample's points, counted (not weighted by strata)</h2>")
    if report.intervals is not None:
        parts.append(
            "<pre>" + _esc("\n".join(_intervals_lines(report)).replace("## ", "")) + "</pre>"
        )
    parts += [
        "<h2>Per class</h2>",
        _class_table(o, report.intervals.overall if report.intervals else None),
        "<h2>Confusion matrix</h2>",
        _heatmap(o, names),
    ]
    if report.regions:
        head = "".join(f"<th>{_esc(n)}</th>" for n in names)
        rows = "".join(
            f"<tr><td>{_esc(r.name)}</td><td class=n>{r.pixels}</td>"
            f'<td class=n style="background:{_miou_colour(r.miou)}">{_num(r.miou)}</td>'
            f"<td class=n>{_num(r.overall_accuracy)}</td>"
            + "".join(f"<td class=n>{_num(c.iou)}</td>" for c in r.per_class)
            + "</tr>"
            for r in report.regions
        )
        parts += [
            f"<h2>Per region ({_esc(report.region_field or 'name')})</h2>",
            "<table><tr><th>region</th><th>pixels</th><th>mIoU</th><th>accuracy</th>"
            f"{head}</tr>{rows}</table><p>Columns after accuracy: IoU per class.</p>",
        ]
        if look is not None and pictures is not None:
            parts += [
                "<figure>",
                _region_svg(report, look, pictures["prediction"]),
                "<figcaption>Regions coloured by mIoU (red 0, yellow 0.5, green 1; grey: nothing "
                "scored) over the class map</figcaption></figure>",
            ]
    if look is None or pictures is None:
        return "\n".join([*parts, "</body></html>"])
    h, w = look.prediction.shape
    parts += [
        "<h2>Quick look</h2>",
        f'<div class=legend>{legend}</div><div class="figs">',
        f'<figure><img class=ql alt="class map" src="{pictures["prediction"]}" width="{w}" '
        f'height="{h}"><figcaption>class map</figcaption></figure>',
        f'<figure><img class=ql alt="truth" src="{pictures["truth"]}" width="{w}" height="{h}">'
        "<figcaption>truth</figcaption></figure></div>",
        "</body></html>",
    ]
    return "\n".join(parts)


# -- estimates from reference points, bootstrap intervals -----------------------------------


def _pm(e: Estimate, digits: int = 3, scale: float = 1.0) -> str:
    """``value ± half-width`` (95 %), or why there is none."""
    if e.value is None:
        return "n/a"
    v = e.value * scale
    if e.half_width is None:
        return f"{v:,.{digits}f} (no interval)"
    return f"{v:,.{digits}f} ± {e.half_width * scale:,.{digits}f}"


def _ci(i: Interval | None) -> str:
    if i is None or i.low is None or i.high is None:
        return "n/a"
    return f"{i.low:.3f}-{i.high:.3f}"


def sample_table(report: EvaluationReport) -> str:
    """The estimates from reference points as plain text: overall accuracy, and per class the
    user's and producer's accuracy and the mapped and adjusted areas, with 95 % intervals."""
    s = report.sample
    if s is None:
        return score_table(report)
    width = max(12, *(len(c.name) for c in report.classes))
    lines = [
        f"{report.sample_points}; design: {s.design}",
        f"overall accuracy {_pm(s.overall)}",
        "",
        f"{'class':<{width}} {'users':>15} {'producers':>15} {'mapped ha':>12} "
        f"{'adjusted ha (95 %)':>24}",
    ]
    lines.append("-" * len(lines[-1]))
    for c in s.per_class:
        lines.append(
            f"{c.name:<{width}} {_pm(c.users):>15} {_pm(c.producers):>15} "
            f"{c.mapped_area_m2 / 1e4:>12,.1f} {_pm(c.area_m2, 1, 1e-4):>24}"
        )
    for r in report.sample_regions:
        lines.append(f"{r.name}: overall accuracy {_pm(r.overall)} from {r.points} points")
    lines += list(s.notes)
    return "\n".join(lines)


def _md_matrix(title: str, corner: str, names: list[str], cells: list[list[str]]) -> list[str]:
    """A class-by-class matrix as a Markdown table under ``title``."""
    out = ["", title, "", f"| {corner} | " + " | ".join(names) + " |"]
    out.append("| --- |" + " ---: |" * len(names))
    out += [f"| {n} | " + " | ".join(row) + " |" for n, row in zip(names, cells)]
    return out


def _sample_markdown(report: EvaluationReport) -> list[str]:
    s = report.sample
    assert s is not None
    out = [
        "",
        "## Accuracy and area from reference points",
        "",
        f"- {report.sample_points}",
        f"- design: {s.design}; estimators of Olofsson et al. (2014) and Stehman (2014); "
        "± is the 95 % confidence interval",
        f"- overall accuracy: {_pm(s.overall)}",
        *[f"- note: {n}" for n in s.notes],
        "",
        "| class | user's accuracy | producer's accuracy | mapped area (ha) | adjusted area (ha) "
        "| share of area | points mapped / reference |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for c in s.per_class:
        out.append(
            f"| {c.id} {c.name} | {_pm(c.users)} | {_pm(c.producers)} | "
            f"{c.mapped_area_m2 / 1e4:,.1f} | {_pm(c.area_m2, 1, 1e-4)} | "
            f"{_pm(c.area_share)} | {c.sample_mapped} / {c.sample_reference} |"
        )
    names = [c.name for c in report.classes]
    out += _md_matrix(
        "Error matrix in area proportions (rows: map, columns: reference):",
        "map \\ reference",
        names,
        [[f"{v:.4f}" for v in row] for row in s.error_matrix],
    )
    if report.sample_regions:
        out += [
            "",
            "Per region (each with its own strata's areas):",
            "",
            "| region | points | overall accuracy | "
            + " | ".join(f"{n} adjusted ha" for n in names)
            + " |",
            "| --- | ---: | ---: |" + " ---: |" * len(names),
        ]
        for r in report.sample_regions:
            out.append(
                f"| {r.name} | {r.points} | {_pm(r.overall)} | "
                + " | ".join(_pm(c.area_m2, 1, 1e-4) for c in r.per_class)
                + " |"
            )
    return out


def _area_svg(s: SampleAccuracy) -> str:
    """Mapped and adjusted areas per class, the adjusted ones with their 95 % intervals."""
    rows = s.per_class
    top = max(
        [c.mapped_area_m2 for c in rows]
        + [c.area_m2.high or c.area_m2.value or 0.0 for c in rows]
        + [1.0]
    )
    bar, gap, left, width = 12, 10, 150, 420
    h = len(rows) * (2 * bar + gap) + 30
    parts = []
    for i, c in enumerate(rows):
        y = 10 + i * (2 * bar + gap)
        mw = width * c.mapped_area_m2 / top
        parts.append(
            f'<text x="{left - 6}" y="{y + bar + 4}" text-anchor="end">{_esc(c.name)}</text>'
            f'<rect x="{left}" y="{y}" width="{mw:.1f}" height="{bar}" fill="#bbb">'
            f"<title>mapped {c.mapped_area_m2 / 1e4:,.1f} ha</title></rect>"
        )
        a = c.area_m2
        if a.value is not None:
            aw = width * max(a.value, 0.0) / top
            parts.append(
                f'<rect x="{left}" y="{y + bar}" width="{aw:.1f}" height="{bar}" fill="#2166ac">'
                f"<title>adjusted {_pm(a, 1, 1e-4)} ha</title></rect>"
            )
            if a.low is not None and a.high is not None:
                x0 = left + width * max(a.low, 0.0) / top
                x1 = left + width * a.high / top
                yc = y + 1.5 * bar
                parts.append(
                    f'<path d="M{x0:.1f},{yc}H{x1:.1f}M{x0:.1f},{yc - 4}v8M{x1:.1f},{yc - 4}v8" '
                    'stroke="#000" stroke-width="1.5"/>'
                )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 20}" height="{h}" '
        f'font-size="12" role="img" aria-label="mapped and adjusted areas">{"".join(parts)}'
        f'<text x="{left}" y="{h - 4}" fill="#555">grey: mapped area; blue: adjusted area '
        "with its 95 % interval</text></svg>"
    )


def _sample_html(report: EvaluationReport) -> list[str]:
    s = report.sample
    assert s is not None
    rows = "".join(
        f"<tr><td>{c.id}</td><td>{_esc(c.name)}</td><td class=n>{_esc(_pm(c.users))}</td>"
        f"<td class=n>{_esc(_pm(c.producers))}</td>"
        f"<td class=n>{c.mapped_area_m2 / 1e4:,.1f}</td>"
        f"<td class=n>{_esc(_pm(c.area_m2, 1, 1e-4))}</td>"
        f"<td class=n>{_esc(_pm(c.area_share))}</td>"
        f"<td class=n>{c.sample_mapped} / {c.sample_reference}</td></tr>"
        for c in s.per_class
    )
    notes = "".join(f"<li>{_esc(n)}</li>" for n in s.notes)
    out = [
        "<h2>Accuracy and area from reference points</h2>",
        f"<p>{_esc(report.sample_points)}. Design: {_esc(s.design)}; estimators of Olofsson "
        "et al. (2014) and Stehman (2014); ± is the 95 % confidence interval.</p>",
        f"<p><b>Overall accuracy {_esc(_pm(s.overall))}</b></p>",
        f"<ul>{notes}</ul>" if notes else "",
        "<table><tr><th>id</th><th>class</th><th>user's accuracy</th>"
        "<th>producer's accuracy</th><th>mapped ha</th><th>adjusted ha</th><th>share</th>"
        f"<th>points mapped / reference</th></tr>{rows}</table>",
        "<figure>",
        _area_svg(s),
        "<figcaption>Mapped and error-adjusted area per class</figcaption></figure>",
    ]
    if report.sample_regions:
        names = [c.name for c in report.classes]
        head = "".join(f"<th>{_esc(n)} ha</th>" for n in names)
        body = "".join(
            f"<tr><td>{_esc(r.name)}</td><td class=n>{r.points}</td>"
            f"<td class=n>{_esc(_pm(r.overall))}</td>"
            + "".join(f"<td class=n>{_esc(_pm(c.area_m2, 1, 1e-4))}</td>" for c in r.per_class)
            + "</tr>"
            for r in report.sample_regions
        )
        out.append(
            "<h3>Per region</h3><table><tr><th>region</th><th>points</th>"
            f"<th>overall accuracy</th>{head}</tr>{body}</table>"
        )
    return out


def _intervals_lines(report: EvaluationReport) -> list[str]:
    iv = report.intervals
    if iv is None:
        return []
    o = iv.overall
    out = [
        "",
        f"## 95 % intervals (bootstrap over blocks: {iv.resamples} resamples of {o.blocks} "
        f"blocks, seed {iv.seed})",
        "",
        f"- mIoU {_ci(o.miou)}; overall accuracy {_ci(o.overall_accuracy)}",
        "",
        "| class | IoU | 95 % interval |",
        "| --- | ---: | ---: |",
    ]
    for c, i in zip(report.overall.per_class, o.iou):
        out.append(f"| {c.id} {c.name} | {_fmt(c.iou)} | {_ci(i)} |")
    for r, ri in zip(report.regions, iv.regions):
        out.append(
            f"- {r.name}: mIoU {_fmt(r.miou)} ({_ci(ri.miou)}), accuracy "
            f"{_fmt(r.overall_accuracy)} ({_ci(ri.overall_accuracy)}), {ri.blocks} blocks"
        )
    return out


SAMPLE_CSV_COLUMNS = (
    "region",
    "class_id",
    "class_name",
    "users_accuracy",
    "users_se",
    "producers_accuracy",
    "producers_se",
    "mapped_area_ha",
    "adjusted_area_ha",
    "adjusted_area_se_ha",
    "adjusted_area_ci95_low_ha",
    "adjusted_area_ci95_high_ha",
    "area_share",
    "area_share_se",
    "region_points",
    "region_overall_accuracy",
    "region_overall_accuracy_se",
)


def _sample_csv(report: EvaluationReport) -> str:
    assert report.sample is not None
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(SAMPLE_CSV_COLUMNS)

    def v(x: float | None, scale: float = 1.0) -> Any:
        return "" if x is None else x * scale

    for name, s in [("(all)", report.sample)] + [(r.name or "", r) for r in report.sample_regions]:
        for c in s.per_class:
            w.writerow(
                [
                    name,
                    c.id,
                    c.name,
                    v(c.users.value),
                    v(c.users.se),
                    v(c.producers.value),
                    v(c.producers.se),
                    c.mapped_area_m2 / 1e4,
                    v(c.area_m2.value, 1e-4),
                    v(c.area_m2.se, 1e-4),
                    v(c.area_m2.low, 1e-4),
                    v(c.area_m2.high, 1e-4),
                    v(c.area_share.value),
                    v(c.area_share.se),
                    s.points,
                    v(s.overall.value),
                    v(s.overall.se),
                ]
            )
    return buf.getvalue().rstrip("\n")
