"""The house's rules, read from the source: what each layer may import, and no import cycles.

The layers, bottom up (the README's developer section has the map):

- pure: ``classes``, ``errors``, ``io``, ``tiling``, ``blending``, ``bundle``, ``models``,
  ``losses``, ``augment``, ``labels``, ``scoring``, ``progress``, ``report``, ``catalog``,
  ``mosaic``, ``provenance``, ``tuning``, ``accuracy``, ``derive``, ``allocator``;
- ``tasks``: what runs on a worker, one module per stage;
- ``cluster``: sessions and ``run_tasks``; ``resident``: the cluster kept between commands;
- ``stages``: the client drivers, one per stage;
- ``pipeline``, then ``cli`` and the package's ``__init__`` (lazy re-exports) on top (``worker_preload`` stands apart: Dask loads it on workers).

Every import counts, at the top of a module or inside a function.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import geoseg

PACKAGE = Path(geoseg.__file__).parent
PURE = {"classes", "errors", "io", "tiling", "blending", "bundle", "models", "losses", "augment"}
PURE |= {"labels", "scoring", "progress", "report", "catalog", "mosaic", "provenance", "tuning"}
PURE |= {"accuracy", "derive", "allocator"}
# the package itself is the face: it re-exports the stages (lazily); every module may read its
# __version__, as Python loads it first anyway
LAYERS = [PURE, {"tasks"}, {"cluster", "resident"}, {"stages"}, {"pipeline"}, {"cli", "geoseg"}]
ALONE = {"worker_preload"}
# third-party packages each layer may not import
NOT_BELOW_CLUSTER = ("distributed", "dask", "click")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str:
    """``geoseg.stages.train`` -> ``stages``; ``geoseg.models.unet`` -> ``models``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "geoseg"


def rank(module: str) -> int:
    name = layer_of(module)
    return next(i for i, layer in enumerate(LAYERS) if name in layer)


def imports() -> dict[str, set[str]]:
    """Every geoseg module and the modules it imports (geoseg's and third parties' top names)."""
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        module = module_name(path)
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found.add(node.module)
                # "from geoseg.tasks import sampling" imports the submodule
                for a in node.names:
                    if f"{node.module}.{a.name}".replace(".", "/") + ".py" in _files():
                        found.add(f"{node.module}.{a.name}")
        graph[module] = found
    return graph


def _files() -> set[str]:
    return {str(p.relative_to(PACKAGE.parent).with_suffix(".py")) for p in PACKAGE.rglob("*.py")}


def test_every_module_has_a_layer() -> None:
    for module in imports():
        name = layer_of(module)
        assert name in ALONE or any(name in layer for layer in LAYERS), module


def test_no_module_imports_a_layer_above_its_own() -> None:
    graph = imports()
    wrong = [
        f"{m} imports {d}"
        for m, deps in graph.items()
        if layer_of(m) not in ALONE
        for d in deps
        if d.startswith("geoseg.") and layer_of(d) not in ALONE and rank(d) > rank(m)
    ]
    assert wrong == []


def test_workers_and_the_pure_layer_never_touch_dask_or_click() -> None:
    graph = imports()
    wrong = [
        f"{m} imports {d}"
        for m, deps in graph.items()
        if layer_of(m) in PURE | {"tasks"}
        for d in deps
        if d.split(".")[0] in NOT_BELOW_CLUSTER
    ]
    assert wrong == []
    # only the face speaks click
    assert [m for m, deps in graph.items() if "click" in deps] == ["geoseg.cli"]


def test_no_import_cycles() -> None:
    graph = {m: {d for d in deps if d in imports_of_package()} for m, deps in imports().items()}
    cycles: list[list[str]] = []

    def visit(m: str, path: list[str]) -> None:
        for d in sorted(graph[m]):
            if d in path:
                cycles.append([*path[path.index(d) :], d])
            elif d not in seen:
                seen.add(d)
                visit(d, [*path, d])

    seen: set[str] = set()
    for m in sorted(graph):
        if m not in seen:
            seen.add(m)
            visit(m, [m])
    # a package's __init__ imported by its own submodules is not a cycle of code
    cycles = [c for c in cycles if not all(x == c[0] or x.startswith(c[0] + ".") for x in c)]
    assert cycles == []


def imports_of_package() -> set[str]:
    return {module_name(p) for p in PACKAGE.rglob("*.py")}


@pytest.mark.parametrize("code", ["import geoseg", "import geoseg.cli"])
def test_importing_geoseg_loads_no_heavy_package(code: str) -> None:
    """``import geoseg`` and the command line's help load neither torch, rasterio nor
    distributed (``geoseg --help`` stays well under a second)."""
    check = "import sys; print(sorted(m for m in ('torch', 'rasterio', 'distributed') if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", f"{code}; {check}"], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
