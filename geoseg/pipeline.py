"""Whole pipelines from a YAML workflow: train, predict, vectorize, evaluate, in one cluster.

A workflow file names a scene and labels and has one section per stage; paths in it are relative
to the file. Outputs go into one directory: ``model.bundle``, ``classes.tif``,
``polygons.geojson`` and the report as ``report.json``, ``.csv``, ``.html`` and ``.md``. See ``workflows/`` for examples.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from geoseg.cluster import session
from geoseg.errors import ConfigError, OutputExistsError
from geoseg.io import check_input

log = logging.getLogger("geoseg")

STAGES = ("train", "predict", "vectorize", "evaluate")
OUTPUTS = {
    "bundle": "model.bundle",
    "classes": "classes.tif",
    "polygons": "polygons.geojson",
    "report": "report.json",
    "report_csv": "report.csv",
    "report_html": "report.html",
    "report_md": "report.md",
}
_KNOWN = {"name", "description", "output", "workers", "scene", "labels", *STAGES}


@dataclass
class WorkflowResult:
    """The files a workflow wrote and its evaluation report."""

    outputs: dict[str, Path]
    report: dict[str, Any] | None


def demo_workflow() -> Path:
    """The packaged demo workflow (the NC Landsat 7 scene shipped with geoseg)."""
    return Path(str(resources.files("geoseg") / "sample" / "demo.yaml"))


def load_workflow(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a workflow file, resolving its paths against the file's own folder."""
    p = Path(check_input(path, "workflow")).resolve()
    try:
        cfg = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"workflow {str(path)!r} is not valid YAML: {exc}") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"workflow {str(path)!r} must be a mapping with scene, labels and stages")
    unknown = sorted(set(cfg) - _KNOWN)
    if unknown:
        raise ConfigError(
            f"workflow {str(path)!r} has unknown keys {unknown}; expected {sorted(_KNOWN)}"
        )
    for key in ("scene", "labels"):
        if key not in cfg:
            raise ConfigError(f"workflow {str(path)!r} needs '{key}'")
    base = p.parent

    def resolve(v: Any) -> Any:
        return (
            str((base / v).resolve())
            if isinstance(v, str) and not v.startswith(("/vsi", "http"))
            else v
        )

    cfg["scene"], cfg["labels"] = resolve(cfg["scene"]), resolve(cfg["labels"])
    for stage in STAGES:
        section = cfg.get(stage) or {}
        if not isinstance(section, dict):
            raise ConfigError(f"workflow {str(path)!r}: '{stage}' must be a mapping of options")
        for key in ("within", "regions", "truth", "classes"):
            if key in section:
                section[key] = resolve(section[key])
        cfg[stage] = section
    return cfg


def run_workflow(
    path: str | os.PathLike[str],
    output: str | os.PathLike[str] | None = None,
    *,
    workers: int | None = None,
    scheduler: str | None = None,
    overwrite: bool = False,
) -> WorkflowResult:
    """Run every stage of the workflow at ``path``; outputs go to ``output`` (default: the
    workflow's ``output`` key, relative to the current directory)."""
    from geoseg.metrics import evaluate
    from geoseg.predict import predict_scene
    from geoseg.report import write_report
    from geoseg.train import train
    from geoseg.vectorize import vectorize

    cfg = load_workflow(path)
    out_dir = Path(output or cfg.get("output") or "geoseg-output")
    files = {k: out_dir / v for k, v in OUTPUTS.items()}
    existing = [str(f) for f in files.values() if f.exists()]
    if existing and not overwrite:
        raise OutputExistsError(
            f"output folder {str(out_dir)!r} already holds {', '.join(existing)}; pass --overwrite "
            "to replace them or -o to write elsewhere"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    workers = workers or cfg.get("workers")
    report = None
    gpu = any(cfg[k].get("device", "auto") != "cpu" for k in ("train", "predict"))
    with session(workers, scheduler, gpu=gpu) as client:
        address = client.scheduler.address
        common = {"scheduler": address, "overwrite": overwrite}
        tr = dict(cfg["train"])
        train(cfg["scene"], cfg["labels"], files["bundle"], **tr, **common)
        predict_scene(files["bundle"], cfg["scene"], files["classes"], **cfg["predict"], **common)
        vectorize(files["classes"], files["polygons"], **cfg["vectorize"], **common)
        ev = dict(cfg["evaluate"])
        truth = ev.pop("truth", cfg["labels"])
        report = evaluate(files["classes"], truth, files["report"], **ev, **common)
    report["baseline_majority_class"] = majority_baseline(report, files["bundle"])
    for key in ("report", "report_csv", "report_html", "report_md"):
        write_report(report, files[key], overwrite=True)
    return WorkflowResult(files, report)


def majority_baseline(report: dict[str, Any], bundle: Path) -> dict[str, Any]:
    """Scores of the trivial map that predicts the training labels' majority class everywhere,
    on the same pixels as ``report``'s overall scores."""
    import numpy as np

    from geoseg.bundle import load_bundle
    from geoseg.io import ClassInfo
    from geoseg.metrics import scores

    counts = load_bundle(bundle).contract.training.get("class_pixels", {})
    classes = [ClassInfo(**c) for c in report["classes"]]
    majority = int(max(counts, key=lambda k: counts[k]))
    cm = np.asarray(report["overall"]["confusion_matrix"])
    idx = [c.id for c in classes].index(majority)
    base = np.zeros_like(cm)
    base[:, idx] = cm.sum(1)
    s = scores(base, classes)
    return {"class_id": majority, "miou": s["miou"], "overall_accuracy": s["overall_accuracy"]}
