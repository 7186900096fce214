"""Whole pipelines from a YAML workflow: train, predict, vectorize, evaluate, on one cluster.

A workflow file names a ``scene`` and ``labels`` (to train on), optionally ``map`` (a list of
scenes that the predict stage maps as one mosaic; default: the training scene), and has one
section per stage (``train``,
``predict``, ``vectorize``, ``evaluate``) whose keys are that stage's options: the keyword
arguments of :func:`geoseg.stages.train.train`, :func:`geoseg.stages.predict.predict_scenes`,
:func:`geoseg.stages.vectorize.vectorize` and :func:`geoseg.stages.evaluate.evaluate` (``evaluate`` also takes
``truth``, default the labels, and ``points`` with ``points_field``: reference points whose
estimates of accuracy and area, on the same area and regions, join the report). Unknown keys and values of the wrong type are refused with the
stage's keys and their types, and every path (the scene, the labels, and the options that name
files) is resolved against the workflow file's folder and checked, all before the first stage
runs. Outputs go into one folder: ``model.bundle``, ``classes.tif``, ``polygons.geojson`` and
the report as ``report.json``, ``.csv``, ``.html`` and ``.md``. The demo's workflow is
``geoseg/sample/demo.yaml``; ``workflows/`` in the repository holds more.
"""

from __future__ import annotations

import inspect
import logging
import os
import types
import typing
from collections import abc
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from geoseg.augment import PRESETS
from geoseg.bundle import load_bundle
from geoseg.cluster import session
from geoseg.errors import ConfigError, OutputExistsError, option
from geoseg.io import check_input, check_output, folders_for, is_url
from geoseg.report import Baseline, EvaluationReport, write_report
from geoseg.scoring import scores
from geoseg.stages.evaluate import evaluate, quick_look
from geoseg.stages.predict import predict_scene, predict_scenes
from geoseg.stages.train import train
from geoseg.stages.vectorize import vectorize

log = logging.getLogger("geoseg")

STAGES = ("train", "predict", "vectorize", "evaluate")
OUTPUTS = {
    "bundle": "model.bundle",
    "classes": "classes.tif",
    "item": "classes.json",  # the class map's STAC Item, written by predict
    "polygons": "polygons.geojson",
    "report": "report.json",
    "report_csv": "report.csv",
    "report_html": "report.html",
    "report_md": "report.md",
}
_KNOWN = {"name", "description", "output", "workers", "scene", "labels", "map", *STAGES}


@dataclass
class WorkflowResult:
    """The files a workflow wrote and its evaluation report."""

    outputs: dict[str, Path]
    report: EvaluationReport | None


def demo_workflow() -> Path:
    """The packaged demo workflow (the NC Landsat 7 scene shipped with geoseg)."""
    return Path(str(resources.files("geoseg") / "sample" / "demo.yaml"))


# the options a workflow may not set in a stage: the pipeline sets them itself
_SET_BY_PIPELINE = {
    "workers",
    "scheduler",
    "client",
    "overwrite",
    "polygons",
    "min_area",
    "simplify",
}
# options that name files, resolved against the workflow file's folder
_PATH_KEYS = {
    "train": ("classes", "within", "val_region", "augment", "resume"),
    "predict": ("within",),
    "vectorize": (),
    "evaluate": ("truth", "regions", "within", "points"),
}


def _stage_functions() -> dict[str, Any]:

    return {"train": train, "predict": predict_scenes, "vectorize": vectorize, "evaluate": evaluate}


def stage_options(stage: str) -> dict[str, Any]:
    """The options a workflow's ``stage`` takes, with their types: the keyword-only arguments
    of the stage's function (``evaluate`` also takes ``truth``)."""

    fn = _stage_functions()[stage]
    hints = typing.get_type_hints(fn)
    options = {
        name: hints.get(name, Any)
        for name, param in inspect.signature(fn).parameters.items()
        if param.kind is inspect.Parameter.KEYWORD_ONLY and name not in _SET_BY_PIPELINE
    }
    if stage == "evaluate":
        options.update(truth=str, points=str, points_field=str)
        for name in ("design", "design_file", "strata"):  # of points, given as points_*
            options.pop(name, None)
    return options


