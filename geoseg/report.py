"""Writing evaluation reports: JSON for machines, Markdown for people."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from geoseg.errors import ConfigError
from geoseg.io import atomic_output, check_output

REPORT_FORMATS = (".json", ".md")


def check_report_path(path: str | os.PathLike[str], overwrite: bool) -> Path:
    ext = Path(path).suffix.lower()
    if ext not in REPORT_FORMATS:
        raise ConfigError(
            f"unknown report format {ext or '(none)'!r} for {str(path)!r}; expected one of "
            f"{', '.join(REPORT_FORMATS)}"
        )
    return check_output(path, overwrite)


def write_report(
    report: dict[str, Any], path: str | os.PathLike[str], *, overwrite: bool = False
) -> Path:
    """Write ``report`` (from :func:`geoseg.metrics.evaluate`) as JSON or Markdown by extension."""
    out = check_report_path(path, overwrite)
    text = json.dumps(report, indent=1) if out.suffix.lower() == ".json" else markdown(report)
    with atomic_output(out, overwrite) as tmp:
        tmp.write_text(text + "\n")
    return out


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def score_table(report: dict[str, Any], max_regions: int = 6) -> str:
    """IoU per class for the whole area and the first ``max_regions`` regions, as plain text."""
    overall = report["overall"]
    regions = report["regions"]
    cols = [("all", overall)] + [(r["name"], r) for r in regions[:max_regions]]
    width = max(12, *(len(c["name"]) for c in report["classes"]))
    head = f"{'class':<{width}}" + "".join(f"{n[:12]:>13}" for n, _ in cols)
    lines = [head, "-" * len(head)]
    for i, c in enumerate(report["classes"]):
        lines.append(
            f"{c['name']:<{width}}"
            + "".join(f"{_fmt(s['per_class'][i]['iou']):>13}" for _, s in cols)
        )
    lines.append("-" * len(head))
    for key, label in (("miou", "mIoU"), ("overall_accuracy", "accuracy"), ("pixels", "pixels")):
        vals = [s[key] if key == "pixels" else _fmt(s[key]) for _, s in cols]
        lines.append(f"{label:<{width}}" + "".join(f"{v!s:>13}" for v in vals))
    if len(regions) > max_regions:
        lines.append(f"({len(regions) - max_regions} more regions in the report)")
    return "\n".join(lines)


def markdown(report: dict[str, Any]) -> str:
    names = [c["name"] for c in report["classes"]]
    o = report["overall"]
    out = [
        "# geoseg evaluation",
        "",
        f"- class map: `{report['prediction']}`",
        f"- truth: `{report['truth']}`",
        f"- scored area: `{report['within'] or 'the whole class map'}`",
        f"- pixels scored: {o['pixels']}; mIoU {_fmt(o['miou'])} ({report['miou_definition']}); "
        f"overall accuracy {_fmt(o['overall_accuracy'])}; kappa {_fmt(o['kappa'])}; "
        f"frequency-weighted IoU {_fmt(o['fw_iou'])}",
        "",
        "## Per class",
        "",
        "| class | IoU | precision | recall | F1 | truth px | predicted px |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for c in o["per_class"]:
        out.append(
            f"| {c['id']} {c['name']} | {_fmt(c['iou'])} | {_fmt(c['precision'])} | "
            f"{_fmt(c['recall'])} | {_fmt(c['f1'])} | {c['truth_pixels']} | {c['predicted_pixels']} |"
        )
    if report["regions"]:
        out += [
            "",
            "## Per region",
            "",
            "| region | pixels | mIoU | accuracy | " + " | ".join(names) + " |",
            "| --- | ---: | ---: | ---: |" + " ---: |" * len(names),
        ]
        for r in report["regions"]:
            ious = " | ".join(_fmt(c["iou"]) for c in r["per_class"])
            out.append(
                f"| {r['name']} | {r['pixels']} | {_fmt(r['miou'])} | {_fmt(r['overall_accuracy'])} | {ious} |"
            )
    out += [
        "",
        "## Confusion matrix (rows: truth, columns: prediction)",
        "",
        "| truth \\ prediction | " + " | ".join(names) + " |",
        "| --- |" + " ---: |" * len(names),
    ]
    for name, row in zip(names, o["confusion_matrix"]):
        out.append(f"| {name} | " + " | ".join(str(v) for v in row) + " |")
    return "\n".join(out)