def _fits(value: Any, hint: Any) -> bool:
    """Whether a YAML value can be passed where the function's type hint is ``hint``."""

    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str or origin is os.PathLike or hint is os.PathLike:
        return isinstance(value, str)
    args = typing.get_args(hint)
    if origin in (list, tuple, typing.Sequence, abc.Sequence):
        return isinstance(value, (list, tuple)) and all(
            _fits(v, args[0] if args else Any) for v in value
        )
    if origin is dict:
        k, v = args or (Any, Any)
        return isinstance(value, dict) and all(
            _fits(a, k) and _fits(b, v) for a, b in value.items()
        )
    return isinstance(value, hint) if isinstance(hint, type) else True


def _kind(hint: Any) -> str:
    """A type hint in words a YAML author knows."""

    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        kinds = [_kind(h) for h in typing.get_args(hint) if h is not type(None)]
        return " or ".join(dict.fromkeys(kinds))
    if hint is bool:
        return "true/false"
    if hint is int:
        return "integer"
    if hint is float:
        return "number"
    if hint is str or origin is os.PathLike:
        return "text"
    if origin is dict:
        return "mapping"
    if origin is not None:
        return "list"
    return getattr(hint, "__name__", str(hint))


def load_workflow(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a workflow file, check every stage's options against the stage's function (names
    and types), and resolve its paths against the file's own folder, checking that each
    exists: all before any stage runs."""

    p = Path(check_input(path, "workflow")).resolve()
    try:
        cfg = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        first = " ".join(str(exc).split())
        raise ConfigError(f"workflow {str(path)!r} is not valid YAML: {first}") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"workflow {str(path)!r} must be a mapping with scene, labels and stages")
    unknown = sorted(set(cfg) - _KNOWN)
    if unknown:
        raise ConfigError(
            f"workflow {str(path)!r} has unknown keys {unknown}; expected {sorted(_KNOWN)}"
        )
    for key in ("scene", "labels"):
        if not isinstance(cfg.get(key), str):
            raise ConfigError(f"workflow {str(path)!r} needs '{key}', a path")
    if "workers" in cfg and not _fits(cfg["workers"], int | None):
        raise ConfigError(f"workflow {str(path)!r}: 'workers' must be an integer")
    base = p.parent

    def resolve(v: Any, what: str) -> Any:
        if not isinstance(v, str) or is_url(v):
            return v
        return check_input(str((base / v).resolve()), f"{what} (in workflow {str(path)!r})")

    cfg["scene"] = resolve(cfg["scene"], "scene")
    cfg["labels"] = resolve(cfg["labels"], "labels")
    if "map" in cfg:  # the scenes of the map: one mosaic of them all
        scenes = cfg["map"]
        if (
            not isinstance(scenes, list)
            or not scenes
            or not all(isinstance(x, str) for x in scenes)
        ):
            raise ConfigError(
                f"workflow {str(path)!r}: 'map' must be a list of scenes (paths, band files "
                "joined by commas, STAC items) to predict as one mosaic"
            )
        cfg["map"] = [
            ",".join(resolve(part.strip(), "map scene") for part in x.split(",")) for x in scenes
        ]
    for stage in STAGES:
        section = cfg.get(stage) or {}
        if not isinstance(section, dict):
            raise ConfigError(f"workflow {str(path)!r}: '{stage}' must be a mapping of options")
        options = stage_options(stage)
        valid = ", ".join(f"{k} ({_kind(h)})" for k, h in sorted(options.items()))
        for key, value in section.items():
            if key not in options:
                raise ConfigError(
                    f"workflow {str(path)!r}: {stage} has no option {key!r}; {stage} takes {valid}"
                )
            if not _fits(value, options[key]):
                raise ConfigError(
                    f"workflow {str(path)!r}: {stage}.{key} is {value!r}, expected "
                    f"{_kind(options[key])}; {stage} takes {valid}"
                )
        for key in _PATH_KEYS[stage]:
            if key in section and not (key == "augment" and section[key] in PRESETS):
                section[key] = resolve(section[key], f"{stage}.{key}")
        cfg[stage] = section
    return cfg


def _inputs(cfg: dict[str, Any]) -> list[str]:
    """Every file the workflow reads."""
    found = [cfg["scene"], cfg["labels"], *(p for x in cfg.get("map", []) for p in x.split(","))]
    for stage in STAGES:
        found += [cfg[stage][k] for k in _PATH_KEYS[stage] if isinstance(cfg[stage].get(k), str)]
    return found


def run_workflow(
    path: str | os.PathLike[str],
    output: str | os.PathLike[str] | None = None,
    *,
    client: Any = None,
    workers: int | None = None,
    scheduler: str | None = None,
    overwrite: bool = False,
) -> WorkflowResult:
    """Run every stage of the workflow at ``path``: train, predict, vectorize and evaluate, on
    one client (``client``, else as :func:`geoseg.cluster.session` finds or makes one); outputs go to ``output`` (default: the workflow's ``output`` key, relative to
    the current directory), as named in :data:`OUTPUTS`. Everything the workflow names is
    checked before the first stage runs (:func:`load_workflow`), and no output may be one of
    its inputs or a file geoseg did not write."""

    cfg = load_workflow(path)
    out_dir = Path(output or cfg.get("output") or "geoseg-output")
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"output folder {str(out_dir)!r} is a file; pass -o with a folder")
    files = {k: out_dir / v for k, v in OUTPUTS.items()}
    existing = [str(f) for f in files.values() if f.exists()]
    if existing and not overwrite:
        raise OutputExistsError(
            f"output folder {str(out_dir)!r} already holds {', '.join(existing)}; pass {option('--overwrite')} "
            "to replace them or -o to write elsewhere"
        )
    inputs = _inputs(cfg)
    for f in files.values():
        check_output(f, overwrite, inputs=inputs)
    workers = workers or cfg.get("workers")
    gpu = any(cfg[k].get("device", "auto") != "cpu" for k in ("train", "predict"))
    with folders_for(files["bundle"]), session(workers, scheduler, client=client, gpu=gpu) as c:
        common = {"client": c, "overwrite": overwrite}
        tr = dict(cfg["train"])
        train(cfg["scene"], cfg["labels"], files["bundle"], **tr, **common)
        if "map" in cfg:
            pr = {"mosaic": True, **cfg["predict"]}
            predict_scenes(files["bundle"], cfg["map"], files["classes"], **pr, **common)
        else:
            predict_scene(
                files["bundle"], cfg["scene"], files["classes"], **cfg["predict"], **common
            )
        vectorize(files["classes"], files["polygons"], **cfg["vectorize"], **common)
        ev = dict(cfg["evaluate"])
        truth = ev.pop("truth", cfg["labels"])
        points, points_field = ev.pop("points", None), ev.pop("points_field", None)
        report = evaluate(files["classes"], truth, files["report"], **ev, **common)
        if points is not None:
            same = {k: ev[k] for k in ("within", "regions", "region_field", "block") if k in ev}
            pts = evaluate(files["classes"], points, truth_field=points_field, **same, client=c)
            report = replace(
                report,
                sample=pts.sample,
                sample_regions=pts.sample_regions,
                sample_points=pts.sample_points,
            )
    report = replace(report, baseline_majority_class=majority_baseline(report, files["bundle"]))
    look = quick_look(report)
    for key in ("report", "report_csv", "report_html", "report_md"):
        write_report(report, files[key], overwrite=True, look=look)
    return WorkflowResult(files, report)


def majority_baseline(report: EvaluationReport, bundle: Path) -> Baseline:
    """Scores of the trivial map that predicts the training labels' majority class everywhere,
    on the same pixels as ``report``'s overall scores."""

    counts = load_bundle(bundle).contract.training.get("class_pixels", {})
    majority = int(max(counts, key=lambda k: counts[k]))
    cm = np.asarray(report.overall.confusion_matrix)
    idx = [c.id for c in report.classes].index(majority)
    base = np.zeros_like(cm)
    base[:, idx] = cm.sum(1)
    s = scores(base, report.classes)
    return Baseline(majority, s.miou, s.overall_accuracy)
